"""What the training process applies to a model from outside: ZeRO-3 parameter registration and
activation checkpointing. The model package knows nothing of either."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from skillnet.layers import SkillFFN, SkillLinear, SkillNetLayer

from .skill_parallel import SkillParallel


def parallelize(model: nn.Module, activation_checkpointing: bool) -> nn.Module:
    import deepspeed

    # A skill layer reads the weights of the skills it runs (one wide matmul) without calling their
    # modules; ZeRO-3 must gather those weights when the skill layer runs, so they are registered as
    # its external parameters. (Leaf modules would also do, but their backward hook fires once per call,
    # and a contrastive step calls every layer twice before one backward.)
    for module in model.modules():
        if isinstance(module, (SkillFFN, SkillLinear, SkillParallel)):
            for param in module.parameters():
                deepspeed.zero.register_external_parameter(module, param)
    if activation_checkpointing:
        for layer in model.modules():
            if isinstance(layer, SkillNetLayer):
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model
