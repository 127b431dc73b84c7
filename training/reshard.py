"""Rewrite a checkpoint offline so that any number of ranks and any skill placement resume from it.

    python -m training.reshard runs/tiny/checkpoints/step00000040    # writes step00000040/universal/
    python -m training.reshard runs/tiny                             # the run's newest checkpoint

The copy is DeepSpeed's universal layout (every parameter's fp32 weights and AdamW moments whole, beside the
optimizer's settings and DeepSpeed's model-state files), streamed parameter by parameter from the ranks'
files. A run of another size or skill placement resuming from the checkpoint loads it instead of writing it
first (it would write the same). Pretraining and finetuning checkpoints alike, ZeRO stage 1, 2 or 3.
"""

from __future__ import annotations

import argparse
import sys
import time

from .checkpoint import check_readable, checkpoint_or_run, ensure_universal
from .metrics import quiet_third_party


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reshard", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, or a run folder (its newest checkpoint)")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        folder = checkpoint_or_run(args.checkpoint)
        check_readable(folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = ensure_universal(folder)
    print(f"universal checkpoint: {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
