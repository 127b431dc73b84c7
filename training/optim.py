"""The optimizer and learning-rate schedule of both trainers: AdamW with one weight-decay rule, linear
warmup then linear decay to zero (the papers' schedule)."""

from __future__ import annotations

import torch

from .config import OptimConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """The one weight-decay rule: matrices decay; biases and normalisation weights (vectors, or anything
    named `norm`) do not. A ZeRO-3 partitioned parameter is judged by its own shape (`ds_shape`), not by
    the empty tensor it holds between gathers."""
    return len(getattr(param, "ds_shape", param.shape)) >= 2 and "norm" not in name.lower()


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """The trainable parameters in a decayed and an undecayed group (named, for logs and ZeRO)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], config: OptimConfig, total_steps: int, cpu_adam: bool = False,
                    rewarmup: tuple[int, int] | None = None):
    """AdamW over `groups` and its schedule (`rewarmup`: see `linear_schedule`). `cpu_adam`: DeepSpeed's
    vectorised CPU Adam (in AdamW mode) for an optimizer offloaded to the CPU."""
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.warmup_steps, total_steps,
                                                                                   rewarmup))


def linear_schedule(warmup: int, total: int, rewarmup: tuple[int, int] | None = None):
    """Step -> learning-rate factor: linear warmup over `warmup` steps, then linear decay to 0 at `total`.
    `rewarmup` = (start, steps): from step `start` on, the factor is also scaled by a second linear warmup over
    `steps` steps (after optimizer moments were reset, e.g. by Pseudo-to-Real's delinking)."""
    def factor(step: int) -> float:
        value = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
        if rewarmup is not None and step >= rewarmup[0]:
            value *= min(1.0, (step - rewarmup[0] + 1) / rewarmup[1])
        return value

    return factor
