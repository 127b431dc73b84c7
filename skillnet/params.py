"""Parameter accounting: total parameters and the parameters a task activates ("#Params Activated")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_SKILL = re.compile(r"\.skills\.([^.]+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FRONTEND = re.compile(r"(?:^|\.)frontends\.([^.]+)\.")
_HEADS = ("mlm_", "pair_head", "projections.", "logit_scale", "lm_head")


@dataclass
class ParameterCount:
    total: int
    per_skill: dict[str, int]
    per_task: dict[str, int]


def _experts_used_per_token(config) -> int:
    return {"moe": config.moe_top_k, "prototype": config.prototype_groups, "task_router": 1}.get(config.router, 0)


def activated_parameters(model: nn.Module, skills: set[str], modality: str = "text") -> int:
    """Parameters that process one token of `modality` when `skills` are active, without task heads.

    Skill parameters count only for active skills, expert parameters for the experts one token uses
    (top-k, one per prototype group, or the one the task router picks), front-ends and rows of the
    modality-type embedding only for `modality`.
    """
    config = model.config
    front = "text" if modality == "code" else modality
    used, expert_sizes = 0, {}
    for name, p in model.named_parameters():
        if any(h in name for h in _HEADS):
            continue
        if (m := _FRONTEND.search(name)) and m.group(1) != front:
            continue
        if (s := _SKILL.search(name)) and s.group(1) not in skills:
            continue
        if name.endswith("modality_embeddings.weight"):  # one row per modality: a token reads its own
            used += p.numel() // p.shape[0]
            continue
        if e := _EXPERT.search(name):
            layer = name[: e.start()]
            expert_sizes[layer] = expert_sizes.get(layer, 0) + p.numel()
            continue
        used += p.numel()
    if expert_sizes:
        per_expert = sum(expert_sizes.values()) // config.num_experts
        used += per_expert * _experts_used_per_token(config)
    return used


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total parameters, parameters of each skill (over all layers) and activated parameters per task."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    per_skill = {s["name"]: 0 for s in config.skills} if config.router == "skill" else {}
    for name, p in model.named_parameters():
        if (m := _SKILL.search(name)) and m.group(1) in per_skill:
            per_skill[m.group(1)] += p.numel()
    per_task = {}
    registry = config.registry if config.skills else None
    for task in config.tasks:
        skills = {registry.names[i] for i in registry.task_skills(task)} if registry else set()
        per_task[task] = activated_parameters(model, skills, config.task_modalities.get(task, "text"))
    return ParameterCount(total, per_skill, per_task)
