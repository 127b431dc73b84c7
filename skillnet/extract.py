"""Per-task extraction: the config of a model that holds only what some tasks run, and where each of its
tensors comes from in the full model.

A task's route is known before any input arrives, so the sub-network it runs is known exactly: the skills
its route (and, for a retrieval head, its candidate side's route) activates in every skill layer, the shared
weights, its head and prompts, and the front-ends of the modalities it reads. Every kept tensor has the
same name in the extracted model as in the full one; only the two embeddings indexed by position in a list
(modality types, and the task-level router's task embedding) keep the rows of the kept entries.
"""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import torch

from .heads import head_for

ROW_INDEXED = ("modality_embeddings.weight", "task_embedding.weight")
"""Suffixes of the tensors whose rows are indexed by `config.modalities` and by the sorted task table."""


def held_tasks(config) -> list[str]:
    return sorted(set(config.tasks) | set(config.task_heads))


def extracted_config(config, tasks: list[str]) -> tuple[object, dict[str, list[int]]]:
    """(the config of the model holding only `tasks`, {row-indexed tensor suffix: the full model's rows it
    keeps}). Raises a ValueError naming what is wrong: no task, or a task the model does not hold."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("extract: name at least one task")
    held = held_tasks(config)
    unknown = [t for t in tasks if t not in held]
    if unknown:
        raise ValueError(f"extract: unknown tasks {unknown}; the model holds tasks {held}")
    heads = [head_for(t, config.task_heads[t]) for t in tasks if t in config.task_heads]
    routes = [*tasks, *(r for h in heads for r in h.routes if r not in tasks)]
    modalities = {"text"} | {config.task_modalities.get(t, "text") for t in routes}
    modalities |= {m for h in heads for m in h.modalities}
    new = copy.deepcopy(config)
    new.modalities = [m for m in config.modalities if m in modalities]
    new.tasks = {t: s for t, s in config.tasks.items() if t in routes}
    new.task_modalities = {t: m for t, m in config.task_modalities.items() if t in routes}
    new.task_heads = {t: s for t, s in config.task_heads.items() if t in tasks}
    new.default_task = config.default_task if config.default_task in tasks else tasks[0]
    if config.router == "skill":
        registry = config.registry
        active = {s for t in routes if t in config.tasks for s in registry.skill_names(t)}
        new.skills = [s for s in config.skills if s["name"] in active]  # in the full model's order: same sums
        if config.generic_skill not in active:
            new.generic_skill = None
    new.extracted_tasks = tasks
    rows = {"modality_embeddings.weight": [config.modalities.index(m) for m in new.modalities],
            "task_embedding.weight": [sorted(config.tasks).index(t) for t in sorted(new.tasks)]}
    return new, rows


def take(name: str, tensor: torch.Tensor, rows: dict[str, list[int]]) -> torch.Tensor:
    """The extracted model's `name` from the full model's tensor of that name."""
    suffix = next((s for s in ROW_INDEXED if name.endswith(s)), None)
    return tensor[rows[suffix]] if suffix else tensor


def task_list(text: str) -> list[str]:
    """`--tasks a,b` of the export commands."""
    return [t.strip() for t in text.split(",") if t.strip()]


def extraction(config: dict, tasks: list[str], architecture: str, out: Path) -> tuple[dict, dict, dict]:
    """For an export of `tasks` only: (the extracted config as a dict, {kept tensor: its shape}, the rows the
    row-indexed tensors keep). Refuses, before anything is read or written, no task, a task the model does not
    hold, and an output folder that exists and is not empty."""
    from .configuration import SkillNetConfig

    modeling = importlib.import_module(".modeling", __package__)  # the class by name (flat code names no package)

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty: an extracted export goes to a new or empty folder")
    extracted, rows = extracted_config(SkillNetConfig.from_dict(config), tasks)
    with torch.device("meta"):
        model = getattr(modeling, architecture)(extracted)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if extracted.tie_word_embeddings else set()
    keep = {name: t.shape for name, t in model.state_dict().items() if name not in tied}  # as saved: no tied copy
    return extracted.to_dict(), keep, rows


def check_holds(keep: dict, held: set[str], where: str) -> None:
    """Refuse a source that lacks tensors the extracted model needs (naming the skills, where they are skills')."""
    missing = sorted(set(keep) - held)
    if missing:
        skills = sorted({m.group(1) for name in missing if (m := re.search(r"\.skills\.([^.]+)\.", name))})
        raise ValueError(f"{where} lacks " + (f"skills {skills} that the tasks run" if skills else
                                               f"{len(missing)} tensors the tasks need, e.g. {missing[0]}"))
