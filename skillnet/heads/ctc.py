"""Speech recognition (`ctc`): characters from audio frames by connectionist temporal classification.

Spec: `labels`, the alphabet (single characters; index 0 of the output is the CTC blank). Data: WebDataset
audio shards, each sample's caption its transcript.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import character_error_rate
from .base import MEDIA_INPUTS, Head


class FrameClassifier(nn.Module):
    """Characters per audio frame (after the front-end's 4x subsampling; the [CLS] is left out), trained
    with CTC and decoded greedily (best class per frame, repeats merged, blanks dropped)."""

    def __init__(self, hidden: int, alphabet_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, alphabet_size + 1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        log_probs = self.out(self.dropout(hidden[:, 1:])).float().log_softmax(-1)
        lengths = attention_mask[:, 1:].sum(1)
        loss = None
        if labels is not None:
            keep = labels != -100
            loss = F.ctc_loss(log_probs.transpose(0, 1), labels[keep], lengths, keep.sum(1), blank=0,
                              zero_infinity=True)
        return loss, (log_probs, lengths)

    @staticmethod
    def decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding: label indices (1-based; 0 is the blank) per sample."""
        out = []
        for best, n in zip(log_probs.argmax(-1), lengths.tolist()):
            path = torch.unique_consecutive(best[:n]).tolist()
            out.append([c for c in path if c != 0])
        return out


class CTC(Head):
    name = "ctc"
    main_metric = "cer"
    lower_is_better = True

    def check(self, config) -> None:
        alphabet = self.spec.get("labels") or []
        if not alphabet or any(len(c) != 1 for c in alphabet) or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"task {self.task!r}: a ctc head needs `labels`, "
                             "its alphabet of distinct single characters")
        if "audio" not in config.modalities:
            raise ValueError(f"task {self.task!r}: speech recognition needs the audio front-end in config.modalities")

    def build(self, config) -> nn.Module:
        return FrameClassifier(config.hidden_size, len(self.spec["labels"]), config.hidden_dropout_prob)

    def forward(self, model, labels=None, **inputs):
        encoded = model.encode(self.task, **inputs)
        loss, logits = model.heads[self.task](encoded.last_hidden_state, encoded.attention_mask, labels)
        return loss, logits, encoded.aux_loss

    @property
    def shard_modality(self) -> str:
        return "audio"

    @property
    def modality(self) -> str:
        return "audio"

    def example(self, row, fields, tokenizer, labelled, where):
        alphabet, transcript = self.spec["labels"], row["caption"]
        unknown = sorted({c for c in transcript if c not in alphabet})
        if unknown:
            raise ValueError(f"{where}: transcript characters {unknown} are not in the head's alphabet")
        example = {k: v for k, v in row.items() if k in MEDIA_INPUTS}
        example["meta"] = {"key": row["key"], "transcript": transcript}
        if labelled:
            example["labels"] = torch.tensor([alphabet.index(c) + 1 for c in transcript])  # 0: the blank
        return example

    def decode(self, logits, meta, model) -> list[str]:
        return ["".join(self.spec["labels"][c - 1] for c in path) for path in FrameClassifier.decode(*logits)]

    def gold(self, example) -> str:
        return example["meta"]["transcript"]

    @classmethod
    def score(cls, predictions, golds):
        return {"cer": character_error_rate(predictions, golds)}
