"""Downstream datasets: local JSON (lines), CSV or Parquet files read with Hugging Face `datasets`,
checked against the task's head before any training, turned into examples by the head's type, and collated.

Which fields a row needs is the head type's business (`skillnet.heads`: each module's docstring); their
names are configurable in the task's `data` entry. Media tasks (`retrieval`, `ctc`, `instruction` with a
medium) read WebDataset shards (a shard pattern or a `*.index.json`, as `data_pipeline` writes them) through
the pretraining decoders; a sample that does not decode, or whose `json` fields do not fit its instruction
template, is skipped and counted (`dropped` in results.json), as in pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from skillnet.heads import head_for

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataFiles:
    """A task's files (JSON lines, CSV or Parquet) and the names of the fields its head reads."""

    train: str | None = None
    validation: str | None = None
    text: str = "text"
    text_pair: str = "text_pair"
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    target: str = "target"
    max_length: int = 128


def is_shards(path: str) -> bool:
    return path.endswith((".tar", ".index.json")) or "{" in path or "::" in path


def load_rows(path: str) -> list[dict]:
    """Rows of a local JSON/JSONL, CSV or Parquet file through `datasets`."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use one of {sorted(FORMATS)}")
    if not Path(path).exists():
        raise FileNotFoundError(f"no data file {path}")
    from datasets import load_dataset

    return list(load_dataset(FORMATS[suffix], data_files=str(path), split="train"))


class TaskData:
    """One task's examples, checked and tokenised: `examples` are dicts of 1-d tensors (and metadata)."""

    def __init__(self, task: str, spec: dict, files: DataFiles, tokenizer, split: str = "train",
                 path: str | None = None, media=None):
        """`split`: "train" or "validation" (labelled, read from `files`), or "predict" (`path`, labels
        optional). `media`: the `MediaConfig` decoding media samples (from the model config)."""
        self.task, self.spec, self.files, self.tokenizer = task, spec, files, tokenizer
        self.head = head_for(task, spec)
        self.labelled = split != "predict"
        self.media = media
        path = path or getattr(files, split)
        self.dropped = 0
        if self.head.shard_modality is not None:
            if not is_shards(path):
                raise ValueError(f"task {task!r}: {spec['type']} data are WebDataset shards (a .tar pattern or "
                                 f"an .index.json), got {path}")
            examples = self._read_shards(path, self.head.shard_modality)
        else:
            rows = load_rows(path)
            if not rows:
                raise ValueError(f"task {task!r}: {path} holds no examples")
            examples = [self._example(row, f"task {task!r}, {path} row {i}") for i, row in enumerate(rows)]
        self.examples = [e for e in examples if e is not None]
        self.dropped += len(examples) - len(self.examples)  # cut off by max_length
        if not self.examples:
            raise ValueError(f"task {task!r}: every example of {path} is cut off by data.max_length={files.max_length}")

    def _example(self, row: dict, where: str) -> dict | None:
        return self.head.example(row, self.files, self.tokenizer, self.labelled, where)

    def _read_shards(self, pattern: str, modality: str) -> list[dict | None]:
        """The examples of the shards' decoded samples (corrupt ones skipped and counted, as in pretraining)."""
        from data_pipeline.media import BadSample, decode_sample
        from data_pipeline.shards import SkipCounter, open_source, read_raw_samples

        source = open_source(pattern)
        if source.index.modality != modality:
            raise ValueError(f"task {self.task!r} reads {modality} but {pattern} holds {source.index.modality}")
        skipped, examples, first = SkipCounter(), [], {}
        for url in source.urls:
            for raw in read_raw_samples(url, skipped):
                try:
                    sample = decode_sample(raw, modality, self.media, fields=self.head.reads_fields)
                    try:
                        examples.append(self._example(sample, f"task {self.task!r}, {url} {raw['__key__']}"))
                    except ValueError as e:
                        if not self.head.reads_fields:
                            raise
                        raise BadSample("bad_fields", str(e)) from None  # fields that do not fit the head
                except BadSample as e:
                    skipped.skip(e.reason, url, raw["__key__"], e.detail)
                    first.setdefault(e.reason, e.detail)
        self.dropped = sum(skipped.values())
        if not examples:
            reasons = "; ".join(f"{n} {r}, e.g. {first.get(r) or 'see above'}" for r, n in skipped.most_common())
            raise ValueError(f"task {self.task!r}: {pattern} holds no usable samples ({reasons})")
        return examples


def collate(examples: list[dict], pad_id: int) -> dict:
    """Pad token fields to the longest example (labels with -100), audio frames with a feature mask, stack
    images and videos; a retrieval candidate's inputs go in `candidate`, metadata in a list."""
    batch, candidate = {}, {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key == "meta":
            batch[key] = values
            continue
        target, name = (candidate, key[len("candidate_"):]) if key.startswith("candidate_") else (batch, key)
        if name == "input_features":  # (mel bins, frames): pad the frames
            frames = [v.shape[1] for v in values]
            target[name] = torch.zeros(len(values), values[0].shape[0], max(frames))
            target["feature_attention_mask"] = torch.zeros(len(values), max(frames), dtype=torch.long)
            for i, (v, n) in enumerate(zip(values, frames)):
                target[name][i, :, :n], target["feature_attention_mask"][i, :n] = v, 1
        elif values[0].dim() == 0 or name in ("pixel_values", "pixel_values_videos"):
            target[name] = torch.stack(values)
        else:
            fill = {"input_ids": pad_id, "labels": -100}.get(name, 0)
            target[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=fill)
    if "word_mask" in batch:
        batch["word_mask"] = batch["word_mask"].bool()
    if candidate:
        batch["candidate"] = candidate
    return batch
