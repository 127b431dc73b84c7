"""What the training process applies to a model from outside: ZeRO-3 external parameters for skill
parallelism, and activation checkpointing. (Otherwise ZeRO-3 needs nothing here: every parameter, skills included, is
used by the module that holds it, so DeepSpeed's module hooks gather exactly the skills a step calls.)
The model package knows nothing of either."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from skillnet.layers import SkillNetLayer

from .skill_parallel import SkillParallel


def parallelize(model: nn.Module, activation_checkpointing: bool) -> nn.Module:
    import deepspeed

    for module in model.modules():
        if isinstance(module, SkillParallel):
            # Each rank holds other skills, but ZeRO-3 demands the same module calls on every rank: a
            # skill-parallel layer reads its skills' weights, registered as its external parameters
            # (its padding is empty: gathering it costs nothing).
            for param in module.parameters():
                deepspeed.zero.register_external_parameter(module, param)
    if activation_checkpointing:
        for layer in model.modules():
            if isinstance(layer, SkillNetLayer):
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model
