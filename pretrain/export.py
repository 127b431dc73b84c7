"""Export a ZeRO pretraining checkpoint (stage 1, 2 or 3) as a Hugging Face folder that `from_pretrained` loads.

    python -m pretrain.export runs/tiny/checkpoints/step00000040 runs/tiny/export [--dtype fp32|bf16]
    python -m pretrain.export runs/tiny runs/tiny/export          # the run's newest checkpoint
    python -m pretrain.export runs/tiny runs/tiny/masked_lm --tasks masked_lm   # only what these tasks run

Streams tensor by tensor: the safetensors header is written first (every shape is known from the
checkpoint), then each parameter is gathered from the ranks' fp32 partitions (or, for a checkpoint that
holds only DeepSpeed's universal layout, as `training.delink` writes, read from it), cast and appended. A
skill-parallel checkpoint's skills, each held by some of the ranks, are merged into one model. The
partition files are memory-mapped a bounded batch of parameters at a time, so peak memory stays near
the size of the largest batch rather than of the model.

Beside the weights go the run's tokenizer (truncating to the model's positions), the model code as flat
files (`trust_remote_code=True` loads the folder where `skillnet` is not installed: `skillnet.hub`) and a
model card, `README.md`, generated from the config and the run.

With `--tasks`, the export holds only what those tasks run (`skillnet.extract`): their skills, the shared
weights and the front-ends of their modalities; the other skills' tensors are never read. The output folder
must then be new or empty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from skillnet.extract import check_holds, extraction, take, task_list
from skillnet.hub import save_model_code, set_model_max_length, write_model_card, write_safetensors
from training.checkpoint import COMPLETE, complete_checkpoints
from training.metrics import quiet_third_party
from training.zero import universal
from training.zero.layout import parameter_layout, whole_parameters

from .skill_parallel import PADDING

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", tasks: list[str] | None = None) -> Path:
    """`checkpoint`: a complete checkpoint folder, or a run folder (its newest complete checkpoint); `tasks`:
    keep only what they run."""
    folder, out = Path(checkpoint), Path(out)
    if not (folder / COMPLETE).exists():
        found = complete_checkpoints(folder / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{folder} is neither a complete checkpoint nor a run folder holding one")
        folder = found[-1]
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    complete = json.loads((folder / COMPLETE).read_text())
    world = complete["world_size"]
    config = json.loads((folder / "model_config.json").read_text())
    if tasks is not None:
        config, keep, rows = extraction(config, tasks, "SkillNetForPreTraining", out)
    if complete.get("universal_only"):  # e.g. delinked (`training.delink`): the universal copy alone
        layout, buffers = universal.held_parameters(folder), {}
    else:  # skill parallelism's padding skills are all DeepSpeed finds frozen; they are not part of the model
        layout, buffers = parameter_layout(folder, world, skip=lambda name: f".{PADDING}" in name)
    if tasks is not None:
        check_holds(keep, {name for name, *_ in layout} | set(buffers), f"checkpoint {folder}")
        layout = [entry for entry in layout if entry[0] in keep]
        buffers = {name: take(name, t, rows) for name, t in buffers.items() if name in keep}
    out.mkdir(parents=True, exist_ok=True)

    # a batch's pages of the ranks' files stay resident until the next: an eighth of the export at most
    batch = min(256 * 2**20, max(16 * 2**20, sum(shape.numel() * 4 for _, shape, *_ in layout) // 8))

    def wholes():
        if complete.get("universal_only"):
            yield from ((name, universal.read_parameter(folder, name)) for name, *_ in layout)
        else:
            yield from ((name, whole["fp32"]) for name, _, whole in whole_parameters(folder, world, layout,
                                                                                     batch_bytes=batch))

    def tensors():
        for name, whole in wholes():
            yield name, (take(name, whole, rows) if tasks is not None else whole).to(torch_dtype)
        yield from buffers.items()

    shapes = [(name, keep[name] if tasks is not None else shape, torch_dtype) for name, shape, *_ in layout]
    write_safetensors(out / "model.safetensors", shapes + [(n, t.shape, t.dtype) for n, t in buffers.items()],
                      tensors())

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
    parser.add_argument("--tasks", type=task_list, help="comma-separated tasks: export only what they run")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        out = export(args.checkpoint, args.out, args.dtype, args.tasks)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
