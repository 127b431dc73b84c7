"""The file layout of a ZeRO checkpoint (stage 1, 2 or 3), as DeepSpeed writes it: where each parameter's
fp32 values lie in the ranks' optimizer-state files. Read by the exporter, which streams a checkpoint into
one safetensors file without loading it whole. A DeepSpeed internal (see the package docstring)."""

from __future__ import annotations

import math
from pathlib import Path

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


def parameter_layout(folder: Path, world: int, skip=lambda name: False) -> tuple[Layout, dict[str, torch.Tensor], str]:
    """(name, shape, pieces) for every parameter (but those `skip` names), the buffers and the
    optimizer-state key of the flat fp32 groups. ZeRO-3 splits every parameter over the ranks (each rank lists its own:
    under skill parallelism a rank holds only its skills, partitioned over the ranks at the same position,
    which DeepSpeed records per group, so the skills of all positions are merged here); ZeRO-1 and -2
    split each group's flat vector of parameters, laid end to end, into one slice per rank."""
    optim0 = torch.load(_optim_file(folder, 0), map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    if int(optim0["zero_stage"]) <= 2:
        return (*_layout_zero12(folder, world, optim0), "single_partition_of_fp32_groups")
    layout, seen, buffers = [], set(), {}
    for rank in range(world):
        states = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False, mmap=True)
        if [name for name in states.get("frozen_param_shapes") or {} if not skip(name)]:
            raise ValueError(f"{folder} holds frozen parameters, which its optimizer states do not hold")
        optim = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
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
    return layout, buffers, "fp32_flat_groups"


def _layout_zero12(folder: Path, world: int, optim0: dict):
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    if states.get("frozen_param_shapes"):
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


def open_partitions(folder: Path, world: int, key: str) -> list[list[torch.Tensor]]:
    """Each rank's fp32 flat groups, memory-mapped."""
    flats = []
    for rank in range(world):
        state = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False, mmap=True)
        flats.append(state["optimizer_state_dict"][key])
    return flats
