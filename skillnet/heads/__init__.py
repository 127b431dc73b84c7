"""Downstream task heads over the SkillNet encoder: one `Head` class per head type, one module per kind.

A head spec is a dict stored in `config.task_heads[task]`: `{"type": ..., ...}`, `type` naming a head type
(`classification`, `pair_classification`, `tagging`, `span`, `retrieval`, `ctc`, `generation`; each
module's docstring gives its spec's fields and its data's). Every module of this package is imported
here, and a `Head` subclass enters the registry by being defined: a new head type is a new file.

Any spec may add `prompts: {length: n, instance_wise: bool}`: prompt tuning (`modeling.PromptEncoder`).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import HEADS, Head

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HEADS", "Head", "check_head", "head_for", "head_type"]


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
        raise ValueError(f"task {task!r}: prompts must be {{length: n >= 1, instance_wise: true|false}}, got {prompts!r}")
    head.check(config)
