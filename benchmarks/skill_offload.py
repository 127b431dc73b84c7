"""What does skill-granular offloading keep on the compute device, and what does it cost a step?

    python benchmarks/skill_offload.py [--out runs/skill_offload] [--steps 40] [--hidden 128] [--layers 4]

Two runs of `python -m pretrain` (one rank, ZeRO-3 with the optimizer offloaded to the CPU,
`ds_configs/zero3_offload_skills.json`) on the sample corpus's seven tasks (alpha 1: the task changes at
most steps), the tiny multimodal model at --hidden width and --layers depth, the same seed and batches:
every skill resident, and `distributed.offload.skills=inactive`. Printed and written to --out as
`table.md` and `results.json`:
- the weight partitions on the compute device at each step's peak (counted by the offloader's hooks: the
  shared parameters, the step's skills and the next step's, prefetched), against the whole model's;
- the bytes copied in per step, against the whole model's;
- skills called without being brought in ahead (misses);
- the median step time (from the second step on) against the run with every skill resident;
- what `state_bytes` (in `steps.jsonl`) found on each device after the first step, per run: on a GPU the
  accelerator's share is what offloading frees; on a CPU both runs hold everything in host memory;
- whether the two runs' losses agree (they train the same model).
A second table counts, without training, what one step of each task keeps on the device for the shipped
base models (SkillNet-NLU base, multimodal base): the shared parameters and the task's skills, against the
whole model (a step whose next task differs also holds the next task's skills while they are copied in).
About 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"every skill resident": [], "inactive skills offloaded": ["distributed.offload.skills=inactive"]}


def train(data: Path, run_dir: Path, steps: int, hidden: int, layers: int, extra: list[str]) -> list[dict]:
    overrides = [f"data_root={data}", f"run_dir={run_dir}", f"train.steps={steps}", f"checkpoint.every={steps}",
                 "train.profile_comm=false", "distributed.ds_config=ds_configs/zero3_offload_skills.json",
                 f"model.hidden_size={hidden}", f"model.intermediate_size={4 * hidden}",
                 f"model.num_hidden_layers={layers}", *extra]
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"run {run_dir.name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    by_step = {r["step"]: r for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}
    return [by_step[s] for s in sorted(by_step)]


def summarize(results: dict[str, list[dict]]) -> tuple[str, dict]:
    base_name, (name, offloaded) = next(iter(results)), list(results.items())[1]
    base = results[base_name]

    def step_time(records):
        return statistics.median(b["time"] - a["time"] for a, b in zip(records[1:], records[2:]))

    model = offloaded[0]["offload_model_bytes"]
    peak = max(r["offload_peak_bytes"] for r in offloaded)
    copied = statistics.fmean(r["offload_copied_in_bytes"] for r in offloaded[1:])
    summary = {"model_bytes": model, "peak_share": peak / model, "copied_in_share_per_step": copied / model,
               "misses": sum(r["offload_misses"] for r in offloaded),
               "step_time": {n: step_time(r) for n, r in results.items()},
               "state_bytes": {n: r[0]["state_bytes"] for n, r in results.items()},
               "max_loss_difference": max(abs(a["loss"] - b["loss"]) for a, b in zip(base, offloaded)),
               "task_changes": sum(a["tasks"] != b["tasks"] for a, b in zip(offloaded, offloaded[1:]))}
    time_ratio = summary["step_time"][name] / summary["step_time"][base_name]
    lines = [f"{len(offloaded)} steps, the task changing at {summary['task_changes']} of them; weight partitions "
             f"of the whole model: {model / 2**20:.2f} MiB.", "",
             "| | value |", "|---|---:|",
             f"| on the compute device at the peak, x the whole model | {summary['peak_share']:.2f} |",
             f"| copied in per step, x the whole model | {summary['copied_in_share_per_step']:.2f} |",
             f"| misses (skills called without being brought in ahead) | {summary['misses']} |",
             f"| median step time, x every skill resident | {time_ratio:.2f} |",
             f"| largest loss difference between the runs | {summary['max_loss_difference']:.2e} |", "",
             "State after the first step, MiB by device (weights, gradients, optimizer state):", ""]
    for run, held in summary["state_bytes"].items():
        lines.append(f"- {run}: " + ", ".join(f"{device} {b / 2**20:.2f}" for device, b in sorted(held.items())))
    return "\n".join(lines), summary


def base_shares(names=("skillnet-nlu-base", "multimodal-base")) -> tuple[str, dict]:
    """Per shipped base model and task: (shared parameters + the task's skills) / all parameters."""
    import torch

    from skillnet import SkillNetModel, load_config
    from training.zero.offload import skill_of

    lines, shares = ["| model | parameters | shared | task: its skills on the device, x the whole model |",
                     "|---|---:|---:|---|"], {}
    for name in names:
        config = load_config(name)
        with torch.device("meta"):  # counted, never allocated
            model = SkillNetModel(config)
        sizes: dict = {}
        for param_name, param in model.named_parameters():
            sizes[skill_of(param_name)] = sizes.get(skill_of(param_name), 0) + param.numel()
        total = sum(sizes.values())
        shares[name] = {t: (sizes[None] + sum(sizes[s] for s in config.registry.skill_names(t))) / total
                        for t in config.tasks}
        cells = ", ".join(f"{t} {share:.2f}" for t, share in shares[name].items())
        lines.append(f"| {name} | {total / 1e6:.0f}M | {sizes[None] / total:.2f} | {cells} |")
    return "\n".join(lines), shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "skill_offload")
    parser.add_argument("--data", type=Path, help="the sample corpus (written to a temporary folder if absent)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "sample"
            subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(data), "--vocab-size",
                            "512"], cwd=ROOT, check=True, capture_output=True)
        results = {}
        for name, extra in RUNS.items():
            print(f"training: {name}", file=sys.stderr)
            results[name] = train(data, Path(tmp) / name.replace(" ", "_"), args.steps, args.hidden, args.layers,
                                  extra)
    table, summary = summarize(results)
    shares_table, summary["base_shares"] = base_shares()
    table += "\n\nThe shipped base models, one step of each task:\n\n" + shares_table
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "summary": summary, "runs": results}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
