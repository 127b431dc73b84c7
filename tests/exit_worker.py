"""Run under torchrun by test_pretrain: `python -m pretrain`'s main, then what is still running in the
rank (Python threads and the process's native threads by name), written as JSON to
`$EXIT_REPORTS/rank<r>.json` (a file per rank: two ranks' lines on one stdout can interleave)."""

import json
import os
import sys
import threading
from pathlib import Path

from pretrain.train import main

code = main(sys.argv[1:])
native = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
report = {"rank": int(os.environ["RANK"]), "code": code, "native": native,
          "python": [t.name for t in threading.enumerate()]}
(Path(os.environ["EXIT_REPORTS"]) / f"rank{report['rank']}.json").write_text(json.dumps(report))
