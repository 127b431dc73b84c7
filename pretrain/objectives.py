"""Sparse pretraining objectives. Each runs the model with the skills of its task: masked-token
prediction on text or code, sentence-pair prediction on text, contrastive matching of an image,
audio, video or code input with its caption (InfoNCE, negatives gathered from every rank), and an
instruction's target through the decoder (OFA's format: the medium and the instruction in, text or a box out;
the loader builds both from each sample's fields, `data_pipeline.collate`)."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from training.distributed import to_device


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: `probability` of the non-special tokens are predicted; of those 80% become [MASK],
    10% a random token, 10% stay. Returns (inputs, labels with -100 where nothing is predicted)."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    if not chosen.any():  # at least one prediction per batch
        candidates = torch.nonzero(~special)
        chosen[tuple(candidates[torch.randint(len(candidates), (1,), generator=generator)].T)] = True
    labels = input_ids.masked_fill(~chosen, -100)
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.masked_fill(chosen & (roll < 0.8), mask_id)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    return torch.where(swap, random_ids, inputs), labels


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def sentence_pairs(texts: list[str], generator: torch.Generator) -> tuple[list[str], list[str], torch.Tensor]:
    """Split each text in two at a sentence boundary near its middle; half of the second parts are
    replaced by another text's. Labels follow BERT: 0 = the true continuation, 1 = random."""
    firsts, seconds = [], []
    for text in texts:
        cuts = [m.end() for m in _SENTENCE_END.finditer(text)] or [len(text) // 2]
        cut = min(cuts, key=lambda c: abs(c - len(text) / 2))
        firsts.append(text[:cut].strip() or text)
        seconds.append(text[cut:].strip() or text)
    labels = (torch.rand(len(texts), generator=generator) < 0.5).long()
    shift = int(torch.randint(1, max(2, len(texts)), (1,), generator=generator))
    if len(texts) < 2:
        labels.zero_()
    swapped = [seconds[(i + shift) % len(texts)] if labels[i] else seconds[i] for i in range(len(texts))]
    return firsts, swapped, labels


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, group=None) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings; with a process group, every rank's pairs are
    negatives for every other's in `group` (all ranks by default), gathered with gradients."""
    offset = 0
    group = group or (dist.group.WORLD if dist.is_initialized() else None)
    if group is not None and dist.get_world_size(group) > 1:
        offset = dist.get_rank(group) * a.shape[0]
        all_a = funcol.all_gather_single_autograd(a.contiguous(), gather_dim=0, group=group)
        all_b = funcol.all_gather_single_autograd(b.contiguous(), gather_dim=0, group=group)
    else:
        all_a, all_b = a, b
    targets = torch.arange(a.shape[0], device=a.device) + offset
    logits_a = logit_scale * a @ all_b.T
    logits_b = logit_scale * b @ all_a.T
    return (F.cross_entropy(logits_a.float(), targets) + F.cross_entropy(logits_b.float(), targets)) / 2


class Objectives:
    """Turns a loader batch into the loss of its task's objective."""

    def __init__(self, config, tokenizer, model_config, negatives_group=None, before_call=None):
        """`before_call(key)` is told before every model call what kind of call comes: the task, or under
        data-local skill parallelism the tasks of the group's positions (see `TraceSwitch`)."""
        self.config, self.tokenizer, self.model_config = config, tokenizer, model_config
        self.before_call = before_call or (lambda key: None)
        self.vocab_size = model_config.vocab_size
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids))
        self.modality = {t.name: t.modality for t in config.data.tasks}
        self.templates = {t.name: t.instruction() for t in config.data.tasks if t.template}
        self.negatives_group = negatives_group

    def _generator(self, step: int, rank: int) -> torch.Generator:
        # masking depends on (seed, step, rank) alone, so a resumed run masks exactly as before
        return torch.Generator().manual_seed(hash((self.config.train.seed, step, rank)) & 0x7FFFFFFF)

    def loss(self, model, batch: dict, step: int, rank: int, device, group_tasks: list[str] | None = None,
             position: int | None = None) -> tuple[torch.Tensor, dict]:
        """The loss of `batch`'s objective, from one model call. Under skill parallelism's data-local
        placement (`group_tasks`: the task of every position of the group, this rank's at `position`), the
        ranks at the other positions train on their tasks in the same step: the same call also runs each
        of those tasks on one blank sample, with zero weight (see `_idle`), so that every rank's ZeRO-3
        gathers, skill exchanges and gradient reductions line up."""
        entry, finish, stats = self._entry(batch, self._generator(step, rank))
        entry = to_device(entry, device)
        entries, finishes = [entry], [finish]
        if group_tasks is not None:
            calls = [(entry, finish) if g == position else self._idle(task, device)
                     for g, task in enumerate(group_tasks)]
            entries, finishes = [e for e, _ in calls], [f for _, f in calls]
        self.before_call(batch["task"] if group_tasks is None else tuple(group_tasks))
        outs = model(packed=entries)  # the whole call's routing loss comes with the first output, in no loss
        loss = sum(f(o) for f, o in zip(finishes, outs))
        return loss if outs[0].aux_loss is None else loss + outs[0].aux_loss, stats

    def _entry(self, batch: dict, generator: torch.Generator):
        """(the model inputs of `batch`'s objective, on the host, their loss from the model's output, stats)."""
        task, kind = batch["task"], self.config.objective(batch["task"])
        if kind == "mlm":
            ids = batch["input_ids"]
            special = torch.isin(ids, self.special_ids)
            inputs, labels = mask_tokens(ids, special, self.tokenizer.mask_token_id, self.vocab_size,
                                         self.config.train.mlm_probability, generator)
            # the masked positions found here, on the host: the model need not read the labels back
            entry = {"input_ids": inputs, "attention_mask": batch["attention_mask"], "modality": batch["modality"],
                     "task": task, "labels": labels,
                     "masked_positions": torch.nonzero(labels.flatten() != -100).flatten()}
            return entry, lambda out: out.loss, {"tokens": int(batch["attention_mask"].sum())}
        if kind == "nsp":
            first, second, labels = sentence_pairs(batch["texts"], generator)
            enc = self.tokenizer(first, second, padding=True, truncation=True,
                                 max_length=self.config.data.max_text_tokens, return_tensors="pt")
            entry = {**enc, "task": task, "next_sentence_label": labels}
            return entry, lambda out: out.loss, {"tokens": int(enc["attention_mask"].sum())}
        media = {k: batch[k]
                 for k in ("pixel_values", "input_features", "feature_attention_mask", "pixel_values_videos")
                 if k in batch}
        if kind == "instruction":
            entry = {**media, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                     "task": task, "decoder_labels": batch["decoder_labels"]}
            return entry, lambda out: out.loss, {"tokens": int((batch["decoder_labels"] != -100).sum())}
        if batch["modality"] == "code":
            media = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "modality": "code"}
        caption = {"input_ids": batch["caption_input_ids"], "attention_mask": batch["caption_attention_mask"],
                   "task": self.config.train.caption_task}
        entry = {**media, "task": task, "pair": caption}  # both sides in one call

        def finish(out):
            return info_nce(out.embeddings, out.pair_embeddings, out.logit_scale, self.negatives_group)
        return entry, finish, {"tokens": int(batch["caption_attention_mask"].sum())}

    def _idle(self, task: str, device):
        """The inputs of `task`'s objective on one blank sample, and zero times the outputs its loss uses
        (no others: the ranks' backward passes must reach the same modules). (An empty batch would not do:
        some layers give no gradient at all for no input, and the ranks would reduce different parameter
        lists.)"""
        kind, modality, cfg = self.config.objective(task), self.modality[task], self.model_config
        tokens = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
                  "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device)}
        if kind == "mlm":
            return ({**tokens, "modality": modality, "task": task,
                     "labels": torch.zeros(1, 2, dtype=torch.long, device=device)},
                    lambda out: 0.0 * out.prediction_logits.sum())
        if kind == "nsp":
            return ({**tokens, "token_type_ids": torch.zeros(1, 2, dtype=torch.long, device=device), "task": task},
                    lambda out: 0.0 * out.seq_relationship_logits.sum())
        size, channels = cfg.image_size, cfg.num_channels
        media = {"image": {"pixel_values": torch.zeros(1, channels, size, size, dtype=torch.uint8)},
                 "audio": {"input_features": torch.zeros(1, cfg.num_mel_bins, 16),
                           "feature_attention_mask": torch.ones(1, 16, dtype=torch.long)},
                 "video": {"pixel_values_videos": torch.zeros(1, cfg.num_frames, channels, size, size,
                                                              dtype=torch.uint8)},
                 "code": {**tokens, "modality": "code"}, "text": {}}[modality]
        if kind == "instruction":
            reads = self.templates[task].media  # the medium only where the template reads one
            entry = {**(to_device(media, device) if reads else {}), **tokens, "task": task,
                     "decoder_labels": torch.zeros(1, 2, dtype=torch.long, device=device)}
            return entry, lambda out: 0.0 * out.decoder_logits.sum()
        entry = {**to_device(media, device), "task": task, "pair": {**tokens, "task": self.config.train.caption_task}}
        return entry, lambda out: 0.0 * (out.embeddings.sum() + out.pair_embeddings.sum() + out.logit_scale.sum())
