"""The data configuration (`data:` in a pretraining config): the tasks to mix, their sources, and how
batches are drawn, read and resumed; `DataConfig.validate` refuses what the loader cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field

from .fields import check_modality


@dataclass
class SourceConfig:
    """One dataset feeding a task."""

    shards: str
    """Shard pattern: local paths with braces (`data/img-{000000..000127}.tar`), `::`-separated lists, `pipe:`
    commands, or an index file (`data/img.index.json`) standing for all the shards it lists."""
    index: str | None = None
    """The shard index; by default `<prefix>.index.json` beside the shards."""
    weight: float = 1.0
    """Relative draw weight among the task's sources (per sample)."""


@dataclass
class TaskConfig:
    """A stream of batches for one task: its modality and sources. Its skills come from the model's task table."""

    name: str
    modality: str
    sources: list[SourceConfig] = field(default_factory=list)
    template: str = ""
    """An instruction task's template (`skillnet.instructions`): a template line, or the name of a shipped
    one (`skillnet/templates/ofa.yaml`). Its samples are read with their `json` member's fields (and the caption
    as `caption`); each batch holds the medium, the instruction's tokens (`input_ids`) and the target's
    (`decoder_labels`, -100 after the end). A sample lacking a field, or with a box outside its image, is
    skipped and counted (`bad_fields`)."""

    def instruction(self):
        """The parsed template (`skillnet.instructions.Template`), or None."""
        if not self.template:
            return None
        from skillnet.instructions import resolve_template

        return resolve_template(self.name, self.template)


@dataclass
class DataConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks to mix."""
    batch_size: int = 8
    """Samples per batch on each rank."""
    alpha: float = 1.0
    """Task i is drawn with probability proportional to (its samples)^alpha: 0 uniform, 1 natural."""
    batch_mode: str = "task"
    """"task": each batch is one task (the papers' default); "mixed": each sample draws its own task."""
    shuffle_buffer: int = 256
    """Samples held by each slot's shuffle buffer."""
    shards_per_round: int = 4
    """Shards a slot reads per round; the buffer drains each round, and a resume replays at most one."""
    resample: bool = False
    """Draw each round's shards with replacement (infinite stream, no epochs)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: in the main process)."""
    prefetch_batches: int = 4
    """Batches each worker may have ready ahead: room for tasks whose batches cost very different times."""
    seed: int = 0
    max_text_tokens: int = 128
    """Text, code and captions are truncated to this many tokens."""
    max_consecutive_skips: int = 1000
    """A task whose last this-many drawn samples were all unusable stops the run (its data is broken)."""

    def __post_init__(self):
        self.tasks = [t if isinstance(t, TaskConfig) else TaskConfig(**t) for t in self.tasks]
        for t in self.tasks:
            t.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in t.sources]

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("data: no tasks")
        for t in self.tasks:
            check_modality(t.modality)
            if not t.sources:
                raise ValueError(f"data: task {t.name!r} has no sources")
            template = t.instruction()
            if template is not None:
                media = [s.kind.lower() for s in template.media] or ["text", "code"]
                if len(template.media) > 1 or t.modality not in media:
                    raise ValueError(f"data: task {t.name!r} reads {t.modality} shards, but its template "
                                     f"{template.line!r} reads {', '.join(map(str, template.media)) or 'no medium'}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"data.alpha must be in [0, 1], got {self.alpha}")
        if self.batch_mode not in ("task", "mixed"):
            raise ValueError(f"data.batch_mode must be 'task' or 'mixed', got {self.batch_mode!r}")
        if self.batch_mode == "mixed" and any(t.template for t in self.tasks):
            raise ValueError("data.batch_mode 'mixed' cannot mix instruction tasks (templates): use 'task'")
        if self.batch_mode == "mixed" and len({t.modality for t in self.tasks}) > 1:
            raise ValueError("data.batch_mode 'mixed' needs tasks of one modality (a batch feeds one front-end)")
        if self.batch_size < 1 or self.shuffle_buffer < 1 or self.shards_per_round < 1 or self.num_workers < 0:
            raise ValueError("data: batch_size, shuffle_buffer and shards_per_round must be >= 1, num_workers >= 0")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"data.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
