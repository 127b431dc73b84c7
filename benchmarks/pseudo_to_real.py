"""Does Pseudo-to-Real pay? The real model trained from scratch against the same model pretrained with one
shared layer (`model.layer_sharing=all`) and delinked part-way (`pseudo_to_real.delink_at`), several seeds.

    python benchmarks/pseudo_to_real.py [--out runs/pseudo_to_real] [--steps 300] [--seeds 3] [--layers 6] [--lr 3e-3]

Every run is `python -m pretrain` (one rank, ZeRO-2, the tiny model at --layers depth) on the sample corpus's
masked-token tasks (masked_lm and masked_code: losses of one scale, so steps that drew different tasks
compare), for the same --steps budget, the same stream of batches per seed. Rows: the real model from
scratch; pseudo-to-real delinked at 5%, 10% and 25% of the budget (moments rescaled, the default); and at
10% with the other two ways of starting the copies' Adam moments (reset, with a re-warmup as long as the
first warmup, and copy). About 8 minutes on 2 CPU cores.

Loss curves are the mean over seeds of each step's loss (paired: a seed draws the same tasks and samples at
every step in every row), smoothed over a trailing window of a tenth of the budget (a curve reaches a loss
only once its window is full). Printed, and written to --out as `table.md`, `results.json` (every run's
steps) and `pseudo_to_real.png` (loss against steps and against seconds):
- each row's final loss (the last window's mean; mean and standard deviation over seeds) and its difference
  from scratch, paired per seed;
- the steps and the seconds (since the end of the first step, so that start-up is left out and the delink's
  own checkpointing and rebuilding are counted) at which the row's curve first reaches scratch's final loss,
  and their ratio to scratch's;
- the bytes one rank holds to train (weights, gradients and optimizer state: `state_bytes` in
  `steps.jsonl`) in each phase, and their ratio to the real model's.
Runs already in `results.json` are not run again, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = [("masked_lm", "text"), ("masked_code", "code")]  # losses of one scale: a step's loss is comparable
SCRATCH = "real model from scratch"


def rows(steps: int) -> dict[str, dict]:
    """Row name: its pseudo-to-real settings ({} for scratch)."""
    table = {SCRATCH: {}}
    for share in (5, 10, 25):
        table[f"delinked at {share}%"] = {"delink_at": max(1, steps * share // 100), "moments": "rescale"}
    for moments in ("reset", "copy"):
        table[f"delinked at 10%, moments {moments}"] = {"delink_at": max(1, steps // 10), "moments": moments}
    return table


def write_config(path: Path, data: Path, steps: int, warmup: int, lr: float) -> None:
    sources = {"text": "text/text.index.json", "code": "code/code.index.json"}
    tasks = "\n".join(f"    - {{name: {name}, modality: {modality}, sources: [{{shards: {sources[modality]}}}]}}"
                      for name, modality in TASKS)
    path.write_text(f"""model: tiny
data_root: {data}
tokenizer: tokenizer
data:
  num_workers: 1
  shuffle_buffer: 32
  resample: true
  max_text_tokens: 64
  tasks:
{tasks}
optim:
  lr: {lr}
  warmup_steps: {warmup}
train:
  steps: {steps}
  micro_batch_size: 8
  log_every: {max(1, steps // 5)}
checkpoint:
  every: {steps}
  keep_last: 1
distributed:
  ds_config: zero2
""")


def train(config: Path, run_dir: Path, seed: int, layers: int, settings: dict, warmup: int) -> dict:
    """One run: its steps' (step, time, loss) and its state bytes per phase."""
    overrides = [f"run_dir={run_dir}", f"train.seed={seed}", f"model.num_hidden_layers={layers}"]
    if settings:
        overrides += ["model.layer_sharing=all", f"pseudo_to_real.delink_at={settings['delink_at']}",
                      f"pseudo_to_real.moments={settings['moments']}", f"pseudo_to_real.rewarmup_steps={warmup}"]
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config), *overrides], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"run {run_dir.name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    records = {r["step"]: r for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}
    steps = [records[s] for s in sorted(records)]
    phases = [sum(r["state_bytes"].values()) for r in steps if "state_bytes" in r]
    shutil.rmtree(run_dir)  # checkpoints: what is kept is in results.json
    return {"loss": [r["loss"] for r in steps], "time": [r["time"] - steps[0]["time"] for r in steps],
            "state_bytes": phases}


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(r[key] for r in runs))]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else ""


def summarize(runs: dict, table: dict, seeds: list[int], window: int) -> tuple[str, dict]:
    by_row = {row: [runs[f"{row}|{s}"] for s in seeds] for row in table}
    final = {row: [statistics.fmean(r["loss"][-window:]) for r in rs] for row, rs in by_row.items()}
    target = statistics.fmean(final[SCRATCH])
    real_bytes = by_row[SCRATCH][0]["state_bytes"][0]
    summary, lines = {"target": target}, [
        f"Target: scratch's final loss {target:.4f} (mean of the last {window} steps, over {len(seeds)} seeds).", "",
        "| row | final loss | - scratch (paired) | steps to target | x scratch | seconds to target | x scratch "
        "| state MiB, shared -> real | x real |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reach = {}
    for row, rs in by_row.items():
        curve, elapsed = smooth(mean_curve(rs, "loss"), window), mean_curve(rs, "time")
        step = next((i for i, loss in enumerate(curve) if i + 1 >= window and loss <= target), None)
        reach[row] = (step + 1, elapsed[step]) if step is not None else None
    for row, rs in by_row.items():
        (mean, std), diff = mean_std(final[row]), mean_std([a - b for a, b in zip(final[row], final[SCRATCH])])
        phases = rs[0]["state_bytes"]
        got, base = reach[row], reach[SCRATCH]
        summary[row] = {"final": (mean, std), "difference": diff, "reach": got, "state_bytes": phases}
        cells = [f"{mean:.4f} ± {std:.4f}", "" if row == SCRATCH else f"{diff[0]:+.4f} ± {diff[1]:.4f}"]
        cells += ([f"{got[0]}", f"{got[0] / base[0]:.2f}", f"{got[1]:.1f}", _ratio(got[1], base[1])]
                  if got and base else ["not reached", "", "", ""])
        cells += [" -> ".join(f"{b / 2**20:.2f}" for b in phases), " -> ".join(f"{b / real_bytes:.2f}" for b in phases)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def plot(runs: dict, table: dict, seeds: list[int], window: int, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for row in table:
        rs = [runs[f"{row}|{s}"] for s in seeds]
        curve = smooth(mean_curve(rs, "loss"), window)
        axes[0].plot(range(1, len(curve) + 1), curve, label=row)
        axes[1].plot(mean_curve(rs, "time"), curve, label=row)
    for ax, xlabel in zip(axes, ("step", "seconds since the first step")):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"loss (mean over {len(seeds)} seeds, trailing mean of {window} steps)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Pseudo-to-Real against the real model from scratch (tiny model, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/pseudo_to_real")
    parser.add_argument("--data", help="a sample corpus folder (default: written to a temporary folder)")
    parser.add_argument("--steps", type=int, default=300, help="the training budget of every run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 10 or args.layers < 2:
        parser.error("--seeds must be >= 1, --steps >= 10, --layers >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warmup, window = max(1, args.steps // 20), max(2, args.steps // 10)
    table, seeds = rows(args.steps), list(range(args.seeds))
    settings = {"steps": args.steps, "layers": args.layers, "lr": args.lr, "warmup": warmup, "rows": table}
    results_file = out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = saved.get("runs", {}) if saved.get("settings") == settings else {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "sample"
        if not args.data:
            subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(data)], cwd=ROOT, check=True,
                           capture_output=True)
        config = Path(tmp) / "pseudo_to_real.yaml"
        write_config(config, data.resolve(), args.steps, warmup, args.lr)
        todo = [(row, seed) for seed in seeds for row in table if f"{row}|{seed}" not in runs]
        for row, seed in tqdm(todo, desc="runs", unit=" run"):
            runs[f"{row}|{seed}"] = train(config, Path(tmp) / "run", seed, args.layers, table[row], warmup)
            results_file.write_text(json.dumps({"settings": settings, "runs": runs}))
    text, summary = summarize(runs, table, seeds, window)
    header = (f"{args.layers} layers, {args.steps} steps of 8 samples, {len(seeds)} seeds, one rank (ZeRO-2, "
              f"CPU); delinked runs share one layer until they delink.\n\n")
    (out / "table.md").write_text(header + text)
    plot(runs, table, seeds, window, summary["target"], out / "pseudo_to_real.png")
    print(header + text + f"\nwritten: {out / 'table.md'}, {out / 'pseudo_to_real.png'}, {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
