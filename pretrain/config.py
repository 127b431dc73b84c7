"""The pretraining config: one typed dataclass per component, merged as defaults <- YAML <- `key=value`.

    python -m pretrain --config pretrain/configs/tiny.yaml train.steps=50 optim.lr=3e-4

An unknown key anywhere is an error naming it; the resolved config is written to the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.loader import DataConfig, SourceConfig, TaskConfig

# What each task trains: masked-token prediction, sentence-pair prediction, or contrastive matching of
# the task's input (image, audio, video or code) with its caption.
OBJECTIVES = ("mlm", "nsp", "contrastive")
DEFAULT_OBJECTIVES = {"masked_lm": "mlm", "masked_code": "mlm", "next_sentence": "nsp", "image": "contrastive",
                      "audio": "contrastive", "video": "contrastive", "code": "contrastive"}


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached after `warmup_steps`, then decayed linearly to 0 at `train.steps`."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    """The papers' Adam settings."""
    eps: float = 1e-6


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Samples per rank per forward (the loader's batch size)."""
    gradient_accumulation: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    mlm_probability: float = 0.15
    caption_task: str = "text"
    """The task whose skills encode captions on the text side of contrastive pairs."""
    activation_checkpointing: bool = False
    """Recompute each layer in the backward pass instead of keeping its activations."""
    bf16: str | bool = "auto"
    """"auto": bf16 where the accelerator supports it (not on CPU), true or false. Gradients are
    accumulated and reduced in fp32 either way (the shipped DeepSpeed configs' `data_types` and
    `communication_data_type`)."""
    log_every: int = 10
    profile_comm: bool = False
    """Time every collective (DeepSpeed's comms logger) to split step time into compute and
    communication; it synchronises around each collective, so leave it off for speed on GPUs."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every this many steps (and on the Slurm signal, and at the end)."""
    keep_last: int = 3
    resume: str = "auto"
    """"auto": the newest complete checkpoint in the run folder, if any; "none"; or a checkpoint folder."""


@dataclass
class DistributedConfig:
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed config file; batch size, accumulation, clipping and bf16 are filled from this config."""
    skill_parallel_size: int = 1
    """Split each skill layer's skills over this many ranks."""
    skill_placement: str = "balanced"
    """"balanced" or "data_local" (ranks get the tasks whose skills they hold)."""
    trace_per_call: bool = True
    """ZeRO-3 records one module trace per kind of model call (task and call in the step) and prefetches
    along it; false: DeepSpeed's single trace, which a change of task breaks."""
    ds_overrides: dict = field(default_factory=dict)
    """DeepSpeed config entries merged over the file, nested dicts merged key by key, e.g.
    `distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0`."""


@dataclass
class PretrainConfig:
    model: str | dict = "tiny"
    """A shipped model config name, a YAML file, or the SkillNetConfig fields inline."""
    data_root: str = ""
    """Folder that relative shard, index and tokenizer paths are read from (e.g. the sample corpus)."""
    tokenizer: str = "tokenizer"
    """Folder holding tokenizer.json (relative to data_root)."""
    run_dir: str = "runs/tiny"
    objectives: dict[str, str] = field(default_factory=dict)
    """Task -> objective (mlm, nsp, contrastive); tasks not listed take DEFAULT_OBJECTIVES."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def objective(self, task: str) -> str:
        return self.objectives.get(task, DEFAULT_OBJECTIVES.get(task, ""))

    def validate(self) -> None:
        self.data.validate()
        for t in self.data.tasks:
            if self.objective(t.name) not in OBJECTIVES:
                raise ValueError(f"task {t.name!r} has no objective: set objectives.{t.name} to one of {OBJECTIVES}")
        if self.train.steps < 1 or self.checkpoint.every < 1 or self.checkpoint.keep_last < 1:
            raise ValueError("train.steps, checkpoint.every and checkpoint.keep_last must be >= 1")
        if self.distributed.skill_placement not in ("balanced", "data_local"):
            raise ValueError(f"distributed.skill_placement must be 'balanced' or 'data_local', got {self.distributed.skill_placement!r}")
        if isinstance(self.train.bf16, bool):  # YAML's true/false
            self.train.bf16 = str(self.train.bf16).lower()
        if self.train.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"train.bf16 must be auto, true or false, got {self.train.bf16!r}")


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass fields; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}"
                         f"; {where or 'top level'} keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value, f"{where}{name}.")
        elif hint == tuple[float, float] and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    """Set `a.b.c` in nested dicts; a number picks an entry of a list (`tasks.0.data.train`)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        if isinstance(tree, list):
            if not p.isdigit() or int(p) >= len(tree):
                raise ValueError(f"override {dotted}: {p} is not an index of a list of {len(tree)}")
            tree = tree[int(p)]
        else:
            tree = tree.setdefault(p, {})
        if not isinstance(tree, (dict, list)):
            raise ValueError(f"override {dotted}: {p} is not a section")
    if isinstance(tree, list):
        if not leaf.isdigit() or int(leaf) >= len(tree):
            raise ValueError(f"override {dotted}: {leaf} is not an index of a list of {len(tree)}")
        tree[int(leaf)] = value
    else:
        tree[leaf] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each dotted `key=value` (the value parsed as YAML) in a config tree."""
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {key}: its value is not YAML ({str(e).splitlines()[0]})") from None
        _set(tree, key, parsed)
    return tree


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """defaults <- YAML file <- `key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        shipped = Path(__file__).parent / "configs" / f"{path}.yaml"
        if not shipped.exists():
            raise FileNotFoundError(f"no config file {str(path)!r}")
        path = shipped
    tree = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
    data = tree.pop("data", {}) or {}
    for key, owner in (("batch_size", "train.micro_batch_size"), ("seed", "train.seed")):
        if key in data:
            raise ValueError(f"data.{key} follows {owner}: set that instead")
    config = build(PretrainConfig, tree, "")
    tasks = data.pop("tasks", [])
    config.data = build(DataConfig, data, "data.")
    config.data.tasks = [_task(t, i) for i, t in enumerate(tasks)]
    config.data.batch_size = config.train.micro_batch_size
    config.data.seed = config.train.seed
    if config.data_root:
        root = Path(config.data_root)
        config.tokenizer = str(root / config.tokenizer)
        for task in config.data.tasks:
            for source in task.sources:
                if not source.shards.startswith(("/", "pipe:", "http:", "https:", "s3:", "gs:")):
                    source.shards = str(root / source.shards)
                if source.index and not os.path.isabs(source.index):
                    source.index = str(root / source.index)
        config.data_root = ""  # resolved: the dumped config reloads to the same paths
    ds_config = Path(config.distributed.ds_config)
    shipped = Path(__file__).resolve().parents[1] / ds_config
    if not ds_config.is_absolute() and not ds_config.exists() and shipped.exists():
        config.distributed.ds_config = str(shipped)  # a shipped DeepSpeed config, from any working directory
    config.validate()
    return config


def _task(entry: dict, i: int) -> TaskConfig:
    sources = entry.pop("sources", [])
    task = build(TaskConfig, entry, f"data.tasks[{i}].")
    task.sources = [build(SourceConfig, s, f"data.tasks[{i}].sources[{j}].") for j, s in enumerate(sources)]
    return task


def dump(config: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with load_pretrain_config)."""
    tree = dataclasses.asdict(config)
    tree["optim"]["betas"] = list(tree["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
