"""The systems of the SkillNet-NLU results table, trained and evaluated on the same data and budget.

    python -m finetune.compare --config <finetune config> --pretrained <exported skill model> --out runs/compare \
        [key=value ...]

Rows: task-specific finetuning (a dense model per task), joint dense, joint MoE (a learned top-2 gate over
7 experts), and the skill model from random initialisation and after sparse pretraining (`--pretrained`,
an export of `python -m pretrain`). Every row has the pretrained model's shape; all but the random-init
row start from its weights, the baselines' FFNs, experts and projections from its generic skill (as the
papers start every system from one pretrained BERT). Columns: each task's main metric and their average; `table.md` and
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

from skillnet.heads import head_type
from training import distributed

from .config import load_finetune_config
from .train import prepare, train

SYSTEMS = [  # (row, router, one model per task, start from the pretrained weights)
    ("Task-specific finetuning", "dense", True, True),
    ("Joint finetuning (dense)", "dense", False, True),
    ("Joint finetuning (MoE)", "moe", False, True),
    ("SkillNet, random init", "skill", False, False),
    ("SkillNet, sparse pretraining", "skill", False, True),
]


def _generic(name: str, generic: str) -> list[str]:
    """The pretrained skill model's names a baseline parameter takes its weights from: itself, or for a
    dense FFN, an expert or a shared projection, the generic skill's counterpart."""
    if ".experts." in name:  # ...ffn.experts.3.fc1.weight -> ...ffn.skills.generic.fc1.weight
        head, _, tail = name.partition(".experts.")
        return [f"{head}.skills.{generic}.{tail.split('.', 1)[1]}"]
    # ffn.fc1.weight -> ffn.skills.generic.fc1.weight; attn.q.weight -> attn.q.skills.generic.weight
    parts = name.split(".")
    return [name] + [".".join(parts[:i] + ["skills", generic] + parts[i:]) for i in (len(parts) - 2, len(parts) - 1)]


def _init(pretrained: Path, router: str, use_pretrained: bool, out: Path, seed: int) -> Path:
    """A model of the pretrained one's shape with `router`, saved with its tokenizer: randomly initialised,
    or with every weight from the pretrained skill model (a dense FFN, each MoE expert and each shared
    projection from its generic skill, as the papers initialise skills and experts from BERT's FFN); only
    a MoE gate starts random."""
    from safetensors.torch import load_file

    from skillnet import SkillNetConfig, SkillNetForMultiTask

    config = SkillNetConfig.from_pretrained(pretrained)
    config.router, config.task_heads = router, {}
    config.num_experts, config.moe_top_k = 7, 2  # the papers' MoE baseline
    torch.manual_seed(seed)
    model = SkillNetForMultiTask(config)
    if use_pretrained:
        weights = {k: v for f in sorted(pretrained.glob("*.safetensors")) for k, v in load_file(f).items()}
        state = model.state_dict()
        for name, tensor in state.items():
            source = next((n for n in _generic(name, config.generic_skill) if n in weights), None)
            if source is not None and weights[source].shape == tensor.shape:
                tensor.copy_(weights[source])
    model.save_pretrained(out)
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
        init = pretrained if router == "skill" and use_pretrained else \
            _init(pretrained, router, use_pretrained, out / slug / "init", config.train.seed)
        groups = [[t] for t in config.tasks] if per_task else [config.tasks]
        table[row] = {}
        for tasks in groups:
            run = copy.deepcopy(config)
            run.tasks, run.init = copy.deepcopy(tasks), str(init)
            run.output_dir = str(out / slug / (tasks[0].name if per_task else "joint"))
            if router != "skill":
                for task in run.tasks:
                    task.skills = task.skills or ["generic"]  # a task-table entry; the baselines' routing ignores it
            results = train(prepare(run))["results"]
            for task in run.tasks:
                table[row][task.name] = results[task.name][head_type(task.head["type"]).main_metric]
    return table


def markdown(table: dict, config) -> str:
    names = [t.name for t in config.tasks]
    kinds = {t.name: head_type(t.head["type"]) for t in config.tasks}
    header = [f"{n} ({kinds[n].main_metric}{', lower is better' if kinds[n].lower_is_better else ''})" for n in names]
    lines = ["| System | " + " | ".join(header) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for row, scores in table.items():
        better = [scores[n] for n in names if not kinds[n].lower_is_better]
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
    try:
        table = compare(config, pretrained, out)
    finally:
        distributed.shutdown()
    text = markdown(table, config)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
