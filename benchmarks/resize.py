"""Time and peak memory of resuming a checkpoint on another world size, against a same-size resume.

    python benchmarks/resize.py [--hidden 768 --layers 4]

Trains one step of a multimodal model (6 skills in FFN and attention) on 2 CPU ranks (ZeRO-3, every
parameter partitioned), then resumes its checkpoint in separate launches, each at the checkpoint's step (so
it only loads, then writes the checkpoint again): on 2 ranks (a native load), on 1 rank converting it to
its universal copy while loading, offline with `python -m training.reshard`, and on 1 rank from that copy.
Load times are the trainers' own "resumed ... in" lines; peak memory is rank 0's resident peak up to the
end of the load (model and engine included), and the converter's above an import-only process, as a ratio
to the largest rank's checkpoint files (target: at most 1.5x).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from export_memory import benchmark_model, peak_rss  # noqa: E402

PARTITION_ALL = "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"


def launch(ranks: int, port: int, args: list[str]) -> tuple[str, float]:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
           if ranks > 1 else [sys.executable]) + ["-m", "pretrain", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                               "MASTER_PORT": str(port)})
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    return done.stdout + done.stderr, time.perf_counter() - start


def resumed(out: str) -> tuple[float, float]:
    seconds, gib = re.search(r"resumed \S+ in ([\d.]+) s \(rank 0's peak resident memory so far ([\d.]+) GiB\)",
                             out).groups()
    return float(seconds), float(gib)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(tmp / "sample")], cwd=ROOT,
                       check=True, capture_output=True)
        model = benchmark_model(args.hidden, args.layers)
        common = ["--config", "tiny", f"model={model}", f"data_root={tmp / 'sample'}", "train.micro_batch_size=2",
                  "train.steps=1", PARTITION_ALL]
        launch(2, 29751, [*common, f"run_dir={tmp / 'run'}"])
        ckpt = tmp / "run" / "checkpoints" / "step00000001"
        largest = max(sum(f.stat().st_size for f in ckpt.glob(f"zero_pp_rank_{r}_*")) for r in range(2))
        rows = []
        out, _ = launch(2, 29752, [*common, f"run_dir={tmp / 'same'}", f"checkpoint.resume={ckpt}"])
        rows.append(("same size, 2 ranks (native)", *resumed(out)))
        out, _ = launch(1, 29753, [*common, f"run_dir={tmp / 'one'}", f"checkpoint.resume={ckpt}"])
        rows.append(("1 rank, converting as it loads", *resumed(out)))
        shutil.rmtree(ckpt / "universal")
        baseline = peak_rss("import torch, deepspeed, transformers")
        start = time.perf_counter()
        converter = peak_rss(f"from training.reshard import main; main(['{ckpt}'])")
        convert_s = time.perf_counter() - start
        out, _ = launch(1, 29754, [*common, f"run_dir={tmp / 'copy'}", f"checkpoint.resume={ckpt}"])
        rows.append(("1 rank, from the offline copy", *resumed(out)))
    same = rows[0][1]
    print(f"resuming a ZeRO-3 checkpoint of 2 ranks (hidden {args.hidden}, {args.layers} layers; largest rank's files "
          f"{largest / 2**20:.0f} MiB)")
    print(f"  {'resume':<34}{'load s':>8}{'x same size':>13}{'rank 0 peak GiB':>17}")
    for label, seconds, gib in rows:
        print(f"  {label:<34}{seconds:>8.2f}{seconds / same:>13.2f}{gib:>17.2f}")
    ratio = (converter - baseline) / largest
    print(f"  offline conversion (python -m training.reshard): {convert_s:.1f} s wall (process start included), "
          f"peak {converter / 2**20:.0f} MiB, above imports {(converter - baseline) / 2**20:.0f} MiB = "
          f"{ratio:.2f}x the largest rank's files (target <= 1.50: {'met' if ratio <= 1.5 else 'NOT met'})")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
