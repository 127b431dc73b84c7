"""The finetuning config: typed dataclasses merged as defaults <- YAML <- `key=value`, like pretraining's.

    python -m finetune --config finetune/configs/sentiment_analysis.yaml --init runs/tiny/export train.steps=200
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.config import apply_overrides, build

from .data import DataFiles


@dataclass
class TaskSpec:
    name: str
    head: dict
    """The head: {type: classification | pair_classification | tagging | span, labels: [...], crf: true}."""
    data: DataFiles
    skills: list[str] | None = None
    """The skills the task activates; leave out to use the model's task table entry."""
    prompts: dict | None = None
    """Prompt tuning: {length: n, instance_wise: false}; with `freeze_old` the backbone stays frozen."""


@dataclass
class NewSkill:
    name: str
    description: str = ""
    init_from: str | None = None
    """The skill it starts as a copy of (default: the generic skill)."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    eval_batch_size: int = 32
    alpha: float = 1.0
    """Task i is drawn with probability proportional to (its training examples)^alpha."""
    eval_every: int = 0
    """Evaluate every this many steps (0: at the end only)."""
    log_every: int = 10
    seed: int = 0


@dataclass
class FinetuneConfig:
    init: str = ""
    """An exported model folder (`python -m pretrain.export`) or a finetuned one; `--init` sets it."""
    output_dir: str = "runs/finetune"
    tokenizer: str = ""
    """A folder holding tokenizer.json; default: the `init` folder's."""
    tasks: list[TaskSpec] = field(default_factory=list)
    new_skills: list[NewSkill] = field(default_factory=list)
    freeze_old: bool = False
    """Train only what this run adds (new skills, heads, prompts); every parameter of `init` stays as it was."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("the config names no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks named twice: {sorted({n for n in names if names.count(n) > 1})}")
        for t in self.tasks:
            if not t.data.train:
                raise ValueError(f"task {t.name!r}: data.train names no file")
        if self.freeze_old and not self.new_skills and not any(t.prompts for t in self.tasks):
            raise ValueError("freeze_old trains only new skills, heads and prompts: list new_skills or give tasks prompts")
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    path = Path(path)
    if not path.exists():
        shipped = Path(__file__).parent / "configs" / f"{path}.yaml"
        if not shipped.exists():
            raise FileNotFoundError(f"no config file {str(path)!r}")
        path = shipped
    tree = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
    tasks, skills = tree.pop("tasks", []) or [], tree.pop("new_skills", []) or []
    config = build(FinetuneConfig, tree)
    config.tasks = []
    for i, entry in enumerate(tasks):
        entry = dict(entry)
        data = build(DataFiles, entry.pop("data", {}) or {}, f"tasks[{i}].data.")
        config.tasks.append(build(TaskSpec, {**entry, "data": data}, f"tasks[{i}]."))
    config.new_skills = [build(NewSkill, s, f"new_skills[{i}].") for i, s in enumerate(skills)]
    config.validate()
    return config


def dump(config: FinetuneConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
