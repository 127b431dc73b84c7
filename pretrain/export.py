"""Export a ZeRO pretraining checkpoint (stage 1, 2 or 3) as a Hugging Face folder that `from_pretrained` loads.

    python -m pretrain.export runs/tiny/checkpoints/step00000040 runs/tiny/export [--dtype fp32|bf16]
    python -m pretrain.export runs/tiny runs/tiny/export          # the run's newest checkpoint

Streams tensor by tensor: the safetensors header is written first (every shape is known from the
checkpoint), then each parameter is gathered from the ranks' fp32 partitions, cast and appended. A
skill-parallel checkpoint's skills, each held by some of the ranks, are merged into one model. The
partition files are memory-mapped a bounded batch of parameters at a time, so peak memory stays near
the size of the largest batch rather than of the model.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch

from .checkpoint import COMPLETE, complete_checkpoints
from .skill_parallel import PADDING

DTYPES = {"fp32": (torch.float32, "F32"), "bf16": (torch.bfloat16, "BF16")}
BATCH_BYTES = 256 * 2**20  # fp32 bytes of partitions mapped at once


Pieces = list[tuple[int, int, int, int]]
"""Where a parameter's fp32 values lie: (rank, flat group, start, end) slices of the ranks' flat groups, in
order; their concatenation, cut to the parameter's size, is the parameter."""


def _optim_file(folder: Path, rank: int) -> Path:
    """A rank's optimizer states (ZeRO-1 with bf16 names them `bf16_zero_pp_rank_...`)."""
    found = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    if not found:
        raise FileNotFoundError(f"{folder} has no optimizer states of rank {rank}")
    return found[0]


def _layout(folder: Path) -> tuple[list[tuple[str, torch.Size, Pieces]], dict[str, torch.Tensor], int, str]:
    """(name, shape, pieces) for every parameter, the buffers, the rank count and the optimizer-state key
    of the flat fp32 groups. ZeRO-3 splits every parameter over the ranks (each rank lists its own:
    under skill parallelism a rank holds only its skills, partitioned over the ranks at the same position,
    which DeepSpeed records per group, so the skills of all positions are merged here); ZeRO-1 and -2
    split each group's flat vector of parameters, laid end to end, into one slice per rank."""
    world = json.loads((folder / COMPLETE).read_text())["world_size"]
    optim0 = torch.load(_optim_file(folder, 0), map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    if int(optim0["zero_stage"]) <= 2:
        return (*_layout_zero12(folder, world, optim0), world, "single_partition_of_fp32_groups")
    layout, seen, buffers = [], set(), {}
    for rank in range(world):
        states = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False, mmap=True)
        # the padding of skill parallelism is all DeepSpeed finds frozen (no optimizer holds it)
        if [name for name in states.get("frozen_param_shapes") or {} if f".{PADDING}" not in name]:
            raise ValueError(f"{folder} holds frozen parameters; pretraining checkpoints have none")
        optim = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        placement = optim.get("ds_zero_partition_groups")
        for i, group in enumerate(states["param_shapes"]):
            ranks = placement[i]["partition_ranks"] if placement else list(range(world))
            offset = 0
            for name, shape in group.items():
                per_rank = math.ceil(shape.numel() / len(ranks))
                if name not in seen and f".{PADDING}" not in name:  # skill parallelism's unused padding
                    seen.add(name)
                    layout.append((name, shape, [(r, i, offset, offset + per_rank) for r in ranks]))
                offset += per_rank
        if rank == 0:
            buffers = {name: states["module"][name] for name in states.get("buffer_names", [])}
    return layout, buffers, world, "fp32_flat_groups"


def _layout_zero12(folder: Path, world: int, optim0: dict):
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    if states.get("frozen_param_shapes"):
        raise ValueError(f"{folder} holds frozen parameters; pretraining checkpoints have none")
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


def _open_partitions(folder: Path, world: int, key: str) -> list[list[torch.Tensor]]:
    """Each rank's fp32 flat groups, memory-mapped."""
    flats = []
    for rank in range(world):
        state = torch.load(_optim_file(folder, rank), map_location="cpu", weights_only=False, mmap=True)
        flats.append(state["optimizer_state_dict"][key])
    return flats


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """`checkpoint`: a complete checkpoint folder, or a run folder (its newest complete checkpoint)."""
    folder, out = Path(checkpoint), Path(out)
    if not (folder / COMPLETE).exists():
        found = complete_checkpoints(folder / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{folder} is neither a complete checkpoint nor a run folder holding one")
        folder = found[-1]
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}")
    torch_dtype, st_dtype = DTYPES[dtype]
    layout, buffers, world, key = _layout(folder)
    out.mkdir(parents=True, exist_ok=True)

    header, position = {}, 0
    for name, shape, *_ in layout:
        size = shape.numel() * torch_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    for name, tensor in buffers.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL"}[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [position, position + size]}
        position += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes

    from tqdm import tqdm

    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        bar = tqdm(total=len(layout), desc="exporting", unit=" tensors")
        i = 0
        while i < len(layout):
            batch, budget = [], 0
            while i < len(layout) and (not batch or budget + layout[i][1].numel() * 4 <= BATCH_BYTES):
                batch.append(layout[i])
                budget += layout[i][1].numel() * 4
                i += 1
            flats = _open_partitions(folder, world, key)
            for name, shape, pieces in batch:
                full = torch.cat([flats[r][group][lo:hi] for r, group, lo, hi in pieces])[: shape.numel()]
                tensor = full.view(shape).to(torch_dtype).contiguous()
                f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                bar.update(1)
            del flats
            gc.collect()
        for tensor in buffers.values():
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        bar.close()

    config = json.loads((folder / "model_config.json").read_text())
    config["architectures"] = ["SkillNetForPreTraining"]
    config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = folder.parent.parent / "tokenizer"
    if tokenizer.is_dir():
        for file in tokenizer.iterdir():
            shutil.copy2(file, out / file.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, or a run folder (its newest checkpoint)")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
