"""The interface of a downstream head type, the registry every head type enters by being defined, and the
look-ups of a spec's type in it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

HEADS: dict[str, type[Head]] = {}
"""Head type name (a spec's `type`) -> its class. A `Head` subclass that sets `name` enters it when it is
defined, so the package's discovery of its modules is the whole registration."""

MEDIA_INPUTS = ("pixel_values", "input_features", "pixel_values_videos")
"""The model inputs of a decoded media sample (`data_pipeline.media.decode_sample`)."""


class Head(ABC):
    """A kind of downstream head, and everything that depends on the kind: the checks of its spec, its
    modules, its forward over the encoder, its examples, predictions and gold answers, and its metric.

    An instance is one task's head: the task's name and its spec (`config.task_heads[task]`). It holds no
    weights: what `build` returns lives in the model as `model.heads[task]`, where checkpoints, ZeRO-3 and
    PEFT find it, and `forward` reaches it, and every other module, by calling it.
    """

    name: ClassVar[str]
    """The spec's `type`."""
    main_metric: ClassVar[str]
    """The one of `score`'s metrics a results table shows."""
    lower_is_better: ClassVar[bool] = False
    """Whether `main_metric` falls as the task improves (an error rate)."""
    targets: ClassVar[tuple[str, ...]] = ("labels",)
    """The example fields that only training reads; prediction leaves them out."""
    reads_fields: ClassVar[bool] = False
    """Whether a shard sample reaches `example` with its `json` member's fields (`fields`), which a sample
    without one is then skipped for."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in HEADS:
                raise ValueError(f"head type {cls.name!r} is defined twice: by {HEADS[cls.name].__module__} "
                                 f"and by {cls.__module__}")
            HEADS[cls.name] = cls

    def __init__(self, task: str, spec: dict):
        self.task, self.spec = task, spec

    # -- the model side ----------------------------------------------------------------------------------

    def check(self, config) -> None:
        """Raise a ValueError naming what in the spec does not fit the model `config`. (The task table entry
        and `prompts` are checked for every type by `skillnet.heads.check_head`.)"""

    def new_tokens(self) -> list[str]:
        """Tokens the head writes that a tokenizer may lack (finetuning adds them, growing the model's token
        embeddings to fit)."""
        return []

    def build(self, config) -> nn.Module | None:
        """The task's own module, kept as `model.heads[task]`; None when the head uses only modules the
        model has anyway (its projections, its decoder)."""
        return None

    @abstractmethod
    def forward(self, model, **inputs) -> tuple[torch.Tensor | None, object, torch.Tensor | None]:
        """Run the task on `inputs` (a collated batch of this head's examples) through `model`, a
        `SkillNetForMultiTask`: (loss without the routers' auxiliary loss or None, logits, auxiliary loss)."""

    # -- the data side -----------------------------------------------------------------------------------

    @property
    def shard_modality(self) -> str | None:
        """The modality of the WebDataset shards the task reads, or None for rows of a JSON, CSV or Parquet
        file."""
        return None

    @property
    def modality(self) -> str:
        """The modality of the encoder's input (what a token of the task costs: `skillnet.params`)."""
        return "text"

    @property
    def routes(self) -> tuple[str, ...]:
        """The tasks whose skills the head runs: its own (what a model extracted for it must keep)."""
        return (self.task,)

    @property
    def modalities(self) -> set[str]:
        """The modalities whose front-ends the head runs."""
        return {self.spec.get("modality", self.modality)}

    @abstractmethod
    def example(self, row: dict, fields, tokenizer, labelled: bool, where: str) -> dict | None:
        """One example (1-d tensors, and `meta` for predictions and gold answers) from a data row, or from a
        decoded shard sample (`data_pipeline.media.decode_sample`) for a head with a `shard_modality`.
        `fields`: the names of the row's fields and `max_length` (`finetune.data.DataFiles`); without
        `labelled`, the row's answer may be missing. None: the row does not fit `max_length`, and is left
        out (and counted)."""

    @abstractmethod
    def gold(self, example: dict):
        """The answer of a labelled example, in the form `predict` gives."""

    def predict(self, model, batches: Iterable[tuple[dict, list | None]], fields, tokenizer) -> list:
        """One prediction per example, in order, from batches of (model inputs without `targets`, the
        examples' `meta`); by default the model's logits of each batch through `decode`."""
        out = []
        for inputs, meta in batches:
            out += self.decode(model(task=self.task, **inputs).logits, meta, model)
        return out

    def decode(self, logits, meta: list | None, model) -> list:
        """A batch's predictions from its logits (`forward`'s second output), for the default `predict`."""
        raise NotImplementedError(f"head type {self.name!r} overrides neither predict nor decode")

    @classmethod
    @abstractmethod
    def score(cls, predictions: list, golds: list) -> dict[str, float]:
        """The task's metrics (`main_metric` among them) over a whole evaluation set. They depend on the
        type alone, so scores can be computed knowing only the type's name."""

    # -- shared by several types -------------------------------------------------------------------------

    def check_labels(self) -> None:
        labels = self.spec.get("labels")
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"task {self.task!r}: a {self.name} head needs `labels`, a list of distinct names")

    def check_modality(self, config) -> None:
        if self.spec.get("modality", "text") not in config.modalities:
            raise ValueError(f"task {self.task!r}: the model has no {self.spec.get('modality')!r} front-end")

    def label_index(self, value, where: str) -> int:
        labels = self.spec["labels"]
        if isinstance(value, bool) or value not in labels:
            raise ValueError(f"{where}: label {value!r} is not in the label set {labels}")
        return labels.index(value)


def head_type(kind: str, task: str | None = None) -> type[Head]:
    """The class of head type `kind`; a ValueError (naming `task`) for an unknown one."""
    if kind not in HEADS:
        where = f"task {task!r}: " if task is not None else ""
        raise ValueError(f"{where}head type {kind!r} is not one of {sorted(HEADS)}")
    return HEADS[kind]


def head_for(task: str, spec: dict) -> Head:
    """`task`'s head, of the type its spec names."""
    return head_type(spec.get("type"), task)(task, spec)


def check_head(task: str, spec: dict, config) -> None:
    """Raise a ValueError naming what is wrong with `task`'s head spec."""
    head = head_for(task, spec)
    if task not in config.tasks:
        raise ValueError(f"task {task!r} has a head but is not in the task table (declare its skills)")
    prompts = spec.get("prompts")
    if prompts is not None and (not isinstance(prompts, dict) or not isinstance(prompts.get("length"), int)
                                or prompts["length"] < 1 or set(prompts) - {"length", "instance_wise"}):
        raise ValueError(f"task {task!r}: prompts must be {{length: n >= 1, instance_wise: true|false}}, "
                         f"got {prompts!r}")
    head.check(config)


def field(row: dict, name: str, where: str):
    """`row[name]`, or a ValueError naming the fields the row has."""
    if name not in row:
        raise ValueError(f"{where}: no field {name!r} (fields: {sorted(row)})")
    return row[name]


def tensors(encoding) -> dict:
    """The model inputs of a tokenizer's output, as tensors."""
    return {k: torch.tensor(v) for k, v in encoding.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
