"""Tagging (`tagging`): one tag per word, the first sub-token of each word carrying it, with a linear-chain
CRF over the words unless the spec says `crf: false`.

Spec: `labels`, the tag names (BIO: O, B-<type>, I-<type>). Data rows: `tokens` (a list of words) and
`tags` (a list of tag names, one per word).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..crf import CRF
from ..metrics import tag_f1
from .base import Head, field, tensors


class Tagger(nn.Module):
    """Emissions per token; the words' first sub-tokens (`word_mask`) are gathered into left-aligned word
    sequences, scored by a CRF (or per-word cross-entropy)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, crf: bool):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)
        self.crf = CRF(num_labels) if crf else None

    @staticmethod
    def words(emissions: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, tokens, tags), (batch, tokens) bool -> (batch, max words, tags), (batch, max words) bool."""
        counts = word_mask.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("a tagging sample has no words (word_mask is all False)")
        width = int(counts.max())
        mask = torch.arange(width, device=emissions.device)[None] < counts[:, None]
        out = emissions.new_zeros(emissions.shape[0], width, emissions.shape[-1])
        out[mask] = emissions[word_mask]
        return out, mask

    def forward(self, hidden: torch.Tensor, word_mask: torch.Tensor, labels: torch.Tensor | None = None):
        emissions, mask = self.words(self.out(self.dropout(hidden)), word_mask.bool())
        loss = None
        if labels is not None:
            labels = labels[:, : mask.shape[1]]
            if self.crf is not None:
                loss = self.crf(emissions.float(), labels.masked_fill(~mask, 0), mask)
            else:
                loss = F.cross_entropy(emissions.float()[mask], labels[mask])
        return loss, (emissions, mask)

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        if self.crf is not None:
            return self.crf.decode(emissions.float(), mask)
        best = emissions.argmax(-1)
        return [row[m].tolist() for row, m in zip(best, mask)]


class Tagging(Head):
    name = "tagging"
    main_metric = "f1"

    def check(self, config) -> None:
        self.check_labels()
        bad = [t for t in self.spec["labels"] if t != "O" and t[:2] not in ("B-", "I-")]
        if self.spec.get("crf", True) and bad:
            raise ValueError(f"task {self.task!r}: tags {bad} are not O, B-<type> or I-<type>")
        self.check_modality(config)

    def build(self, config) -> nn.Module:
        return Tagger(config.hidden_size, len(self.spec["labels"]), config.hidden_dropout_prob,
                      self.spec.get("crf", True))

    def forward(self, model, word_mask, labels=None, **inputs):
        encoded = model.encode(self.task, **inputs)
        loss, logits = model.heads[self.task](encoded.last_hidden_state, word_mask, labels)
        return loss, logits, encoded.aux_loss

    def example(self, row, fields, tokenizer, labelled, where):
        words = list(field(row, fields.tokens, where))
        tags = list(field(row, fields.tags, where)) if labelled else ["O"] * len(words)
        if not words or len(words) != len(tags):
            raise ValueError(f"{where}: {len(words)} words but {len(tags)} tags (one tag per word, at least one word)")
        labels = [self.label_index(t, where) for t in tags]
        starts, text = [], ""
        for w in words:
            text += " " if text else ""
            starts.append(len(text))
            text += w
        encoding = tokenizer(text, truncation=True, max_length=fields.max_length, return_offsets_mapping=True)
        word_mask, kept = first_tokens(encoding["offset_mapping"], starts)
        if kept < len(words):
            if not labelled:
                raise ValueError(f"{where}: {len(words)} words do not fit data.max_length={fields.max_length} tokens")
            return None  # truncated past some words: left out rather than trained on as a cut sentence
        example = {**tensors(encoding), "word_mask": torch.tensor(word_mask)}
        return {**example, "labels": torch.tensor(labels)} if labelled else example

    def decode(self, logits, meta, model) -> list[list[str]]:
        return [[self.spec["labels"][j] for j in path] for path in model.heads[self.task].decode(*logits)]

    def gold(self, example) -> list[str]:
        return [self.spec["labels"][j] for j in example["labels"].tolist()]

    @classmethod
    def score(cls, predictions, golds):
        return tag_f1(predictions, golds)


def first_tokens(offsets: list[tuple[int, int]], word_starts: list[int]) -> tuple[list[bool], int]:
    """Mark the first token covering each word's first character; returns the mask and words found."""
    mask, found, w = [False] * len(offsets), 0, 0
    for i, (s, e) in enumerate(offsets):
        while w < len(word_starts) and word_starts[w] < s:
            w += 1  # a word whose start no token covers (cut off): skipped
        if e > s and w < len(word_starts) and s <= word_starts[w] < e:
            mask[i], found, w = True, found + 1, w + 1
    return mask, found
