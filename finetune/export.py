"""Export what some tasks of a finetuned model run, as a Hugging Face folder of its own.

    python -m finetune.export runs/finetune/nlu_multitask runs/finetune/sentiment --tasks sentiment_analysis

The finetuned folder (what `python -m finetune` saves: weights, config with heads, tokenizer) is read one
tensor at a time, and only the tensors the tasks run are read at all (`skillnet.extract`: their skills, the
shared weights, their heads and prompts, the front-ends of their modalities). The new folder holds those
weights, the extracted config, the tokenizer, the model code and a model card listing the kept tasks and
skills; for the kept tasks its outputs equal the finetuned model's. It must be a new or empty folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

from skillnet.extract import check_holds, extraction, take, task_list
from skillnet.hub import SAFETENSORS_DTYPES, save_model_code, write_model_card, write_safetensors
from training.metrics import quiet_third_party

WEIGHTS = (".safetensors", ".bin", ".pt")


def export(folder: str | Path, out: str | Path, tasks: list[str]) -> Path:
    from safetensors import safe_open

    folder, out = Path(folder), Path(out)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").exists() or not files:
        raise FileNotFoundError(f"{folder} is not a saved SkillNet model (config.json and safetensors weights)")
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or ["SkillNetForMultiTask"])[0]
    config, keep, rows = extraction(config, tasks, architecture, out)
    by_code = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {name: reader for reader in readers for name in reader.keys()}
        check_holds(keep, set(where), str(folder))
        dtypes = {name: by_code[where[name].get_slice(name).get_dtype()] for name in keep}
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / "model.safetensors", [(n, shape, dtypes[n]) for n, shape in keep.items()],
                          ((name, take(name, where[name].get_tensor(name), rows)) for name in keep))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in folder.iterdir():  # the tokenizer's files
        if file.is_file() and file.suffix not in (*WEIGHTS, ".py") and file.name not in (
                "config.json", "README.md", "model.safetensors.index.json", "task_data.json"):
            shutil.copy2(file, out / file.name)
    if (folder / "task_data.json").exists():  # the kept tasks' data fields, which predict reads
        fields = json.loads((folder / "task_data.json").read_text())
        (out / "task_data.json").write_text(json.dumps({t: f for t, f in fields.items() if t in tasks}, indent=1))
    save_model_code(out)
    write_model_card(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.split("\n")[0])
    parser.add_argument("finetuned", help="a folder `python -m finetune` saved (its output_dir)")
    parser.add_argument("out", help="the new Hugging Face folder")
    parser.add_argument("--tasks", type=task_list, required=True, help="comma-separated tasks to keep")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        out = export(args.finetuned, args.out, args.tasks)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {', '.join(args.tasks)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
