"""The workarounds that reach into DeepSpeed's internals (see the package docstring for the list and the
tested versions); each has its test in `tests/test_zero_internals.py`."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def one_reduction(engine):
    """Hold every gradient of the coming backward passes and reduce them once, in parameter order, when the
    context ends (the engine counts it as one micro-step). Needed when the ranks' backward graphs differ
    (skill parallelism): autograd may then reach ZeRO's reductions in a different order on each rank."""
    return engine.coalesce_grad_reduction()


def clear_gradient_partitions(engine) -> None:
    """Zero ZeRO-3's reduced gradient partitions after an optimizer step. A backward writes the slot of each
    parameter it reached and leaves the others alone, so a parameter the step's task does not use (another
    task's skills, heads, front-end) would bring its last gradient into every later step's norm, clipping
    and Adam update, and a resumed run, whose slots start at zero, would train differently."""
    optimizer = engine.optimizer
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
    for flat in getattr(optimizer, "fp32_partitioned_groups_flat", ()):  # an offloaded optimizer's fp32 gradients
        if flat.grad is not None:
            flat.grad.zero_()


@contextlib.contextmanager
def hooks_on_parameter_holders():
    """While a ZeRO-3 engine is set up, put its per-module hooks (fetch and release parameters around each
    call and its backward, record the prefetch trace) only on modules that hold partitioned parameters
    themselves, on z3 leaves and on the model: DeepSpeed hooks every module, and a container that holds
    none (a layer, attention, a skill dictionary, dropout, an activation), or only persistent ones (a
    LayerNorm under the persistence threshold), has nothing to gather, while its hooks cost host time at
    every call and add two autograd nodes each. (A parameter read from outside its module is still gathered
    on access, by DeepSpeed's parameter dictionaries.) Reads `DeepSpeedZeRoOffload._register_deepspeed_module`,
    which numbers the modules and hooks them, after marking the persistent parameters (`ds_persist`)."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils import z3_leaf_module

    original = DeepSpeedZeRoOffload._register_deepspeed_module

    def register(self, module, count=[0]):  # noqa: B006 (DeepSpeed numbers modules across calls the same way)
        partitioned = any(not getattr(p, "ds_persist", False) for p in module.parameters(recurse=False))
        if module is self.module or z3_leaf_module(module) or partitioned:
            return original(self, module, count)
        module.ds_id = count[0]
        module.ds_recompute_parameters = set()
        for child in module.children():
            count[0] += 1
            register(self, child, count)

    DeepSpeedZeRoOffload._register_deepspeed_module = register
    try:
        yield
    finally:
        DeepSpeedZeRoOffload._register_deepspeed_module = original


def batched_grad_norm(optimizer) -> None:
    """Compute a ZeRO optimizer's gradient norm (for clipping) from one `torch._foreach_norm` over the
    gradients instead of one norm, one copy and one kernel per tensor (about 1,900 a step for the base
    model). DeepSpeed's own `get_grad_norm_direct` still does the rest (the all-reduce, the -1 for a
    non-finite norm), handed the vector of per-tensor norms, whose norm is the same. Left alone under
    model parallelism, where DeepSpeed counts each parameter on some ranks only."""
    if optimizer.model_parallel_group is not None or not hasattr(optimizer, "get_grad_norm_direct"):
        return
    original = optimizer.get_grad_norm_direct

    def grad_norm(gradients, params, norm_type=2):
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if float(norm_type) != 2.0 or not grads:
            return original(gradients, params, norm_type)
        return original([torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64))], params, norm_type)

    optimizer.get_grad_norm_direct = grad_norm


def forget_module(module) -> None:
    """Drop the references ZeRO-3 keeps to `module` in module-level state, which `engine.destroy()` leaves:
    the stack of modules in their forward (`parameter_offload.FWD_MODULE_STACK`), where setting up an engine
    puts the model, and the parameter coordinator's cache of what to release after each submodule (an
    `lru_cache` on a method, keyed by coordinator and submodule, filled once a step's trace is complete).
    Clearing that cache costs other live engines a recomputation, nothing else."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    release = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    # the cache sits under DeepSpeed's nvtx wrapper, which keeps it in its closure
    cached = [release, *(cell.cell_contents for cell in release.__closure__ or ())]
    next(f for f in cached if hasattr(f, "cache_clear")).cache_clear()


def expert_groups(size: int) -> tuple[str, object, object]:
    """DeepSpeed's expert-parallel groups of `size` consecutive ranks: (their name, this rank's expert-parallel
    group, its expert-data-parallel group). ZeRO-3 partitions a parameter tagged with the name over the
    expert-data-parallel group (the ranks at the same position)."""
    from deepspeed.utils import groups

    name = f"ep_size_{size}"
    groups._create_expert_and_data_parallel(size)
    return name, groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def tag_expert(param, name: str, data_group) -> None:
    """Mark `param` as held by one expert-parallel position (named `name`) the way DeepSpeed tags AutoEP
    experts: ZeRO-3 partitions it over `data_group` (the ranks at that position) and averages its
    gradients over every rank."""
    param.allreduce = False
    param.group_name = name
    param.ds_zero_placement_family = "autoep_expert"
    param.ds_zero_partition_group_name = name
    param.ds_zero_partition_process_group = data_group


def expert_parameter_groups(groups: list[dict]) -> list[dict]:
    """Optimizer groups with the expert-tagged parameters split into groups of their own (ZeRO partitions
    them over their expert-data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def replay_cpu_adam(engine) -> None:
    """DeepSpeedCPUAdam's kernel (the offloaded optimizer) keeps beta1**t and beta2**t as running float
    products, but a fresh process computes them with pow at its first step, which rounds differently.
    Walk the new kernel through the restored step count (on empty tensors: nothing is updated) so that its
    bias corrections match the uninterrupted run's bit for bit."""
    optimizer = getattr(engine.optimizer, "optimizer", None)
    if not hasattr(optimizer, "ds_opt_adam"):
        return
    steps = max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
    group, empty = optimizer.param_groups[0], torch.zeros(0)
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], *group["betas"], group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)


def _accelerator_sub_groups(engine) -> list:
    """Under ZeRO-3's partial optimizer offload (`offload_optimizer.ratio` < 1): the fp32 partitions of the
    sub-groups stepped on the accelerator, by torch's AdamW (`backup_optimizer`), not by the CPU Adam whose
    state DeepSpeed saves."""
    optimizer = engine.optimizer
    if getattr(optimizer, "backup_optimizer", None) is None:
        return []
    return [optimizer.fp32_partitioned_groups_flat[i] for i, device in optimizer.subgroup_to_device.items()
            if device != "cpu"]


@contextlib.contextmanager
def partial_offload_moments_saved(engine):
    """While a checkpoint is written: the Adam state of the sub-groups the partial optimizer offload steps on
    the accelerator, copied into the CPU Adam's state, which DeepSpeed saves (it saves nothing of the
    `backup_optimizer`'s, so a resumed run would start those sub-groups' moments from zero)."""
    base, backup = getattr(engine.optimizer, "optimizer", None), getattr(engine.optimizer, "backup_optimizer", None)
    lent = [p for p in _accelerator_sub_groups(engine) if p in backup.state]
    for p in lent:
        state = backup.state[p]
        base.state[p] = {"step": int(state["step"]), "exp_avg": state["exp_avg"].cpu(),
                         "exp_avg_sq": state["exp_avg_sq"].cpu()}
    try:
        yield
    finally:
        for p in lent:
            del base.state[p]


def partial_offload_moments_loaded(engine) -> None:
    """After a checkpoint was loaded (as saved, or through its universal copy): the Adam state of the
    sub-groups stepped on the accelerator handed from the CPU Adam, which loaded it, to the `backup_optimizer`
    that steps them (see `partial_offload_moments_saved`)."""
    base, backup = getattr(engine.optimizer, "optimizer", None), getattr(engine.optimizer, "backup_optimizer", None)
    for p in _accelerator_sub_groups(engine):
        state = base.state.pop(p, None)
        if state:
            backup.state[p] = {"step": torch.tensor(float(state["step"])), "exp_avg": state["exp_avg"].to(p.device),
                               "exp_avg_sq": state["exp_avg_sq"].to(p.device)}


def state_bytes(engine) -> dict[str, int]:
    """Bytes of what this rank holds to train, by device type: the module's parameters (ZeRO-3: their
    partitions) and gradients, and everything tensor-valued the optimizer keeps (ZeRO's flat fp32 partitions
    and gradient buffers, the inner optimizer's moments), each storage once. Activations are not counted."""
    seen, held = set(), {}

    def add(value, depth=0):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr())
            if value.device.type != "meta" and storage.nbytes() and key not in seen:
                seen.add(key)
                held[value.device.type] = held.get(value.device.type, 0) + storage.nbytes()
            if value.grad is not None:
                add(value.grad, depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for item in value:
                add(item, depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for item in value.values():
                add(item, depth + 1)

    for param in engine.module.parameters():
        add(param)
        add(getattr(param, "ds_tensor", None))
    optimizer = engine.optimizer
    while optimizer is not None:
        add(list(vars(optimizer).values()))
        add(getattr(optimizer, "state", {}))
        add([group["params"] for group in getattr(optimizer, "param_groups", [])])
        optimizer = getattr(optimizer, "optimizer", None)
    return held


@contextlib.contextmanager
def whole_on_rank0(params: list):
    """ZeRO-3 partitioned parameters whole on rank 0 (on the CPU) inside the context, what rank 0 leaves in
    them scattered back as partitions at its end; the other ranks never hold a whole tensor. Reads
    DeepSpeed's partition layout: the flattened tensor, padded to a multiple of the ranks, split in rank
    order (`ds_tensor`); moved 1M elements at a time, as gloo stages a collective's whole buffer. The
    pieces cross on the device the default group's collectives take (an offloaded partition lives on the
    CPU, which NCCL refuses)."""
    from training.distributed import collective_device

    rank, world, device = dist.get_rank(), dist.get_world_size(), collective_device()

    def pieces(p, flat):  # (slice of this rank's partition, every rank's slice of `flat` on rank 0)
        size = p.ds_tensor.numel()
        for start in range(0, size, 1 << 20):
            end = min(size, start + (1 << 20))
            yield slice(start, end), ([flat[r * size + start:r * size + end] for r in range(world)]
                                      if rank == 0 else None)

    flats = []
    for p in params:
        flat = torch.empty(p.ds_tensor.numel() * world, dtype=p.dtype, device=device) if rank == 0 else None
        for piece, every in pieces(p, flat):
            dist.gather(p.ds_tensor[piece].to(device), every, dst=0)
        if rank == 0:
            p.data = flat[:p.ds_numel].view(p.ds_shape).cpu()
        flats.append(flat)
    yield
    for p, flat in zip(params, flats):
        if rank == 0:
            flat[:p.ds_numel].copy_(p.data.flatten())
            p.data = torch.empty(0, dtype=p.dtype, device=p.ds_tensor.device)
        for piece, every in pieces(p, flat):
            mine = p.ds_tensor[piece]
            received = mine if mine.device == device else torch.empty_like(mine, device=device)
            dist.scatter(received, every, src=0)
            mine.copy_(received)


class CommClock:
    """Seconds spent in collectives, and bytes all-gathered, between calls, from DeepSpeed's comms logger
    (`comms_logger.enabled` in the engine config). Its timer per collective is cumulative (each record
    holds the running total), so the newest record of each collective is kept; message counts are per
    record. The records are cleared on every read, bounding their memory."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.last = 0.0
        self.seconds = 0.0

    def read(self) -> int:
        """Bytes all-gathered since the last read (ZeRO-3's parameter gathers); seconds accumulate in
        `seconds` until `take_seconds`."""
        from deepspeed import comm

        records, gathered = comm.comms_logger.comms_dict, 0
        for name, sizes in records.items():
            self.totals[name] = max([self.totals.get(name, 0.0)] + [max(entry[1]) for entry in sizes.values()])
            if name.startswith("all_gather"):
                gathered += sum(size * entry[0] for size, entry in sizes.items())
        records.clear()
        total = sum(self.totals.values()) / 1000.0
        self.seconds, self.last = self.seconds + total - self.last, total
        return gathered

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds
