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

from .data import DataFiles, TaskData, collate
from .metrics import accuracy, bleu, character_error_rate, rouge_l, span_f1, tag_f1


def _to(batch: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _retrieve(model, data: TaskData, batch_size: int, top: int = 10) -> list[list[str]]:
    """For each query (caption), the keys of the `top` best candidates among all of `data`'s."""
    spec, device = data.spec, next(model.parameters()).device
    modality = spec["candidate_modality"]
    queries, candidates = [], []
    for i in range(0, len(data.examples), batch_size):
        batch = _to({k: v for k, v in collate(data.examples[i:i + batch_size], data.tokenizer.pad_token_id).items()
                     if k != "meta"}, device)
        candidate = batch.pop("candidate")
        queries.append(model.embed("text", data.task, **batch))
        candidates.append(model.embed(modality, spec.get("candidate_task", modality), **candidate))
    similarity = torch.cat(queries) @ torch.cat(candidates).T
    keys = [e["meta"]["key"] for e in data.examples]
    ranked = similarity.argsort(dim=1, descending=True, stable=True)[:, :top]
    return [[keys[j] for j in row] for row in ranked.tolist()]


@torch.no_grad()
def predict(model, data: TaskData, batch_size: int = 32) -> list:
    """One prediction per example of `data`, in order: a label name, tags, an answer, a transcript, or
    (retrieval) the keys of the ten best candidates of the whole set."""
    spec, device = data.spec, next(model.parameters()).device
    was_training = model.training
    model.eval()
    if spec["type"] == "retrieval":
        out = _retrieve(model, data, batch_size)
        model.train(was_training)
        return out
    out = []
    pad = data.tokenizer.pad_token_id
    for i in range(0, len(data.examples), batch_size):
        batch = collate(data.examples[i:i + batch_size], pad)
        meta = batch.pop("meta", None)
        for key in ("labels", "start_positions", "end_positions"):
            batch.pop(key, None)
        if spec["type"] == "generation":
            ids = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), task=data.task,
                                 max_new_tokens=data.files.max_length)
            out += [data.tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]
            continue
        result = model(task=data.task, **_to(batch, device)).logits
        if spec["type"] in ("classification", "pair_classification"):
            out += [spec["labels"][j] for j in result.argmax(-1).tolist()]
        elif spec["type"] == "tagging":
            head = model.heads[data.task]
            out += [[spec["labels"][j] for j in path] for path in head.decode(*result)]
        elif spec["type"] == "span":
            head = model.heads[data.task]
            for (start, end), m in zip(head.best_spans(*result), meta):
                out.append(m["context"][m["offsets"][start][0]:m["offsets"][end][1]].strip())
        elif spec["type"] == "ctc":
            out += ["".join(spec["labels"][c - 1] for c in path) for path in model.heads[data.task].decode(*result)]
    model.train(was_training)
    return out


def gold(data: TaskData) -> list:
    """The labels of `data`'s examples, in the shape `predict` returns (dropped rows excluded)."""
    kind, out = data.spec["type"], []
    labels = data.spec.get("labels")
    for example in data.examples:
        if kind in ("classification", "pair_classification"):
            out.append(labels[int(example["labels"])])
        elif kind == "tagging":
            out.append([labels[j] for j in example["labels"].tolist()])
        elif kind == "span":
            out.append(example["meta"]["answers"])
        elif kind == "ctc":
            out.append(example["meta"]["transcript"])
        elif kind == "generation":
            out.append(example["meta"]["target"])
        else:  # retrieval: a caption's own sample
            out.append(example["meta"]["key"])
    return out


def score(kind: str, predictions: list, references: list) -> dict[str, float]:
    """The task's metric: accuracy, entity F1 of tags, answer exact match and F1, character error rate, or
    recall@1/5/10 (the caption's own sample among the best k of the set)."""
    if kind in ("classification", "pair_classification"):
        return {"accuracy": accuracy(predictions, references)}
    if kind == "tagging":
        return tag_f1(predictions, references)
    if kind == "ctc":
        return {"cer": character_error_rate(predictions, references)}
    if kind == "generation":
        return {"rouge_l": rouge_l(predictions, references), "bleu": bleu(predictions, [[r] for r in references])}
    if kind == "retrieval":
        return {f"recall@{k}": sum(g in p[:k] for p, g in zip(predictions, references)) / len(references)
                for k in (1, 5, 10)}
    return span_f1(predictions, references)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a finetuned model folder")
    parser.add_argument("--task", required=True)
    parser.add_argument("--input", required=True, help="a JSON lines, CSV or Parquet file with the task's fields")
    parser.add_argument("--output", help="where to write the predictions (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
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
            raise ValueError(f"the model has no head for task {args.task!r}; its tasks: {sorted(model.config.task_heads)}")
        fields = json.loads((folder / "task_data.json").read_text()).get(args.task, {}) if (folder / "task_data.json").exists() else {}
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
