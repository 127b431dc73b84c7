"""Parallelism applied to a pure model from outside, in one place and in this order:

1. build: partitioned under ZeRO-3 (`deepspeed.zero.Init`: no rank ever holds the whole model), whole when
   ZeRO does not partition parameters or the skills are split over ranks (they move after building);
2. skill split (skill parallelism): each rank keeps its own skills of every skill layer;
3. activation checkpointing of every skill layer;
4. optimizer groups: one weight-decay rule, and skills split over ranks in groups of their own (ZeRO
   partitions them over the ranks holding the same skills), or every skill in groups of its own (to be
   offloaded skill by skill, `zero.offload`);
5. the DeepSpeed engine (`zero.initialize`: ZeRO-3's leaf modules and hooks, the batched gradient norm).

The model package knows nothing of any of it."""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from . import zero
from .config import OptimConfig


def parallelize(build: Callable[[dict | None], nn.Module], ds: dict, optim: OptimConfig, steps: int, *,
                split_skills: Callable[[nn.Module], Any] | None = None, activation_checkpointing: bool = False,
                rewarmup: tuple[int, int] | None = None, group_by_skill: bool = False):
    """The engine for the model `build` makes: `build(ds)` builds it partitioned, `build(None)` whole.
    `split_skills(model)` keeps this rank's skills (skill parallelism); what it returns is handed back.
    `rewarmup`: a second warmup of the learning rate (`optim.linear_schedule`). `group_by_skill`: each skill's
    parameters in optimizer groups of their own (`zero.offload.skill_groups`). Returns (engine, split)."""
    from .optim import build_optimizer, parameter_groups
    from .zero.internals import expert_parameter_groups
    from .zero.offload import skill_groups

    model = build(ds if zero.zero_stage(ds) == 3 and split_skills is None else None)
    split = split_skills(model) if split_skills is not None else None
    if activation_checkpointing:
        checkpoint_activations(model)
    groups = expert_parameter_groups(parameter_groups(model, optim.weight_decay))
    if group_by_skill:
        groups = skill_groups(model, groups)
    optimizer, scheduler = build_optimizer(groups, optim, steps, zero.offloads_optimizer(ds), rewarmup)
    return zero.initialize(model, optimizer, scheduler, ds), split


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute every skill layer's activations in the backward instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    from skillnet.layers import SkillNetLayer

    for layer in model.modules():
        if isinstance(layer, SkillNetLayer):
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model
