"""Classification: one label per input, from the pooled [CLS] vector.

- `classification`: spec `labels` (the label names); data rows `text` and `label` (a label name).
- `pair_classification`: the same over a sentence pair, `token_type_ids` marking the second segment; data
  rows `text`, `text_pair` and `label`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import accuracy
from .base import Head, field, tensors


class Classifier(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.out(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return loss, logits


class Classification(Head):
    name = "classification"
    main_metric = "accuracy"

    def check(self, config) -> None:
        self.check_labels()
        self.check_modality(config)

    def build(self, config) -> nn.Module:
        return Classifier(config.hidden_size, len(self.spec["labels"]), config.hidden_dropout_prob)

    def forward(self, model, labels=None, **inputs):
        encoded = model.encode(self.task, **inputs)
        loss, logits = model.heads[self.task](encoded.pooler_output, labels)
        return loss, logits, encoded.aux_loss

    def second_segment(self, row: dict, fields, where: str) -> str | None:
        return None

    def example(self, row, fields, tokenizer, labelled, where):
        encoding = tokenizer(field(row, fields.text, where), self.second_segment(row, fields, where), truncation=True,
                             max_length=fields.max_length)
        if not labelled:
            return tensors(encoding)
        return {**tensors(encoding), "labels": torch.tensor(self.label_index(field(row, fields.label, where), where))}

    def decode(self, logits, meta, model) -> list[str]:
        return [self.spec["labels"][j] for j in logits.argmax(-1).tolist()]

    def gold(self, example) -> str:
        return self.spec["labels"][int(example["labels"])]

    @classmethod
    def score(cls, predictions, golds):
        return {"accuracy": accuracy(predictions, golds)}


class PairClassification(Classification):
    name = "pair_classification"

    def second_segment(self, row, fields, where):
        return field(row, fields.text_pair, where)
