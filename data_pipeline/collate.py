"""Collation: decoded samples -> padded batches of model inputs (`Collator`), stacked into shared memory
inside a DataLoader worker, and how a batch crosses from a worker to the training process (`_pack`,
`_unpack`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info


class Collator:
    """Decoded samples of one modality -> padded model inputs, captions tokenised alongside."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def _tokens(self, texts: list[str], prefix: str = "") -> dict:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {f"{prefix}input_ids": enc["input_ids"], f"{prefix}attention_mask": enc["attention_mask"]}

    def __call__(self, samples: list[dict], modality: str, template=None) -> dict:
        """`template`: an instruction task's (`skillnet.instructions.Template`), whose samples were decoded
        with their fields."""
        batch = {"keys": [s["key"] for s in samples], "epochs": [s.get("epoch") for s in samples]}
        if template is not None:
            return self._instructions(batch, samples, modality, template)
        if modality == "text":
            batch["texts"] = [s["text"] for s in samples]
            batch.update(self._tokens(batch["texts"]))
            return batch
        batch.update(self._tokens([s["caption"] for s in samples], "caption_"))
        if modality == "code":
            batch.update(self._tokens([s["code"] for s in samples]))
        else:
            batch.update(self._media(samples, modality))
        return batch

    def _instructions(self, batch: dict, samples: list[dict], modality: str, template) -> dict:
        """The medium (if the template reads one), the instructions' tokens and the targets' (`decoder_labels`:
        the target's tokens, the end token, then -100)."""
        values = [instruction_fields(s, template) for s in samples]
        batch.update(self._tokens([template.instruction(v) for v in values]))
        eos = self.tokenizer.eos_token_id
        targets = [ids + [eos] for ids in self.tokenizer([template.target_text(v) for v in values],
                                                           add_special_tokens=False, truncation=True,
                                                           max_length=self.max_tokens - 1)["input_ids"]]
        labels = torch.full((len(targets), max(map(len, targets))), -100, dtype=torch.long)
        for i, ids in enumerate(targets):
            labels[i, :len(ids)] = torch.tensor(ids)
        batch["decoder_labels"] = labels
        if template.media:
            batch.update(self._media(samples, modality))
        return batch

    def _media(self, samples: list[dict], modality: str) -> dict:
        batch = {}
        if modality == "audio":
            frames = [s["input_features"].shape[1] for s in samples]
            features = torch.zeros(len(samples), samples[0]["input_features"].shape[0], max(frames))
            mask = torch.zeros(len(samples), max(frames), dtype=torch.long)
            for i, (s, n) in enumerate(zip(samples, frames)):
                features[i, :, :n] = s["input_features"]
                mask[i, :n] = 1
            batch["input_features"], batch["feature_attention_mask"] = features, mask
        elif modality in ("image", "video"):
            name = "pixel_values" if modality == "image" else "pixel_values_videos"
            batch[name] = _stack([s[name] for s in samples])
        return batch


def instruction_fields(sample: dict, template) -> dict:
    """What an instruction template reads of a decoded sample: its caption (`caption`) or text (`text`), its
    `json` fields (which take precedence), and its medium under the template's media slot's field."""
    values = {"caption": sample.get("caption"), "text": sample.get("text"), **sample.get("fields", {})}
    for slot in template.media:
        values[slot.field] = True  # read by the front-end, not written
    return values


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack; inside a DataLoader worker, straight into shared memory, so sending the batch to the
    training process copies nothing more (as torch's default collate does)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    out = tensors[0].new_empty((len(tensors), *tensors[0].shape)).share_memory_()
    return torch.stack(tensors, out=out)


# Tensors below this size cross from a worker pickled inline (as numpy): passing a shared-memory file
# descriptor costs the training process a socket round trip per tensor, more than copying a few kB.
INLINE_BYTES = 1 << 26


def _pack(batch: dict) -> dict:
    return {k: v.numpy() if torch.is_tensor(v) and v.nbytes < INLINE_BYTES else v for k, v in batch.items()}


def _unpack(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
