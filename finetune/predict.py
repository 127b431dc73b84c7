"""Predictions of a finetuned model for one of its tasks, and the metric of each task.

    python -m finetune.predict --model runs/finetune/sst --task sentiment_analysis --input test.jsonl \
        [--output predictions.jsonl] [--batch-size 32]

The input file has the task's fields (as in training; labels may be left out), or for media tasks it is
a shard pattern; one JSON line per input is written: `{"prediction": ...}` (a label name, a list of
tags, an answer string, a transcript, generated text, or the keys of the ten best candidates). The same code
writes the evaluation predictions during finetuning, so both agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from skillnet.heads import head_type
from training.distributed import to_device
from training.metrics import quiet_third_party

from .data import DataFiles, TaskData, collate


def _batches(data: TaskData, batch_size: int, device):
    """`data`'s examples in order, collated on `device` without what only training reads: (inputs, meta)."""
    for i in range(0, len(data.examples), batch_size):
        batch = collate(data.examples[i:i + batch_size], data.tokenizer.pad_token_id)
        meta = batch.pop("meta", None)
        for key in data.head.targets:
            batch.pop(key, None)
        yield to_device(batch, device), meta


@torch.no_grad()
def predict(model, data: TaskData, batch_size: int = 32) -> list:
    """One prediction per example of `data`, in order, in the form of its head type: a label name, tags,
    an answer, a transcript, generated text, or (retrieval) the keys of the ten best candidates of the set."""
    was_training = model.training
    model.eval()
    out = data.head.predict(model, _batches(data, batch_size, next(model.parameters()).device), data.files,
                            data.tokenizer)
    model.train(was_training)
    return out


def gold(data: TaskData) -> list:
    """The answers of `data`'s examples, in the form `predict` gives (dropped rows excluded)."""
    return [data.head.gold(example) for example in data.examples]


def score(kind_or_spec: str | dict, predictions: list, references: list) -> dict[str, float]:
    """The metrics of a head type (its name, or a spec naming it) over an evaluation set."""
    kind = kind_or_spec if isinstance(kind_or_spec, str) else kind_or_spec["type"]
    return head_type(kind).score(predictions, references)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a finetuned model folder")
    parser.add_argument("--task", required=True)
    parser.add_argument("--input", required=True, help="a JSON lines, CSV or Parquet file with the task's fields")
    parser.add_argument("--output", help="where to write the predictions (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    quiet_third_party()
    from data_pipeline.media import MediaConfig
    from skillnet import SkillNetForMultiTask
    from skillnet.tokenizer import load_tokenizer

    try:
        folder = Path(args.model)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
        model = SkillNetForMultiTask.from_pretrained(folder)
        spec = model.config.task_heads.get(args.task)
        if spec is None:
            raise ValueError(f"the model has no head for task {args.task!r}; "
                             f"its tasks: {sorted(model.config.task_heads)}")
        fields = (json.loads((folder / "task_data.json").read_text()).get(args.task, {})
                  if (folder / "task_data.json").exists() else {})
        data = TaskData(args.task, spec, DataFiles(**fields), load_tokenizer(folder), "predict", args.input,
                        MediaConfig.from_model(model.config))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [json.dumps({"prediction": p}) for p in predict(model, data, args.batch_size)]
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
