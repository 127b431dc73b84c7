"""Downstream datasets: local JSON (lines), CSV or Parquet files read with Hugging Face `datasets`,
checked against the task's head before any training, tokenised into model inputs, and collated.

Fields per head type (names configurable in the task's `data` entry):
- classification: `text`, `label` (a label name);
- pair_classification: `text`, `text_pair`, `label`;
- tagging: `tokens` (a list of words), `tags` (a list of tag names, one per word);
- span: `question`, `context`, `answers` (SQuAD: `{"text": [...], "answer_start": [...]}`);
- generation: `text` (the source), `target` (the text to generate).

Media tasks read WebDataset shards (a shard pattern or a `*.index.json`, as `data_pipeline` writes them)
through the pretraining decoders: `retrieval` pairs each caption with its image, audio, video or code
sample; `ctc` (speech recognition) reads audio with its transcript as the caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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


def _get(row: dict, name: str, where: str):
    if name not in row:
        raise ValueError(f"{where}: no field {name!r} (fields: {sorted(row)})")
    return row[name]


class TaskData:
    """One task's examples, checked and tokenised: `examples` are dicts of 1-d tensors (and metadata)."""

    def __init__(self, task: str, spec: dict, files: DataFiles, tokenizer, split: str = "train", path: str | None = None,
                 media=None):
        """`split`: "train" or "validation" (labelled, read from `files`), or "predict" (`path`, labels
        optional). `media`: the `MediaConfig` decoding media samples (from the model config)."""
        self.task, self.spec, self.files, self.tokenizer = task, spec, files, tokenizer
        self.labelled = split != "predict"
        self.media = media
        path = path or getattr(files, split)
        self.dropped = 0
        if spec["type"] in ("retrieval", "ctc"):
            if not is_shards(path):
                raise ValueError(f"task {task!r}: {spec['type']} data are WebDataset shards (a .tar pattern or "
                                 f"an .index.json), got {path}")
            self.examples = self._read_shards(path)
        else:
            rows = load_rows(path)
            if not rows:
                raise ValueError(f"task {task!r}: {path} holds no examples")
            self.examples = [self._encode(row, f"task {task!r}, {path} row {i}") for i, row in enumerate(rows)]
            self.examples = [e for e in self.examples if e is not None]
            if not self.examples:
                raise ValueError(f"task {task!r}: every example of {path} is cut off by data.max_length={files.max_length}")

    def _read_shards(self, pattern: str) -> list[dict]:
        """Decoded samples of the shards (corrupt ones skipped and counted, as in pretraining)."""
        from data_pipeline.media import BadSample, decode_sample
        from data_pipeline.shards import SkipCounter, open_source, read_raw_samples

        source = open_source(pattern)
        modality = self.spec.get("candidate_modality", "audio")
        if source.index.modality != modality:
            raise ValueError(f"task {self.task!r} reads {modality} but {pattern} holds {source.index.modality}")
        skipped, examples = SkipCounter(), []
        for url in source.urls:
            for raw in read_raw_samples(url, skipped):
                try:
                    sample = decode_sample(raw, modality, self.media)
                except BadSample as e:
                    skipped.skip(e.reason, url, raw["__key__"], e.detail)
                    continue
                examples.append(self._encode_media(sample, modality, f"task {self.task!r}, {url} {raw['__key__']}"))
        self.dropped = sum(skipped.values())
        if not examples:
            raise ValueError(f"task {self.task!r}: {pattern} holds no usable samples")
        return [e for e in examples if e is not None]

    def _encode_media(self, sample: dict, modality: str, where: str) -> dict | None:
        media = {k: v for k, v in sample.items() if k in ("pixel_values", "input_features", "pixel_values_videos")}
        if self.spec["type"] == "ctc":
            alphabet = self.spec["labels"]
            unknown = sorted({c for c in sample["caption"] if c not in alphabet})
            if unknown:
                raise ValueError(f"{where}: transcript characters {unknown} are not in the head's alphabet")
            example = {**media, "meta": {"key": sample["key"], "transcript": sample["caption"]}}
            if self.labelled:
                example["labels"] = torch.tensor([alphabet.index(c) + 1 for c in sample["caption"]])  # 0: blank
            return example
        caption = self.tokenizer(sample["caption"], truncation=True, max_length=self.files.max_length)
        if modality == "code":
            code = self.tokenizer(sample["code"], truncation=True, max_length=self.files.max_length)
            media = {"input_ids": torch.tensor(code["input_ids"]), "attention_mask": torch.tensor(code["attention_mask"])}
        return {**_tensors(caption), **{f"candidate_{k}": v for k, v in media.items()}, "meta": {"key": sample["key"]}}

    # -- encoding per head type --------------------------------------------------------------------------

    def _label(self, value, where: str) -> int:
        labels = self.spec["labels"]
        if isinstance(value, bool) or value not in labels:
            raise ValueError(f"{where}: label {value!r} is not in the label set {labels}")
        return labels.index(value)

    def _encode(self, row: dict, where: str) -> dict | None:
        f, kind, tok = self.files, self.spec["type"], self.tokenizer
        if kind in ("classification", "pair_classification"):
            pair = _get(row, f.text_pair, where) if kind == "pair_classification" else None
            enc = tok(_get(row, f.text, where), pair, truncation=True, max_length=f.max_length)
            if not self.labelled:
                return _tensors(enc)
            return {**_tensors(enc), "labels": torch.tensor(self._label(_get(row, f.label, where), where))}
        if kind == "tagging":
            return self._encode_tags(row, where)
        if kind == "span":
            return self._encode_span(row, where)
        if kind == "generation":
            enc = tok(_get(row, f.text, where), truncation=True, max_length=f.max_length)
            if not self.labelled:
                return _tensors(enc)
            target = _get(row, f.target, where)
            ids = tok(target, add_special_tokens=False, truncation=True, max_length=f.max_length - 1)["input_ids"]
            return {**_tensors(enc), "labels": torch.tensor(ids + [tok.eos_token_id]), "meta": {"target": target}}
        raise ValueError(f"{where}: head type {kind!r} has no data encoder here")

    def _encode_tags(self, row: dict, where: str) -> dict | None:
        f = self.files
        words = list(_get(row, f.tokens, where))
        tags = list(_get(row, f.tags, where)) if self.labelled else ["O"] * len(words)
        if not words or len(words) != len(tags):
            raise ValueError(f"{where}: {len(words)} words but {len(tags)} tags (one tag per word, at least one word)")
        labels = [self._label(t, where) for t in tags]
        starts, text = [], ""
        for w in words:
            text += " " if text else ""
            starts.append(len(text))
            text += w
        enc = self.tokenizer(text, truncation=True, max_length=f.max_length, return_offsets_mapping=True)
        word_mask, kept = first_tokens(enc["offset_mapping"], starts)
        if kept < len(words):
            if not self.labelled:
                raise ValueError(f"{where}: {len(words)} words do not fit data.max_length={f.max_length} tokens")
            self.dropped += 1  # truncated past some words: skip rather than train on a cut sentence
            return None
        enc.pop("offset_mapping")
        example = {**_tensors(enc), "word_mask": torch.tensor(word_mask)}
        return {**example, "labels": torch.tensor(labels)} if self.labelled else example

    def _encode_span(self, row: dict, where: str) -> dict | None:
        f = self.files
        question, context = _get(row, f.question, where), _get(row, f.context, where)
        if len(self.tokenizer(question, add_special_tokens=False)["input_ids"]) + 4 > f.max_length:
            raise ValueError(f"{where}: the question leaves no room for the passage in data.max_length={f.max_length}")
        if not self.labelled:
            enc = self.tokenizer(question, context, truncation="only_second", max_length=f.max_length,
                                 return_offsets_mapping=True)
            offsets = enc.pop("offset_mapping")
            return {**_tensors(enc), "meta": {"context": context, "offsets": offsets}}
        answers = _get(row, f.answers, where)
        texts, begins = list(answers["text"]), list(answers["answer_start"])
        if not texts or len(texts) != len(begins):
            raise ValueError(f"{where}: answers need as many `text` as `answer_start` entries, at least one")
        for text, begin in zip(texts, begins):
            if not 0 <= begin or context[begin:begin + len(text)] != text or not text:
                raise ValueError(f"{where}: answer {text!r} at {begin} is outside its passage (or does not match it)")
        enc = self.tokenizer(question, context, truncation="only_second", max_length=f.max_length,
                             return_offsets_mapping=True)
        span = char_span_to_tokens(enc, begins[0], begins[0] + len(texts[0]))
        if span is None:
            self.dropped += 1  # the answer was cut off by max_length
            return None
        offsets = enc.pop("offset_mapping")
        example = {**_tensors(enc), "start_positions": torch.tensor(span[0]), "end_positions": torch.tensor(span[1])}
        example["meta"] = {"context": context, "offsets": offsets, "answers": texts}
        return example


def first_tokens(offsets: list[tuple[int, int]], word_starts: list[int]) -> tuple[list[bool], int]:
    """Mark the first token covering each word's first character; returns the mask and words found."""
    mask, found, w = [False] * len(offsets), 0, 0
    for i, (s, e) in enumerate(offsets):
        while w < len(word_starts) and word_starts[w] < s:
            w += 1  # a word whose start no token covers (cut off): skipped
        if e > s and w < len(word_starts) and s <= word_starts[w] < e:
            mask[i], found, w = True, found + 1, w + 1
    return mask, found


def char_span_to_tokens(enc, begin: int, end: int) -> tuple[int, int] | None:
    """The first and last tokens of the passage (sequence 1) covering characters [begin, end)."""
    ids = enc.sequence_ids()
    tokens = [i for i, ((s, e), seq) in enumerate(zip(enc["offset_mapping"], ids)) if seq == 1 and e > begin and s < end]
    return (tokens[0], tokens[-1]) if tokens else None


def _tensors(enc) -> dict:
    return {k: torch.tensor(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


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
