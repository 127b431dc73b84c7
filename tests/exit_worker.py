"""Run under torchrun by test_pretrain: `python -m pretrain`'s main, then what is still running in the
rank (Python threads and the process's native threads by name), as one JSON line."""

import json
import os
import sys
import threading

from pretrain.train import main

code = main(sys.argv[1:])
native = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print("LEFT " + json.dumps({"rank": int(os.environ["RANK"]), "code": code, "native": native,
                            "python": [t.name for t in threading.enumerate()]}), flush=True)
