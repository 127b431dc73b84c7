"""Downstream task heads over the SkillNet encoder, and the checks of their specs.

A head spec is a dict stored in `config.task_heads[task]`: `{"type": ..., ...}`. Types:

- `classification`: one label per input (text, code or a media input), from the pooled [CLS] vector;
  `labels`: the label names.
- `pair_classification`: the same over a sentence pair (`token_type_ids` mark the second segment).
- `tagging`: one tag per word (the first sub-token of each word carries it), with a linear-chain CRF over
  the words unless `crf: false`; `labels`: the tag names (BIO).
- `span`: start and end of an answer inside the passage (the second segment) of a question-passage pair.
- `retrieval`: contrastive matching of a text query with a candidate of `candidate_modality` (image,
  audio, video or code) through the model's projections; `candidate_task` names the skills the
  candidate side runs (the query side runs the task's own skills).
- `generation`: text to text (summarisation, data-to-text) with the decoder of a model that has
  `num_decoder_layers > 0`; the task's skills run in the encoder and in the decoder at every step.
- `ctc`: speech recognition, characters from audio frames by connectionist temporal classification;
  `labels`: the alphabet (single characters; index 0 of the output is the CTC blank).

Any spec may add `prompts: {length: n, instance_wise: bool}`: prompt tuning (`modeling.PromptEncoder`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .crf import CRF

HEAD_TYPES = ("classification", "pair_classification", "tagging", "span", "retrieval", "ctc", "generation")


def check_head(task: str, spec: dict, config) -> None:
    """Raise a ValueError naming what is wrong with `task`'s head spec."""
    kind = spec.get("type")
    if kind not in HEAD_TYPES:
        raise ValueError(f"task {task!r}: head type {kind!r} is not one of {list(HEAD_TYPES)}")
    if task not in config.tasks:
        raise ValueError(f"task {task!r} has a head but is not in the task table (declare its skills)")
    if kind in ("classification", "pair_classification", "tagging"):
        labels = spec.get("labels")
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"task {task!r}: a {kind} head needs `labels`, a list of distinct names")
    if kind == "tagging":
        bad = [t for t in spec["labels"] if t != "O" and t[:2] not in ("B-", "I-")]
        if spec.get("crf", True) and bad:
            raise ValueError(f"task {task!r}: tags {bad} are not O, B-<type> or I-<type>")
    if kind in ("pair_classification", "span", "tagging", "classification") and spec.get("modality", "text") not in config.modalities:
        raise ValueError(f"task {task!r}: the model has no {spec.get('modality')!r} front-end")
    prompts = spec.get("prompts")
    if prompts is not None and (not isinstance(prompts, dict) or not isinstance(prompts.get("length"), int)
                                or prompts["length"] < 1 or set(prompts) - {"length", "instance_wise"}):
        raise ValueError(f"task {task!r}: prompts must be {{length: n >= 1, instance_wise: true|false}}, got {prompts!r}")
    if kind == "generation":
        if config.num_decoder_layers < 1 or config.decoder_start_token_id is None:
            raise ValueError(f"task {task!r}: a generation head needs a model with num_decoder_layers >= 1 and a "
                             "decoder_start_token_id (an encoder-decoder such as skillnet-nlg-base)")
        if spec.get("prompts"):
            raise ValueError(f"task {task!r}: prompt tuning is not available for generation tasks")
    if kind == "ctc":
        alphabet = spec.get("labels") or []
        if not alphabet or any(len(c) != 1 for c in alphabet) or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"task {task!r}: a ctc head needs `labels`, its alphabet of distinct single characters")
        if "audio" not in config.modalities:
            raise ValueError(f"task {task!r}: speech recognition needs the audio front-end in config.modalities")
    if kind == "retrieval":
        if config.projection_dim <= 0:
            raise ValueError(f"task {task!r}: a retrieval head needs projection_dim > 0 in the model config")
        modality = spec.get("candidate_modality")
        if modality not in config.modalities or modality == "text":
            raise ValueError(f"task {task!r}: candidate_modality must be one of the model's non-text modalities "
                             f"{[m for m in config.modalities if m != 'text']}, got {modality!r}")
        if spec.get("candidate_task", modality) not in config.tasks:
            raise ValueError(f"task {task!r}: candidate_task {spec.get('candidate_task', modality)!r} is not in the task table")


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, encoded, labels=None):
        logits = self.out(self.dropout(encoded.pooler_output))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return loss, logits


class TaggingHead(nn.Module):
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

    def forward(self, encoded, word_mask, labels=None):
        emissions, mask = self.words(self.out(self.dropout(encoded.last_hidden_state)), word_mask.bool())
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


class SpanHead(nn.Module):
    """Start and end logits over the passage tokens (`token_type_ids == 1`, not padding)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.out = nn.Linear(hidden, 2)

    def forward(self, encoded, passage_mask, start_positions=None, end_positions=None):
        logits = self.out(encoded.last_hidden_state).float().masked_fill(~passage_mask.bool()[..., None], -1e4)
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


class CTCHead(nn.Module):
    """Characters per audio frame (after the front-end's 4x subsampling; the [CLS] is left out), trained
    with CTC and decoded greedily (best class per frame, repeats merged, blanks dropped)."""

    def __init__(self, hidden: int, alphabet_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, alphabet_size + 1)

    def forward(self, encoded, labels=None):
        log_probs = self.out(self.dropout(encoded.last_hidden_state[:, 1:])).float().log_softmax(-1)
        lengths = encoded.attention_mask[:, 1:].sum(1)
        loss = None
        if labels is not None:
            keep = labels != -100
            loss = F.ctc_loss(log_probs.transpose(0, 1), labels[keep], lengths, keep.sum(1), blank=0, zero_infinity=True)
        return loss, (log_probs, lengths)

    @staticmethod
    def decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding: label indices (1-based; 0 is the blank) per sample."""
        out = []
        for best, n in zip(log_probs.argmax(-1), lengths.tolist()):
            path = torch.unique_consecutive(best[:n]).tolist()
            out.append([c for c in path if c != 0])
        return out


def make_head(spec: dict, config) -> nn.Module | None:
    kind, hidden, dropout = spec["type"], config.hidden_size, config.hidden_dropout_prob
    if kind in ("classification", "pair_classification"):
        return ClassificationHead(hidden, len(spec["labels"]), dropout)
    if kind == "tagging":
        return TaggingHead(hidden, len(spec["labels"]), dropout, spec.get("crf", True))
    if kind == "span":
        return SpanHead(hidden)
    if kind == "ctc":
        return CTCHead(hidden, len(spec["labels"]), dropout)
    return None  # retrieval: the model's projections
