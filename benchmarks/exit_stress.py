"""Clean exits: many consecutive 2-rank runs of the tiny config, each of which must exit 0.

    python benchmarks/exit_stress.py [--runs 100 --ranks 2 --steps 4]

Every run is `torchrun --nproc_per_node 2 -m pretrain --config tiny` (CPU, gloo) on the sample corpus,
in a fresh run folder. A run that trains to the end and then dies on the way out (an abort from a
communication thread still running at exit, say) counts as a failure: the launcher reports it, a Slurm
job is marked FAILED and `set -e` skips the export. Prints one line per failure (exit code and the last
lines of its output) and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="training steps per run")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(sample)], cwd=ROOT, check=True,
                       capture_output=True)
        for i in tqdm(range(args.runs), desc="runs", unit=" runs"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                   "--master_port", str(_free_port()), "-m", "pretrain", "--config", "tiny", f"data_root={sample}",
                   f"run_dir={Path(tmp) / f'run{i}'}", f"train.steps={args.steps}", f"checkpoint.every={args.steps}"]
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            trained = f"trained to step {args.steps}" in done.stdout
            if done.returncode != 0 or not trained:
                tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
                failures.append(i)
                tqdm.write(f"run {i}: exit {done.returncode}, {'trained to the end' if trained else 'did not finish'}: "
                           + " | ".join(tail))
    print(f"{args.runs - len(failures)}/{args.runs} runs of {args.ranks} ranks exited 0"
          + (f"; failed: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
