"""The file layout of a ZeRO checkpoint (stage 1, 2 or 3), as DeepSpeed writes it: where each parameter's
fp32 values and optimizer states lie in the ranks' optimizer-state files. Read by the exporter and the
universal-checkpoint converter, which stream a checkpoint parameter by parameter without loading it whole.
A DeepSpeed internal (see the package docstring)."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Iterator

import torch

Pieces = list[tuple[int, int, int, int]]
"""Where a parameter's fp32 values lie: (rank, flat group, start, end) slices of the ranks' flat groups, in
order; their concatenation, cut to the parameter's size, is the parameter."""


def _optim_file(folder: Path, rank: int) -> Path:
    """A rank's optimizer states (ZeRO-1 with bf16 names them `bf16_zero_pp_rank_...`)."""
    found = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    if not found:
        raise FileNotFoundError(f"{folder} has no optimizer states of rank {rank}")
    return found[0]


Layout = list[tuple[str, torch.Size, Pieces]]


def parameter_layout(folder: Path, world: int, skip=lambda name: False,
                     frozen_ok: bool = False) -> tuple[Layout, dict[str, torch.Tensor]]:
    """(name, shape, pieces) for every parameter the optimizer holds (but those `skip` names), and the
    buffers. Frozen parameters, which the optimizer does not hold, are refused unless `frozen_ok`. ZeRO-3
    splits every parameter over the ranks (each rank lists its own: under skill parallelism a rank holds
    only its skills, partitioned over the ranks at the same position, which DeepSpeed records per group,
    so the skills of all positions are merged here); ZeRO-1 and -2 split each group's flat vector of
    parameters, laid end to end, into one slice per rank."""
    optim0 = torch.load(_optim_file(folder, 0), map_location="cpu", weights_only=False,
                        mmap=True)["optimizer_state_dict"]
    if int(optim0["zero_stage"]) <= 2:
        return _layout_zero12(folder, world, optim0, frozen_ok)
    layout, seen, buffers = [], set(), {}
    for rank in range(world):
        states = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False, mmap=True)
        if not frozen_ok and [name for name in states.get("frozen_param_shapes") or {} if not skip(name)]:
            raise ValueError(f"{folder} holds frozen parameters, which its optimizer states do not hold")
        optim = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False,
                           mmap=True)["optimizer_state_dict"]
        placement = optim.get("ds_zero_partition_groups")
        for i, group in enumerate(states["param_shapes"]):
            ranks = placement[i]["partition_ranks"] if placement else list(range(world))
            offset = 0
            for name, shape in group.items():
                per_rank = math.ceil(shape.numel() / len(ranks))
                if name not in seen and not skip(name):
                    seen.add(name)
                    layout.append((name, shape, [(r, i, offset, offset + per_rank) for r in ranks]))
                offset += per_rank
        if rank == 0:
            buffers = {name: states["module"][name] for name in states.get("buffer_names", [])}
    return layout, buffers


def _layout_zero12(folder: Path, world: int, optim0: dict, frozen_ok: bool):
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    if not frozen_ok and states.get("frozen_param_shapes"):
        raise ValueError(f"{folder} holds frozen parameters, which its optimizer states do not hold")
    sizes = [t.numel() for t in optim0["single_partition_of_fp32_groups"]]  # one rank's slice of each group
    paddings = optim0.get("param_alignment_paddings")
    layout = []
    for i, group in enumerate(states["param_shapes"]):
        offset = 0
        for j, (name, shape) in enumerate(group.items()):
            start, end, pieces = offset, offset + shape.numel(), []
            for rank in range(start // sizes[i], math.ceil(end / sizes[i]) if end > start else start // sizes[i] + 1):
                lo, hi = max(start, rank * sizes[i]), min(end, (rank + 1) * sizes[i])
                pieces.append((rank, i, lo - rank * sizes[i], hi - rank * sizes[i]))
            layout.append((name, shape, pieces))
            offset = end + (paddings[i][j] if paddings else 0)
    buffers = {name: states["module"][name] for name in states.get("buffer_names", [])}
    return layout, buffers


STATES = ("fp32", "exp_avg", "exp_avg_sq")
"""What a checkpoint holds per parameter element: the fp32 weights and AdamW's two moments."""


def _flat_states(folder: Path, rank: int) -> dict[str, list[torch.Tensor]]:
    """A rank's flat groups, memory-mapped, per state: ZeRO-3 keeps the fp32 weights in `fp32_flat_groups`
    and the optimizer's in `optimizer_state_dict`, ZeRO-1/2 in `single_partition_of_fp32_groups` and
    `base_optimizer_state` (a group's moments may be longer by its alignment padding)."""
    sd = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False,
                    mmap=True)["optimizer_state_dict"]
    zero3 = "fp32_flat_groups" in sd
    fp32 = sd["fp32_flat_groups" if zero3 else "single_partition_of_fp32_groups"]
    state = sd["optimizer_state_dict" if zero3 else "base_optimizer_state"]["state"]
    return {"fp32": fp32, **{key: [state[g][key] for g in range(len(fp32))] for key in STATES[1:]}}


def whole_parameters(folder: Path, world: int, layout: Layout, states: tuple[str, ...] = ("fp32",),
                     batch_bytes: int = 256 * 2**20) -> Iterator[tuple[str, torch.Size, dict[str, torch.Tensor]]]:
    """(name, shape, {state: tensor}) for every parameter of `layout`, in order, each state reassembled
    from the ranks' pieces. The ranks' files are memory-mapped for a batch of parameters at a time (at most
    `batch_bytes` of fp32 values, or one parameter), so memory stays near the batch, not the model."""
    i = 0
    while i < len(layout):
        batch, budget = [], 0
        while i < len(layout) and (not batch or budget + layout[i][1].numel() * 4 * len(states) <= batch_bytes):
            batch.append(layout[i])
            budget += layout[i][1].numel() * 4 * len(states)
            i += 1
        flats = [_flat_states(folder, rank) for rank in range(world)]
        for name, shape, pieces in batch:
            yield name, shape, {key: torch.cat([flats[r][key][g][lo:hi]
                                                for r, g, lo, hi in pieces])[: shape.numel()].view(shape)
                                for key in states}
        del flats
        gc.collect()


def optimizer_settings(folder: Path) -> dict:
    """Rank 0's optimizer state without its per-element tensors: the loss scaler, clipping, DeepSpeed's
    version and, per parameter group, its hyperparameters and step."""
    saved = torch.load(_optim_file(folder, 0), map_location="cpu", weights_only=False, mmap=True)
    sd = saved["optimizer_state_dict"]
    inner = sd.get("optimizer_state_dict") or sd["base_optimizer_state"]
    light = {k: v for k, v in sd.items()
             if k not in ("optimizer_state_dict", "base_optimizer_state", "fp32_flat_groups",
                          "single_partition_of_fp32_groups", "param_slice_mappings")}
    steps = {g: {"step": s["step"]} for g, s in inner["state"].items() if "step" in s}
    return {**light, "ds_version": saved.get("ds_version"), "param_groups": inner["param_groups"],
            "optimizer_state_dict": {"state": steps, "param_groups": inner["param_groups"]}}
