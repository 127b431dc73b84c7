"""The pretraining config: one typed dataclass per component, merged as defaults <- YAML <- `key=value`.

    python -m pretrain --config pretrain/configs/tiny.yaml train.steps=50 optim.lr=3e-4

An unknown key anywhere is an error naming it; the resolved config is written to the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import DataConfig
from training.config import (
    CheckpointConfig,
    OptimConfig,
    apply_overrides,
    build,
    dump,
    read_tree,
    resolve_ds_config,
    under_root,
)
from training.config import DistributedConfig as SharedDistributedConfig

__all__ = ["PretrainConfig", "load_pretrain_config", "dump"]

# What each task trains: masked-token prediction, sentence-pair prediction, contrastive matching of the
# task's input (image, audio, video or code) with its caption, or an instruction's target (a task with a
# template: OFA's format, through the decoder).
OBJECTIVES = ("mlm", "nsp", "contrastive", "instruction")
MOMENTS = ("rescale", "reset", "copy")
DEFAULT_OBJECTIVES = {"masked_lm": "mlm", "masked_code": "mlm", "next_sentence": "nsp", "image": "contrastive",
                      "audio": "contrastive", "video": "contrastive", "code": "contrastive"}


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
    log_samples: bool = False
    """Each rank writes what it trains on, one line per micro-batch, to `samples/rank<r>.jsonl` in the run
    folder: step, task, sample keys and the epoch of its source each was read in. After a resume the steps
    since the checkpoint appear again; the later line is the one trained on."""
    profile_comm: bool = False
    """Time every collective (DeepSpeed's comms logger) to split step time into compute and
    communication; it synchronises around each collective, so leave it off for speed on GPUs."""


@dataclass
class OffloadConfig:
    skills: str = "none"
    """"inactive": under ZeRO-3 with the optimizer offloaded to the CPU, only the shared parameters and the
    skills of the step's tasks (and, prefetched, the next step's) stay on the accelerator; every other
    skill's weights wait in pinned CPU memory beside its optimizer state (`training.zero.offload`).
    "none": every weight partition stays on the accelerator."""


@dataclass
class DistributedConfig(SharedDistributedConfig):
    skill_parallel_size: int = 1
    """Split each skill layer's skills over this many ranks."""
    skill_placement: str = "balanced"
    """"balanced" or "data_local" (ranks get the tasks whose skills they hold)."""
    trace_per_call: bool = True
    """ZeRO-3 records one module trace per kind of model call (task and call in the step) and prefetches
    along it; false: DeepSpeed's single trace, which a change of task breaks."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class PseudoToRealConfig:
    """Pseudo-to-Real (M6-10T): train a model whose layers share weights (`model.layer_sharing`), then delink
    it into the real model (every layer its own copy) and go on training that."""
    delink_at: int | None = None
    """The step after which the run delinks (checkpointed on both sides: `stepN` holds the shared model,
    `stepN-delinked` the real one); None: no delinking."""
    moments: str = "rescale"
    """What each copy's AdamW moments start from: "rescale" (the shared ones over the n depths the layer
    served: m/n, v/n^2), "reset" (zeros, and the learning rate warms up again over `rewarmup_steps`) or
    "copy" (the shared ones as they are)."""
    rewarmup_steps: int = 100
    """With `moments: reset`: steps over which the learning rate rises again from 0 after delinking."""

    def validate(self, steps: int) -> None:
        if self.moments not in MOMENTS:
            raise ValueError(f"pseudo_to_real.moments must be one of {MOMENTS}, got {self.moments!r}")
        if self.delink_at is not None and not 0 < self.delink_at < steps:
            raise ValueError(f"pseudo_to_real.delink_at {self.delink_at} must lie between 0 and train.steps "
                             f"{steps} (excluded)")
        if self.rewarmup_steps < 1:
            raise ValueError("pseudo_to_real.rewarmup_steps must be >= 1")

    def rewarmup(self) -> tuple[int, int] | None:
        """(first step, steps) of the learning rate's second warmup, or None."""
        return (self.delink_at, self.rewarmup_steps) if self.delink_at and self.moments == "reset" else None


@dataclass
class PretrainConfig:
    model: str | dict = "tiny"
    """A shipped model config name, a YAML file, or the SkillNetConfig fields inline; `model.<field>=value`
    overrides one field of a named config (`model: {config: tiny, layer_sharing: all}`)."""
    data_root: str = ""
    """Folder that relative shard, index and tokenizer paths are read from (e.g. the sample corpus)."""
    tokenizer: str = "tokenizer"
    """Folder holding tokenizer.json (relative to data_root)."""
    run_dir: str = "runs/tiny"
    objectives: dict[str, str] = field(default_factory=dict)
    """Task -> objective (mlm, nsp, contrastive, instruction); tasks not listed take DEFAULT_OBJECTIVES, and a
    task with a template (`data.tasks[].template`) "instruction"."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pseudo_to_real: PseudoToRealConfig = field(default_factory=PseudoToRealConfig)

    def model_config(self):
        """The model's `SkillNetConfig`."""
        from skillnet import SkillNetConfig, load_config

        if isinstance(self.model, str):
            return load_config(self.model)
        fields = dict(self.model)
        named = fields.pop("config", None)
        return load_config(named, **fields) if named else SkillNetConfig(**fields)

    def objective(self, task: str) -> str:
        if task in self.objectives:
            return self.objectives[task]
        templated = any(t.name == task and t.template for t in self.data.tasks)
        return "instruction" if templated else DEFAULT_OBJECTIVES.get(task, "")

    def validate(self) -> None:
        self.data.validate()
        for t in self.data.tasks:
            if self.objective(t.name) not in OBJECTIVES:
                raise ValueError(f"task {t.name!r} has no objective: set objectives.{t.name} to one of {OBJECTIVES}")
            if (self.objective(t.name) == "instruction") != bool(t.template):
                raise ValueError(f"task {t.name!r}: the instruction objective and a template "
                                 f"(data.tasks[].template) go together; its objective is {self.objective(t.name)!r}")
        if self.train.steps < 1:
            raise ValueError("train.steps must be >= 1")
        self.pseudo_to_real.validate(self.train.steps)
        self.checkpoint.validate()
        if self.distributed.skill_placement not in ("balanced", "data_local"):
            raise ValueError("distributed.skill_placement must be 'balanced' or 'data_local', "
                             f"got {self.distributed.skill_placement!r}")
        if self.distributed.offload.skills not in ("none", "inactive"):
            raise ValueError(f"distributed.offload.skills must be 'none' or 'inactive', "
                             f"got {self.distributed.offload.skills!r}")
        if any(t.template for t in self.data.tasks) and self.distributed.skill_parallel_size > 1 and \
                self.distributed.skill_placement == "data_local":
            raise ValueError("instruction tasks (data.tasks[].template) do not run under skill parallelism's "
                             "data_local placement yet (balanced placement runs them)")
        if self.distributed.offload.skills != "none" and self.distributed.skill_parallel_size > 1:
            raise ValueError("distributed.offload.skills cannot combine with skill_parallel_size > 1: each rank "
                             "holds only its own skills already")
        if isinstance(self.train.bf16, bool):  # YAML's true/false
            self.train.bf16 = str(self.train.bf16).lower()
        if self.train.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"train.bf16 must be auto, true or false, got {self.train.bf16!r}")


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """defaults <- YAML file <- `key=value` overrides (values parsed as YAML)."""
    tree = read_tree(path, [o for o in overrides if not o.startswith("model.")], Path(__file__).parent / "configs")
    model_overrides = [o for o in overrides if o.startswith("model.")]
    if model_overrides and isinstance(tree.get("model", "tiny"), str):  # fields over a named config
        tree["model"] = {"config": tree.get("model", "tiny")}
    apply_overrides(tree, model_overrides)
    data = tree.pop("data", {}) or {}
    for key, owner in (("batch_size", "train.micro_batch_size"), ("seed", "train.seed")):
        if key in data:
            raise ValueError(f"data.{key} follows {owner}: set that instead")
    config = build(PretrainConfig, tree, "")
    config.data = build(DataConfig, data, "data.")
    config.data.batch_size = config.train.micro_batch_size
    config.data.seed = config.train.seed
    root, config.data_root = config.data_root, ""  # resolved: the dumped config reloads to the same paths
    config.tokenizer = under_root(root, config.tokenizer)
    for source in (source for task in config.data.tasks for source in task.sources):
        source.shards, source.index = under_root(root, source.shards), under_root(root, source.index)
    config.distributed.ds_config = resolve_ds_config(config.distributed.ds_config)
    config.validate()
    return config
