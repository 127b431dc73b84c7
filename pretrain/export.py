"""Export a ZeRO pretraining checkpoint (stage 1, 2 or 3) as a Hugging Face folder that `from_pretrained` loads.

    python -m pretrain.export runs/tiny/checkpoints/step00000040 runs/tiny/export [--dtype fp32|bf16]
    python -m pretrain.export runs/tiny runs/tiny/export          # the run's newest checkpoint

Streams tensor by tensor: the safetensors header is written first (every shape is known from the
checkpoint), then each parameter is gathered from the ranks' fp32 partitions, cast and appended. A
skill-parallel checkpoint's skills, each held by some of the ranks, are merged into one model. The
partition files are memory-mapped a bounded batch of parameters at a time, so peak memory stays near
the size of the largest batch rather than of the model.

Beside the weights go the run's tokenizer (truncating to the model's positions), the model code as flat
files (`trust_remote_code=True` loads the folder where `skillnet` is not installed: `skillnet.hub`) and a
model card, `README.md`, generated from the config and the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import torch
import yaml

from skillnet.hub import save_model_code, set_model_max_length, write_model_card
from training.checkpoint import COMPLETE, complete_checkpoints
from training.metrics import quiet_third_party
from training.zero.layout import parameter_layout, whole_parameters

from .skill_parallel import PADDING

DTYPES = {"fp32": (torch.float32, "F32"), "bf16": (torch.bfloat16, "BF16")}


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
    complete = json.loads((folder / COMPLETE).read_text())
    world = complete["world_size"]
    # skill parallelism's padding skills are all DeepSpeed finds frozen; they are not part of the model
    layout, buffers = parameter_layout(folder, world, skip=lambda name: f".{PADDING}" in name)
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
        for name, shape, whole in tqdm(whole_parameters(folder, world, layout), total=len(layout), desc="exporting",
                                       unit=" tensors"):
            tensor = whole["fp32"].to(torch_dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        for tensor in buffers.values():
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    config = json.loads((folder / "model_config.json").read_text())
    config["architectures"] = ["SkillNetForPreTraining"]
    config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    run = folder.parent.parent
    if (run / "tokenizer").is_dir():
        for file in (run / "tokenizer").iterdir():
            shutil.copy2(file, out / file.name)
        set_model_max_length(out, config["max_position_embeddings"])
    save_model_code(out)
    _write_card(out, run, complete["step"])
    return out


def _write_card(out: Path, run: Path, step: int) -> None:
    """The export's model card, from the run folder: its resolved config, its data, and the last loss logged
    for each task up to the checkpoint's step (a later step's loss would describe other weights)."""
    config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else None
    tree = yaml.safe_load(config) if config else {}
    data = {t["name"]: [s["shards"] for s in t["sources"]] for t in tree.get("data", {}).get("tasks", [])}
    last = {}
    lines = (run / "steps.jsonl").read_text().splitlines() if (run / "steps.jsonl").exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a killed run
            continue
        if record["step"] <= step:
            names = [n for t in record.get("tasks", []) for n in (t if isinstance(t, list) else [t])]
            last["+".join(sorted(set(names))) or "all"] = {"step": record["step"], "loss": record["loss"]}
    write_model_card(out, config, data, dict(sorted(last.items())),
                     f"The last training loss logged for each task (or group of tasks trained in one step) up to "
                     f"step {step}, the exported checkpoint's (the run's `steps.jsonl`).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, or a run folder (its newest checkpoint)")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        out = export(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
