"""The systems of the SkillNet-NLU results table, trained and evaluated on the same data and budget.

    python -m finetune.compare --config <finetune config> --pretrained <exported skill model> --out runs/compare \
        [key=value ...]

Rows: task-specific finetuning (a dense model per task), joint dense, joint MoE (a learned top-2 gate over
7 experts), and the skill model from random initialisation and after sparse pretraining (`--pretrained`,
an export of `python -m pretrain`). Every row has the pretrained model's shape; all but the random-init
row start from its weights, the baselines' FFNs, experts and projections from its generic skill (as the
papers start every system from one pretrained BERT). Columns: each task's main metric and their average;
`table.md` and `results.json` go to `--out`. New skills, `freeze_old` and prompts of the config apply to no row.

`--rows` runs some of them, e.g. `--rows joint_finetuning_dense,skillnet_sparse_pretraining`: the same
instruction tasks (OFA's format) under the dense and the skill router, side by side. `compare()` also takes
other rows (`System`: router, model settings such as FFN width or experts, one model per
task or not, pretrained or random start, a skill left out of every route) and a seed; `benchmarks/separation.py`
runs it that way over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skillnet.heads import head_for
from training import distributed
from training.metrics import quiet_third_party

from .config import load_finetune_config
from .train import prepare, train


@dataclass
class System:
    """A row of the table: its router, whether one model trains per task, whether it starts from the
    pretrained weights, the model settings it changes (FFN width, experts) and, for an ablation, the skill
    every task's route leaves out."""
    row: str
    router: str = "skill"
    per_task: bool = False
    pretrained: bool = True
    model: dict = field(default_factory=dict)
    drop_skill: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.row.lower()).strip("_")


SYSTEMS = [
    System("Task-specific finetuning", "dense", per_task=True),
    System("Joint finetuning (dense)", "dense"),
    System("Joint finetuning (MoE)", "moe", model={"num_experts": 7, "moe_top_k": 2}),  # the papers' MoE
    System("SkillNet, random init", pretrained=False),
    System("SkillNet, sparse pretraining"),
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


def _init(pretrained: Path, system: System, out: Path, seed: int) -> Path:
    """A model of the pretrained one's shape with the system's router and settings, saved with its tokenizer:
    randomly initialised, or with every weight from the pretrained skill model (a dense FFN, each MoE expert
    and each shared projection from its generic skill, as the papers initialise skills and experts from
    BERT's FFN; a tensor whose shape the system changed starts random); only a MoE gate starts random."""
    from safetensors.torch import load_file

    from skillnet import SkillNetConfig, SkillNetForMultiTask

    config = SkillNetConfig.from_pretrained(pretrained)
    config.router, config.task_heads = system.router, {}
    for key, value in system.model.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = SkillNetForMultiTask(config)
    if system.pretrained:
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


def compare(config, pretrained: Path, out: Path, systems: list[System] = SYSTEMS, seed: int | None = None) -> dict:
    """{row: {task: main metric}}; each row trains with `config`'s data, steps and optimizer (and `seed`, for
    its initialisation and data order, in place of the config's)."""
    config = copy.deepcopy(config)
    config.new_skills, config.freeze_old = [], False
    config.train.seed = config.train.seed if seed is None else seed
    for task in config.tasks:
        task.prompts = None
    table = {}
    for system in systems:
        skill_model = system.router == "skill" and not system.model
        init = pretrained if skill_model and system.pretrained else \
            _init(pretrained, system, out / system.slug / "init", config.train.seed)
        groups = [[t] for t in config.tasks] if system.per_task else [config.tasks]
        table[system.row] = {}
        for tasks in groups:
            run = copy.deepcopy(config)
            run.tasks, run.init = copy.deepcopy(tasks), str(init)
            run.output_dir = str(out / system.slug / (tasks[0].name if system.per_task else "joint"))
            for task in run.tasks:
                if system.router != "skill":
                    task.skills = task.skills or ["generic"]  # a task-table entry; the baselines' routing ignores it
                elif system.drop_skill:
                    task.skills = [s for s in _skills(task, init) if s != system.drop_skill]
            results = train(prepare(run))["results"]
            for task in run.tasks:
                table[system.row][task.name] = results[task.name][head_for(task.name, task.head).main_metric]
    return table


def _skills(task, init: Path) -> list[str]:
    """The skills a task's route names: its config's, or the model's task table entry."""
    return list(task.skills or json.loads((init / "config.json").read_text())["tasks"][task.name])


def markdown(table: dict, config) -> str:
    names = [t.name for t in config.tasks]
    kinds = {t.name: head_for(t.name, t.head) for t in config.tasks}
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
    slugs = [s.slug for s in SYSTEMS]
    parser.add_argument("--rows", help=f"the rows to run, comma-separated (default: all): {','.join(slugs)}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    quiet_third_party()
    rows = args.rows.split(",") if args.rows else slugs
    systems = [s for s in SYSTEMS if s.slug in rows]
    try:
        if unknown := [r for r in rows if r not in slugs]:
            raise ValueError(f"--rows: unknown rows {unknown} (rows: {', '.join(slugs)})")
        config = load_finetune_config(args.config, args.overrides)
        pretrained = Path(args.pretrained)
        if json.loads((pretrained / "config.json").read_text()).get("router", "skill") != "skill":
            raise ValueError(f"--pretrained {pretrained} is not a skill model")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        table = compare(config, pretrained, out, systems)
    finally:
        distributed.shutdown()
    text = markdown(table, config)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
