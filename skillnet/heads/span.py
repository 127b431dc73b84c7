"""Extractive question answering (`span`): the start and end of the answer inside the passage (the second
segment) of a question-passage pair.

Data rows: `question`, `context` and `answers` (SQuAD's `{"text": [...], "answer_start": [...]}`); the
first answer is the one trained on, every answer counts when scoring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import span_f1
from .base import Head, field, tensors


class SpanScorer(nn.Module):
    """Start and end logits over the passage tokens (`passage_mask`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.out = nn.Linear(hidden, 2)

    def forward(self, hidden: torch.Tensor, passage_mask: torch.Tensor, start_positions=None, end_positions=None):
        logits = self.out(hidden).float().masked_fill(~passage_mask.bool()[..., None], -1e4)
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None:
            loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return loss, (start, end)

    @staticmethod
    def best_spans(start: torch.Tensor, end: torch.Tensor, max_length: int = 30) -> list[tuple[int, int]]:
        """The (start, end) token pair with the highest start + end score, start <= end < start + max_length."""
        scores = start[:, :, None] + end[:, None, :]
        n = scores.shape[-1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu().tril(max_length - 1)
        flat = scores.masked_fill(~allowed, float("-inf")).flatten(1).argmax(-1)
        return [(int(i) // n, int(i) % n) for i in flat]


class Span(Head):
    name = "span"
    main_metric = "f1"
    targets = ("start_positions", "end_positions")

    def check(self, config) -> None:
        self.check_modality(config)

    def build(self, config) -> nn.Module:
        return SpanScorer(config.hidden_size)

    def forward(self, model, start_positions=None, end_positions=None, **inputs):
        encoded = model.encode(self.task, **inputs)
        passage = inputs["token_type_ids"].bool() & inputs["attention_mask"].bool()
        loss, logits = model.heads[self.task](encoded.last_hidden_state, passage, start_positions, end_positions)
        return loss, logits, encoded.aux_loss

    def example(self, row, fields, tokenizer, labelled, where):
        question, context = field(row, fields.question, where), field(row, fields.context, where)
        if len(tokenizer(question, add_special_tokens=False)["input_ids"]) + 4 > fields.max_length:
            raise ValueError(f"{where}: the question leaves no room for the passage in "
                             f"data.max_length={fields.max_length}")
        encoding = tokenizer(question, context, truncation="only_second", max_length=fields.max_length,
                             return_offsets_mapping=True)
        meta = {"context": context, "offsets": encoding["offset_mapping"]}
        if not labelled:
            return {**tensors(encoding), "meta": meta}
        answers = field(row, fields.answers, where)
        texts, begins = list(answers["text"]), list(answers["answer_start"])
        if not texts or len(texts) != len(begins):
            raise ValueError(f"{where}: answers need as many `text` as `answer_start` entries, at least one")
        for text, begin in zip(texts, begins):
            if not 0 <= begin or context[begin:begin + len(text)] != text or not text:
                raise ValueError(f"{where}: answer {text!r} at {begin} is outside its passage (or does not match it)")
        span = char_span_to_tokens(encoding, begins[0], begins[0] + len(texts[0]))
        if span is None:
            return None  # the answer was cut off by max_length
        return {**tensors(encoding), "start_positions": torch.tensor(span[0]), "end_positions": torch.tensor(span[1]),
                "meta": {**meta, "answers": texts}}

    def decode(self, logits, meta, model) -> list[str]:
        return [m["context"][m["offsets"][start][0]:m["offsets"][end][1]].strip()
                for (start, end), m in zip(SpanScorer.best_spans(*logits), meta)]

    def gold(self, example) -> list[str]:
        return example["meta"]["answers"]

    @classmethod
    def score(cls, predictions, golds):
        return span_f1(predictions, golds)


def char_span_to_tokens(encoding, begin: int, end: int) -> tuple[int, int] | None:
    """The first and last tokens of the passage (sequence 1) covering characters [begin, end)."""
    ids = encoding.sequence_ids()
    tokens = [i for i, ((s, e), seq) in enumerate(zip(encoding["offset_mapping"], ids))
              if seq == 1 and e > begin and s < end]
    return (tokens[0], tokens[-1]) if tokens else None
