"""The finetuning config: typed dataclasses merged as defaults <- YAML <- `key=value`, like pretraining's.

    python -m finetune --config finetune/configs/sentiment_analysis.yaml --init runs/tiny/export train.steps=200
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.config import CheckpointConfig, DistributedConfig, build, dump, read_tree, resolve_ds_config, under_root
from training.config import OptimConfig as SharedOptimConfig

from .data import DataFiles

__all__ = ["FinetuneConfig", "load_finetune_config", "dump"]


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
class OptimConfig(SharedOptimConfig):
    lr: float = 5e-5
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    """Examples per process per micro-batch."""
    gradient_accumulation: int = 1
    eval_batch_size: int = 32
    alpha: float = 1.0
    """Task i is drawn with probability proportional to (its training examples)^alpha."""
    eval_every: int = 0
    """Evaluate every this many steps (0: at the end only)."""
    log_every: int = 10
    seed: int = 0
    bf16: str | bool = "auto"
    """"auto": bf16 where the accelerator supports it (not on CPU), true or false."""


@dataclass
class FinetuneConfig:
    init: str = ""
    """An exported model folder (`python -m pretrain.export`) or a finetuned one; `--init` sets it."""
    data_root: str = ""
    """Folder that the tasks' relative data paths are read from, as in pretraining (`data_root=/my/corpus`)."""
    output_dir: str = "runs/finetune"
    tokenizer: str = ""
    """A folder holding tokenizer.json; default: the `init` folder's."""
    tasks: list[TaskSpec] = field(default_factory=list)
    new_skills: list[NewSkill] = field(default_factory=list)
    freeze_old: bool = False
    """Train only what this run adds (new skills, heads, prompts); every parameter of `init` stays as it was."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints under `output_dir/checkpoints`; `resume: auto` continues a killed or preempted run."""
    distributed: DistributedConfig = field(default_factory=lambda: DistributedConfig(ds_config="ds_configs/zero2.json"))
    """The DeepSpeed config; under `accelerate launch --use_deepspeed` accelerate's DeepSpeed settings
    (ZeRO stage, offload, `--deepspeed_config_file`) are used instead of `ds_config`. As in pretraining,
    DeepSpeed steps every parameter at every step: a parameter the step's task did not reach gets no
    gradient, but weight decay and Adam's momentum from earlier steps still move it (`freeze_old` keeps
    parameters as they were)."""

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
            raise ValueError("freeze_old trains only new skills, heads and prompts: "
                             "list new_skills or give tasks prompts")
        if self.train.steps < 1 or self.train.batch_size < 1 or self.train.gradient_accumulation < 1:
            raise ValueError("train.steps, train.batch_size and train.gradient_accumulation must be >= 1")
        if isinstance(self.train.bf16, bool):  # YAML's true/false
            self.train.bf16 = str(self.train.bf16).lower()
        if self.train.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"train.bf16 must be auto, true or false, got {self.train.bf16!r}")
        self.checkpoint.validate()


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """defaults <- YAML file (or a shipped config's name) <- `key=value` overrides."""
    config = build(FinetuneConfig, read_tree(path, overrides, Path(__file__).parent / "configs"))
    root, config.data_root = config.data_root, ""  # resolved: the dumped config reloads to the same paths
    for task in config.tasks:
        task.data.train, task.data.validation = (under_root(root, task.data.train),
                                                 under_root(root, task.data.validation))
        line = task.head.get("template") if isinstance(task.head, dict) else None
        if isinstance(line, str) and "->" not in line:  # a shipped template's name: the model keeps its line
            from skillnet.instructions import resolve_template

            task.head["template"] = resolve_template(task.name, line).line
    config.distributed.ds_config = resolve_ds_config(config.distributed.ds_config)
    config.validate()
    return config
