"""Does routing by declared skills pay? SkillNet against the dense, MoE, prototyping and task-router baselines
on generated multi-task data, several seeds each.

    python benchmarks/separation.py [--out runs/separation] [--quick] [--seeds 5] [--workers 2]

The tasks (made here, no downloads) read the same kind of input, a sequence of words each carrying a hidden
feature vector, and want different things of it, as SkillNet-NLU's tasks do (its Table 2):

  topic_a        sequence label: a wavy function (Ma et al. 2018's synthetic tasks) of the words' mean
                 feature along direction a                          skills: sequence, pattern_a (+ generic)
  topic_b        the same function along direction b                skills: sequence, pattern_b (+ generic)
  tags           entities (BIO tags, a CRF, entity F1): runs of words whose own and left neighbour's features
                 score high (token-level: the paper's NER case)     skills: token (+ generic)
  topic_a_small  close to topic_a (direction a rotated by 15 degrees), 64 training examples: it can only do
                 well by transfer                                   skills: sequence, pattern_a (+ generic)

The conflict knob c in [0, 1] turns topic_b's direction away from topic_a's by c x 90 degrees: at 0 they are one
task, at 1 they read orthogonal features (each as hard as the other at every c: the features are isotropic).
Every row trains on the same data for the same number of steps through `finetune.compare` (the finetuning
layer, a DeepSpeed engine), from random initialisation:

  task-specific (one dense model per task), joint dense matched on activated parameters (FFN as wide as the
  skills a task activates, on average), joint dense matched on total parameters (as wide as all skills),
  joint top-2 MoE, k-top-1 prototyping, the task-level router, and SkillNet;

then SkillNet after a short sparse pretraining phase (masked words of unlabeled inputs of the same generator,
`python -m pretrain`, the token skill) against SkillNet given those steps as extra finetuning, and the ablation
of SkillNet-NLU's Table 6 (each skill left out of every route in turn, retrained).

Prints and writes to --out: `table.md` (each task's metric and the average, mean +- standard deviation over
seeds, with activated and total parameters per row; SkillNet's average minus each baseline's, per seed, as
mean and standard deviation of the difference), `results.json` (every run's numbers) and `separation.png`
(bars with error bars per task and system). Runs already in `results.json` are not run again, so a killed
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKILLS = [("sequence", "the meaning of a whole sequence"), ("token", "the meaning of each word in its context"),
          ("pattern_a", "the features topic_a reads"), ("pattern_b", "the features topic_b reads"),
          ("generic", "what every task needs")]
TASKS = {  # name: (skills, head, training examples)
    "topic_a": (["sequence", "pattern_a"], {"type": "classification", "labels": ["no", "yes"]}, 1500),
    "topic_b": (["sequence", "pattern_b"], {"type": "classification", "labels": ["no", "yes"]}, 1500),
    "tags": (["token"], {"type": "tagging", "labels": ["O", "B-ENT", "I-ENT"]}, 1500),
    "topic_a_small": (["sequence", "pattern_a"], {"type": "classification", "labels": ["no", "yes"]}, 64),
}
VOCAB, FEATURES, LENGTH, DEV = 48, 4, 10, 400
WORDS = string.ascii_letters[:VOCAB]  # one token each
WIDTH = 32  # hidden size, and by default each skill's FFN width (--ffn)
CONFLICTS = (0.0, 0.5, 1.0)
DEFAULT_CONFLICT = 1.0
SKILLNET, PRETRAINED, LONGER = "SkillNet", "SkillNet, sparse pretraining", "SkillNet, random init, same budget"
PARTS = ("main", "sweep", "ablation", "pretraining")


# --- the tasks -------------------------------------------------------------------------------------------------

def _wave(score: np.ndarray) -> np.ndarray:
    """Ma et al. (2018)'s synthetic regression: linear plus sines of the projected input."""
    return score + np.sin(2.0 * score) + np.sin(3.5 * score + 1.3)


def generate(folder: Path, conflict: float, seed: int = 0) -> dict[str, int]:
    """Write every task's train.jsonl and dev.jsonl under `folder` (and `unlabeled.txt`, inputs for
    pretraining); returns the training examples per task. The same `seed` and `conflict` write the same files."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(VOCAB, FEATURES))
    a, other = np.linalg.qr(rng.normal(size=(FEATURES, 2)))[0].T
    angle = conflict * math.pi / 2
    b = math.cos(angle) * a + math.sin(angle) * other
    small = math.cos(math.pi / 12) * a + math.sin(math.pi / 12) * other
    tag_in, tag_left = rng.normal(size=FEATURES), rng.normal(size=FEATURES)
    words = list(WORDS)

    def sequences(n):
        ids = rng.integers(0, VOCAB, size=(n, LENGTH))
        mean = features[ids].mean(axis=1) * math.sqrt(LENGTH)  # about unit variance along any direction
        return ids, mean

    sizes = {}
    for name, (_, head, n_train) in TASKS.items():
        ids, mean = sequences(n_train + DEV)
        if head["type"] == "tagging":
            value = features[ids] @ tag_in
            value[:, 1:] += features[ids[:, :-1]] @ tag_left
            inside = value > np.quantile(value, 0.6)
            begins = inside & ~np.concatenate([np.zeros((len(ids), 1), bool), inside[:, :-1]], axis=1)
            rows = [{"tokens": [words[i] for i in row],
                     "tags": ["B-ENT" if b else "I-ENT" if n else "O" for b, n in zip(begin, ins)]}
                    for row, begin, ins in zip(ids, begins, inside)]
        else:
            value = _wave(mean @ {"topic_a": a, "topic_b": b, "topic_a_small": small}[name])
            labels = value > np.median(value)
            rows = [{"text": " ".join(words[i] for i in row), "label": head["labels"][int(y)]}
                    for row, y in zip(ids, labels)]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for split, part in (("train", rows[:n_train]), ("dev", rows[n_train:])):
            (folder / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        sizes[name] = n_train
    ids, _ = sequences(4000)
    (folder / "unlabeled.txt").write_text("".join(" ".join(words[i] for i in row) + "\n" for row in ids))
    return sizes


# --- the model and the finetuning config -------------------------------------------------------------------------

def base_model(folder: Path, ffn: int = WIDTH) -> Path:
    """A randomly initialised skill model with this benchmark's skills and task table, and a tokenizer with one
    token per word: the folder every row's model takes its shape from."""
    from skillnet import SkillNetConfig, SkillNetForMultiTask
    from skillnet.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    lines = [" ".join(WORDS[i] for i in rng.integers(0, VOCAB, LENGTH)) for _ in range(2000)]
    train_tokenizer(lines, 7 + 256 + 6 * VOCAB, folder)
    config = SkillNetConfig(vocab_size=7 + 256 + 6 * VOCAB, hidden_size=WIDTH, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=ffn, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            skills=[{"name": n, "description": d} for n, d in SKILLS],
                            tasks={"masked_lm": ["token"], **{t: s for t, (s, _, _) in TASKS.items()}},
                            default_task="masked_lm")
    SkillNetForMultiTask(config).save_pretrained(folder)
    return folder


def finetune_config(data: Path, steps: int, out: Path):
    import yaml

    from finetune.config import load_finetune_config

    tasks = [{"name": name, "skills": skills, "head": head,
              "data": {"train": str(data / name / "train.jsonl"), "validation": str(data / name / "dev.jsonl"),
                       "max_length": 16}}
             for name, (skills, head, _) in TASKS.items()]
    tree = {"tasks": tasks, "train": {"steps": steps, "batch_size": 32, "eval_batch_size": 200, "alpha": 0.5,
                                      "log_every": 10**6},
            "optim": {"lr": 3e-3, "warmup_steps": steps // 20}, "checkpoint": {"every": steps, "keep_last": 1}}
    path = out / "finetune.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_finetune_config(path)


def systems(ffn: int = WIDTH) -> list:
    """The rows, their widths matched to SkillNet's: a task activates `len(skills) + 1` skills of width `ffn`."""
    from finetune.compare import System

    mean_active = statistics.mean(len(s) + 1 for s, _, _ in TASKS.values())
    return [
        System("Task-specific (dense)", "dense", per_task=True, pretrained=False,
               model={"intermediate_size": round(mean_active * ffn)}),
        System("Joint dense, activated-matched", "dense", pretrained=False,
               model={"intermediate_size": round(mean_active * ffn)}),
        System("Joint dense, total-matched", "dense", pretrained=False,
               model={"intermediate_size": len(SKILLS) * ffn}),
        System("Joint MoE (top-2 of 5)", "moe", pretrained=False, model={"num_experts": len(SKILLS), "moe_top_k": 2}),
        System("k-top-1 prototyping (3 x 2)", "prototype", pretrained=False,
               model={"num_experts": 6, "prototype_groups": 3}),
        System("Task-level router (1 of 5)", "task_router", pretrained=False, model={"num_experts": len(SKILLS)}),
        System(SKILLNET, pretrained=False),
    ]


def ablations() -> list:
    from finetune.compare import System

    return [System(f"SkillNet w/o {name}", pretrained=False, drop_skill=name,
                   model={"always_generic": False} if name == "generic" else {}) for name, _ in SKILLS]


# --- the runs ------------------------------------------------------------------------------------------------------

def _pretrain(base: Path, data: Path, steps: int, seed: int, out: Path) -> Path:
    """Sparse pretraining (masked words, the token skill) of the base model on the unlabeled inputs, exported."""
    import yaml

    from pretrain.export import export

    model = {k: v for k, v in json.loads((base / "config.json").read_text()).items()
             if k not in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype")}
    tree = {"model": model, "tokenizer": str(base), "run_dir": str(out / "run"),
            "data": {"alpha": 1.0, "num_workers": 0, "shuffle_buffer": 64, "resample": True, "max_text_tokens": 16,
                     "tasks": [{"name": "masked_lm", "modality": "text",
                                "sources": [{"shards": str(data / "shards" / "text.index.json")}]}]},
            "optim": {"lr": 3e-3, "warmup_steps": steps // 20},
            "train": {"steps": steps, "micro_batch_size": 32, "log_every": 10**6, "seed": seed},
            "checkpoint": {"every": steps, "keep_last": 1}, "distributed": {"ds_config": "ds_configs/zero2.json"}}
    config = out / "pretrain.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = {**{k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, "OMP_NUM_THREADS": "1"}  # a free port
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"pretraining failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return export(out / "run", out / "export", "fp32")


def run_job(job: dict) -> dict:
    """One row at one conflict and seed (in a worker process): {task: metric}."""
    from finetune.compare import System, compare

    work, base, data = Path(job["work"]), Path(job["base"]), Path(job["data"])
    work.mkdir(parents=True, exist_ok=True)
    with (work / "log.txt").open("w") as log:  # the workers' own output goes to the run's log
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    system = System(**job["system"])
    pretrained = _pretrain(base, data, job["pretrain_steps"], job["seed"], work) if system.row == PRETRAINED else base
    config = finetune_config(data, job["steps"], work)
    table = compare(config, pretrained, work.parent, [system], seed=job["seed"])  # into work.parent / slug
    return table[system.row]


def _worker_init() -> None:
    import torch

    os.environ.pop("MASTER_PORT", None)  # each worker's one-process group picks a free port of its own
    torch.set_num_threads(1)


def parameters(base: Path, system) -> tuple[float, int]:
    """(activated parameters per token, averaged over the tasks; total parameters) of a row's model,
    without the task heads."""
    from finetune.compare import _init
    from skillnet import SkillNetForMultiTask
    from skillnet.params import activated_parameters

    with tempfile.TemporaryDirectory() as tmp:
        model = SkillNetForMultiTask.from_pretrained(_init(base, system, Path(tmp) / "init", 0))
    active = [activated_parameters(model, {*skills, "generic"} - {system.drop_skill})
              for skills, _, _ in TASKS.values()]
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.", "prompts.")))
    return statistics.mean(active), total


# --- the tables ----------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _average(scores: dict) -> float:
    return statistics.mean(scores[t] for t in TASKS)


def tables(runs: dict, seeds: list[int], conflicts: list[float], sizes: dict) -> tuple[str, dict]:
    """The Markdown report and its numbers: the main table at the default conflict, SkillNet's margin over
    each baseline, the conflict sweep, sparse pretraining, the ablation."""
    def scores(c, row):
        return [runs[_key(c, s, row)] for s in seeds if _key(c, s, row) in runs]

    c0, rows, summary = DEFAULT_CONFLICT, [r.row for r in systems()], {}
    lines = [f"Conflict c = {c0}, {len(seeds)} seeds, mean ± standard deviation over seeds (accuracy for the topics, "
             "entity F1 for tags, in %):", "",
             "| System | activated params | total params | " + " | ".join(TASKS) + " | Avg |",
             "|---|---:|---:|" + "---:|" * (len(TASKS) + 1)]
    for row in [*rows, LONGER, PRETRAINED]:
        done = scores(c0, row)
        if not done:
            continue
        active, total = sizes.get(row, ("", ""))
        per_task = {t: _mean_std([d[t] for d in done]) for t in TASKS}
        summary[row] = {"tasks": per_task, "average": _mean_std([_average(d) for d in done])}
        lines.append(f"| {row} | {active and f'{active / 1e3:.1f}k'} | {total and f'{total / 1e3:.1f}k'} | "
                     + " | ".join(_cell([d[t] for d in done]) for t in TASKS)
                     + f" | {_cell([_average(d) for d in done])} |")
    lines += ["", "SkillNet's average minus each row's, per seed (mean ± standard deviation of the difference; "
              "beyond noise when the mean exceeds 2 standard deviations):", "",
              "| c | " + " | ".join(r for r in rows if r != SKILLNET) + " |", "|---:|" + "---:|" * (len(rows) - 1)]
    summary["margins"] = {}
    for c in conflicts:
        cells = []
        for row in rows:
            if row == SKILLNET:
                continue
            diffs = [_average(runs[_key(c, s, SKILLNET)]) - _average(runs[_key(c, s, row)]) for s in seeds
                     if _key(c, s, row) in runs and _key(c, s, SKILLNET) in runs]
            if len(diffs) < 2:
                cells.append("")
                continue
            mean, std = _mean_std(diffs)
            summary["margins"][f"{c}|{row}"] = (mean, std)
            cells.append(f"{100 * mean:+.1f} ± {100 * std:.1f}{' **' if mean > 2 * std else ''}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "(** beyond 2 standard deviations)", "",
              f"Ablation (SkillNet-NLU's Table 6): each task's change when a skill is left out of every route, "
              f"c = {c0}:",
              "", "| removed | " + " | ".join(TASKS) + " | Avg |", "|---|" + "---:|" * (len(TASKS) + 1)]
    full = {s: runs[_key(c0, s, SKILLNET)] for s in seeds if _key(c0, s, SKILLNET) in runs}
    summary["ablation"] = {}
    for name, _ in SKILLS:
        row = f"SkillNet w/o {name}"
        pairs = [(runs[_key(c0, s, row)], full[s]) for s in seeds if _key(c0, s, row) in runs and s in full]
        if not pairs:
            continue
        change = {t: _mean_std([a[t] - f[t] for a, f in pairs]) for t in TASKS}
        summary["ablation"][name] = change
        lines.append(f"| {name} | " + " | ".join(f"{100 * change[t][0]:+.1f}" for t in TASKS)
                     + f" | {100 * statistics.mean(_average(a) - _average(f) for a, f in pairs):+.1f} |")
    return "\n".join(lines) + "\n", summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r not in ("margins", "ablation")]
    groups = [*TASKS, "average"]
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [summary[row]["tasks"][t] for t in TASKS] + [summary[row]["average"]]
        ax.bar([g + (i - len(rows) / 2 + 0.5) * width for g in range(len(groups))], [100 * m for m, _ in values],
               width, yerr=[100 * s for _, s in values], capsize=2, label=row)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy / entity F1 (%)")
    ax.set_title(f"Generated multi-task data, conflict c = {DEFAULT_CONFLICT}: mean and standard deviation over seeds")
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the benchmark -------------------------------------------------------------------------------------------------

def _key(conflict: float, seed: int, row: str) -> str:
    return f"c={conflict}|seed={seed}|{row}"


def main(argv: list[str] | None = None) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/separation")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, about 3 minutes)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="finetuning steps of every row (default 600, --quick 120)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs at once")
    parser.add_argument("--ffn", type=int, default=WIDTH, help="each skill's FFN width (the baselines' follow)")
    parser.add_argument("--only", choices=PARTS, action="append", help="run these parts only (repeatable)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.workers < 1:
        parser.error("--seeds and --workers must be at least 1")
    steps = args.steps or (120 if args.quick else 600)
    pretrain_steps = steps // 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": steps, "pretrain_steps": pretrain_steps, "conflicts": list(CONFLICTS), "width": WIDTH,
                "ffn": args.ffn}
    results_file = out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = saved.get("runs", {}) if saved.get("settings") == settings else {}

    from data_pipeline.writer import write_shards

    data = {}
    for c in CONFLICTS:
        data[c] = out / "data" / f"c{c}"
        generate(data[c], c)
    text = (data[DEFAULT_CONFLICT] / "unlabeled.txt").read_text().splitlines()
    write_shards(({"__key__": f"s{i}", "txt": line} for i, line in enumerate(text)), data[DEFAULT_CONFLICT] / "shards",
                 "text", "text", progress=False)
    base = base_model(out / "base", args.ffn)
    from finetune.compare import System

    seeds = list(range(args.seeds))
    sweep = {SKILLNET, "Joint dense, activated-matched", "Joint dense, total-matched", "Joint MoE (top-2 of 5)"}
    parts, plan = args.only or PARTS, []  # (conflict, seed, system, steps)
    for seed in seeds:
        for c in CONFLICTS:
            plan += [(c, seed, s, steps) for s in systems(args.ffn)
                     if c == DEFAULT_CONFLICT and "main" in parts or c != DEFAULT_CONFLICT and "sweep" in parts
                     and s.row in sweep]
        if "ablation" in parts:
            plan += [(DEFAULT_CONFLICT, seed, s, steps) for s in ablations()]
        if "pretraining" in parts:
            plan += [(DEFAULT_CONFLICT, seed, System(PRETRAINED), steps),
                     (DEFAULT_CONFLICT, seed, System(LONGER, pretrained=False), steps + pretrain_steps)]
    todo = [p for p in plan if _key(p[0], p[1], p[2].row) not in runs]
    print(f"{len(plan)} runs ({len(plan) - len(todo)} already in {results_file}), {steps} finetuning steps each, "
          f"{args.workers} at once; logs under {out / 'work'}")

    def save():
        results_file.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))

    started = time.perf_counter()
    import multiprocessing

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {}
        for c, seed, system, n in todo:
            key = _key(c, seed, system.row)
            job = {"work": str(out / "work" / f"c{c}" / f"seed{seed}" / system.slug), "base": str(base),
                   "data": str(data[c]), "system": asdict(system), "seed": seed, "steps": n,
                   "pretrain_steps": pretrain_steps}
            futures[pool.submit(run_job, job)] = key
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs", unit=" run"):
            key = futures[future]
            try:
                runs[key] = future.result()
            except Exception as e:  # one failed run is reported, the others go on
                print(f"\n{key} failed ({e}); its log: {out / 'work'}", file=sys.stderr)
                continue
            save()
    sizes = {s.row: parameters(base, s) for s in [*systems(args.ffn), System(LONGER, pretrained=False)]}
    sizes[PRETRAINED] = sizes[LONGER]
    report, summary = tables(runs, seeds, list(CONFLICTS), sizes)
    seconds = time.perf_counter() - started
    report = (f"{len(TASKS)} generated tasks (training examples: "
              + ", ".join(f"{t} {n}" for t, (_, _, n) in TASKS.items()) + f"), {steps} finetuning steps per row "
              f"(sparse pretraining: {pretrain_steps} steps, then {steps}; its same-budget row: "
              f"{steps + pretrain_steps}), {seconds:.0f} s on {args.workers} workers.\n\n" + report)
    (out / "table.md").write_text(report)
    save()
    plot(summary, out / "separation.png")
    print(report)
    print(f"wrote {out / 'table.md'}, {results_file}, {out / 'separation.png'}")
    return 0 if len(runs) >= len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
