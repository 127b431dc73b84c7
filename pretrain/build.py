"""The pretraining model as every rank builds it: the same initial weights everywhere, built partitioned
under ZeRO-3 so that no rank holds the whole model, and its skills split over ranks under skill
parallelism."""

from __future__ import annotations

import torch


def build_model(model_config, seed: int, ds_config: dict | None = None):
    """The pretraining model as every rank builds it: the modules' own default initialisation skipped, then
    each module's parameters initialised from `seed`, children first, so every rank starts from the same
    weights. Built whole, every rank initialises the whole model itself (on the CPU, where the same seed
    gives the same weights on every rank; no collective runs before the engine moves the model to its
    device). Under ZeRO-3 (`ds_config` given) the model is built partitioned (`deepspeed.zero.Init`): each
    module's parameters are split over the ranks as soon as it exists and gathered on rank 0 only while they
    are initialised, so no rank ever holds the whole model. Both ways give the same weights. (Skill
    parallelism moves skills after building, so it builds whole.)"""
    import contextlib

    import deepspeed
    from transformers import initialization as init

    from skillnet import SkillNetForPreTraining

    partitioned = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    zero_init = deepspeed.zero.Init(config_dict_or_path=ds_config) if partitioned else contextlib.nullcontext()
    _mmap_threshold(1 << 20)  # the full tensors gathered one module at a time go back to the OS when freed
    with init.no_init_weights(), zero_init:
        model = SkillNetForPreTraining(model_config)
    torch.manual_seed(seed)
    _initialise(model, partitioned)
    _mmap_threshold(32 << 20)  # glibc's own upper bound for the threshold it adapts by default
    model.tie_weights()
    return model


def _initialise(model, partitioned: bool) -> None:
    """Hugging Face's `initialize_weights_zero3`: the same modules in the same order (children first; each
    module with its direct children's parameters, which `_init_weights` may touch), so the same weights
    either way. Partitioned, each module's parameters are gathered on rank 0 alone, initialised there on
    the CPU and scattered back as partitions: the other ranks never hold a whole tensor, rank 0 one
    module's. Whole, every rank initialises every module."""
    import torch.distributed as dist
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    from training.zero.internals import whole_on_rank0

    remote = model.is_remote_code()

    def visit(module, fn):
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        if not partitioned:
            fn(module, remote)
            return
        params = [*module.parameters(recurse=False),
                  *(p for c in module.children() if not isinstance(c, PreTrainedModel)
                    for p in c.parameters(recurse=False))]
        if not params:
            fn(module, remote)
            return
        with whole_on_rank0(list({id(p): p for p in params}.values())):
            if dist.get_rank() == 0:
                fn(module, remote)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)


def _mmap_threshold(size: int) -> None:
    """Serve allocations of at least `size` bytes from their own mappings (glibc), which are returned to the
    OS when freed; by default glibc raises its threshold as large blocks are freed and then keeps the
    gathered-and-freed tensors of a partitioned build in its heap."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def split_skills(model, placement) -> tuple[list, object]:
    """Keep this rank's skills in every skill layer; returns the layers and the group of ranks at this rank's
    position. The skill-parallel groups are DeepSpeed's expert-parallel groups (P consecutive ranks), so
    ZeRO-3 partitions each skill over the ranks at the same position (the expert-data-parallel group)."""
    import torch.distributed as dist

    from training.zero.internals import expert_groups

    from .skill_parallel import shard_skills

    name, group, data_group = expert_groups(placement.size)
    return shard_skills(model, placement, dist.get_rank(group), group, data_group, name), data_group
