"""What the training process applies to a model from outside: activation checkpointing. (ZeRO-3 needs
nothing here: every parameter, skills included, is used by the module that holds it, so DeepSpeed's module
hooks gather exactly the skills a step calls.) The model package knows nothing of it."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from skillnet.layers import SkillNetLayer


def parallelize(model: nn.Module, activation_checkpointing: bool) -> nn.Module:
    if activation_checkpointing:
        for layer in model.modules():
            if isinstance(layer, SkillNetLayer):
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model
