"""The systems of the SkillNet-NLU results table, trained and evaluated on the same data and budget.

    python -m finetune.compare --config <finetune config> --pretrained <exported skill model> --out runs/compare [key=value ...]

Rows: task-specific finetuning (a dense model per task), joint dense, joint MoE (a learned top-2 gate over
7 experts), and the skill model from random initialisation and after sparse pretraining (`--pretrained`,
an export of `python -m pretrain`). Every row starts from a model of the pretrained one's shape; only the
last row takes its weights. Columns: each task's main metric and their average; `table.md` and
`results.json` go to `--out`. New skills, `freeze_old` and prompts of the config apply to no row.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch

from .config import load_finetune_config
from .train import prepare, train

SYSTEMS = [  # (row, router, one model per task, pretrained weights)
    ("Task-specific finetuning", "dense", True, False),
    ("Joint finetuning (dense)", "dense", False, False),
    ("Joint finetuning (MoE)", "moe", False, False),
    ("SkillNet, random init", "skill", False, False),
    ("SkillNet, sparse pretraining", "skill", False, True),
]
MAIN_METRIC = {"classification": "accuracy", "pair_classification": "accuracy", "tagging": "f1", "span": "f1",
               "retrieval": "recall@1", "generation": "rouge_l", "ctc": "cer"}


def _fresh(pretrained: Path, router: str, out: Path, seed: int) -> Path:
    """A randomly initialised model of the pretrained one's shape with `router`, saved with its tokenizer."""
    from skillnet import SkillNetConfig, SkillNetForMultiTask

    config = SkillNetConfig.from_pretrained(pretrained)
    config.router, config.task_heads = router, {}
    config.num_experts, config.moe_top_k = 7, 2  # the papers' MoE baseline
    torch.manual_seed(seed)
    SkillNetForMultiTask(config).save_pretrained(out)
    for file in pretrained.iterdir():  # the tokenizer's files
        if file.is_file() and file.name != "config.json" and file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)
    return out


def compare(config, pretrained: Path, out: Path) -> dict:
    """{row: {task: main metric}}; each row trains with `config`'s data, steps and optimizer."""
    config = copy.deepcopy(config)
    config.new_skills, config.freeze_old = [], False
    for task in config.tasks:
        task.prompts = None
    table = {}
    for row, router, per_task, use_pretrained in SYSTEMS:
        slug = row.lower().replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        init = pretrained if use_pretrained else _fresh(pretrained, router, out / slug / "init", config.train.seed)
        groups = [[t] for t in config.tasks] if per_task else [config.tasks]
        table[row] = {}
        for tasks in groups:
            run = copy.deepcopy(config)
            run.tasks, run.init = copy.deepcopy(tasks), str(init)
            run.output_dir = str(out / slug / (tasks[0].name if per_task else "joint"))
            if router != "skill":
                for task in run.tasks:
                    task.skills = task.skills or ["generic"]  # a task-table entry; the baselines' routing ignores it
            results = train(run, prepare(run))
            for task in run.tasks:
                kind = task.head["type"]
                table[row][task.name] = results[task.name][MAIN_METRIC[kind]]
    return table


def markdown(table: dict, config) -> str:
    names = [t.name for t in config.tasks]
    kinds = {t.name: t.head["type"] for t in config.tasks}
    header = [f"{n} ({MAIN_METRIC[kinds[n]]}{', lower is better' if kinds[n] == 'ctc' else ''})" for n in names]
    lines = ["| System | " + " | ".join(header) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for row, scores in table.items():
        better = [scores[n] for n in names if kinds[n] != "ctc"]
        avg = sum(better) / len(better) if better else float("nan")
        lines.append(f"| {row} | " + " | ".join(f"{100 * scores[n]:.1f}" for n in names) + f" | {100 * avg:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a finetuning config: its tasks, data, steps and optimizer")
    parser.add_argument("--pretrained", required=True, help="an exported, sparsely pretrained skill model")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load_finetune_config(args.config, args.overrides)
        pretrained = Path(args.pretrained)
        if json.loads((pretrained / "config.json").read_text()).get("router", "skill") != "skill":
            raise ValueError(f"--pretrained {pretrained} is not a skill model")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    table = compare(config, pretrained, out)
    text = markdown(table, config)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
