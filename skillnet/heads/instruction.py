"""Instructions (`instruction`): a task written as words, OFA's format. The encoder reads the template's
medium, if it has one (image patches, audio frames or video tubelets), then the instruction's text (the
template's words with the sample's fields in its slots, `skillnet.instructions`); the decoder writes the
target. The task's skills route every encoder and decoder layer, as for `generation`.

Spec: `{type: instruction, template: "<template line>"}` (finetuning's config also takes a shipped
template's name, `skillnet/templates/ofa.yaml`, and stores its line). A template without a medium reads rows
of a JSON, CSV or Parquet file holding its fields; one with an IMAGE, AUDIO or VIDEO slot reads WebDataset
shards of that modality, its fields from each sample's `json` member (and `caption`, its text). A closed
target (`[TEXT:label, closed: yes|no]`) is decoded under a constraint that only emits the set's answers;
every target is scored by exact match, ROUGE-L and BLEU. A box (a BOX slot, in an image's pixels: the template
needs an IMAGE slot, the sample `width` and `height` fields) is written as four location tokens, which
finetuning adds to the tokenizer and the model's embeddings; a box target decodes as four location tokens and
is scored by its intersection over union with the gold box (`box_accuracy`: the share at IoU >= 0.5, OFA's
grounding accuracy; `mean_iou`).
"""

from __future__ import annotations

import functools

import torch

from ..frontends import INPUT_NAMES
from ..instructions import MEDIA, Template, box_iou, constraint, location_tokens, read_box
from ..metrics import bleu, rouge_l
from .base import MEDIA_INPUTS, tensors
from .generation import Generation

MODALITY = {"IMAGE": "image", "AUDIO": "audio", "VIDEO": "video"}


class Instruction(Generation):
    name = "instruction"
    main_metric = "exact_match"
    reads_fields = True

    def __init__(self, task: str, spec: dict):
        super().__init__(task, spec)
        if self.template.target.kind == "BOX":
            self.main_metric = "box_accuracy"

    @functools.cached_property
    def template(self) -> Template:
        return Template.parse(self.task, str(self.spec.get("template", "")))

    @property
    def medium(self):
        """The template's media slot, or None."""
        media = self.template.media
        return media[0] if media else None

    def check(self, config) -> None:
        super().check(config)
        template = self.template  # a bad line is refused here, naming the task
        if template.boxes and (self.medium is None or self.medium.kind != "IMAGE"):
            raise ValueError(f"task {self.task!r}: template slot {template.boxes[0]} is a box in an image's "
                             f"pixels: the template needs an [IMAGE:...] slot")
        if template.target.kind in MEDIA:
            raise ValueError(f"task {self.task!r}: the target {template.target} must be text")
        if len(template.media) > 1:
            raise ValueError(f"task {self.task!r}: template slots {', '.join(map(str, template.media))}: the encoder "
                             f"reads one medium with the instruction")
        if self.medium is not None and MODALITY[self.medium.kind] not in config.modalities:
            raise ValueError(f"task {self.task!r}: template slot {self.medium} needs the {MODALITY[self.medium.kind]} "
                             f"front-end; the model's modalities are {config.modalities}")

    def new_tokens(self) -> list[str]:
        return location_tokens() if self.template.boxes else []

    @property
    def shard_modality(self) -> str | None:
        return MODALITY[self.medium.kind] if self.medium is not None else None

    @property
    def modality(self) -> str:
        return self.shard_modality or "text"

    @property
    def modalities(self) -> set[str]:
        return {"text", self.modality}

    def example(self, row, fields, tokenizer, labelled, where):
        template, medium = self.template, self.medium
        name = INPUT_NAMES[self.modality] if medium is not None else None  # the medium's model input
        sample = row if medium is None else {**row.get("fields", {}), "caption": row.get("caption"),
                                             medium.field: row.get(name)}
        if labelled:
            try:
                template.check(sample)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        source = tensors(tokenizer(template.instruction(sample), truncation=True, max_length=fields.max_length))
        if medium is not None:
            source[name] = sample[medium.field]
        if not labelled:
            return source
        target = template.target_text(sample)
        ids = tokenizer(target, add_special_tokens=False, truncation=True,
                        max_length=fields.max_length - 1)["input_ids"]
        return {**source, "labels": torch.tensor(ids + [tokenizer.eos_token_id]), "meta": {"target": target}}

    def predict(self, model, batches, fields, tokenizer) -> list[str]:
        """Greedy generation; a closed target only ever decodes to one of its answers, a box to four location
        tokens."""
        allow = constraint(self.template.target, tokenizer, tokenizer.eos_token_id)
        out = []
        for inputs, _ in batches:
            encoder = {k: v for k, v in inputs.items()
                       if k in ("input_ids", "attention_mask", "feature_attention_mask", *MEDIA_INPUTS)}
            ids = model.generate(**encoder, task=self.task, max_new_tokens=fields.max_length, do_sample=False,
                                 num_beams=1, prefix_allowed_tokens_fn=allow)
            out += [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]
        return out

    @classmethod
    def score(cls, predictions, golds):
        n = max(1, len(golds))
        scores = {"exact_match": sum(p.strip() == g.strip() for p, g in zip(predictions, golds)) / n,
                  "rouge_l": rouge_l(predictions, golds), "bleu": bleu(predictions, [[g] for g in golds])}
        boxes = [_box(g) for g in golds]
        if golds and None not in boxes:  # boxes: IoU in the bins' coordinates (scaling keeps IoU)
            ious = [box_iou(b, _box(p)) if _box(p) is not None else 0.0 for p, b in zip(predictions, boxes)]
            scores.update(exact_match=sum(_box(p) == b for p, b in zip(predictions, boxes)) / n,
                          box_accuracy=sum(i >= 0.5 for i in ious) / n, mean_iou=sum(ious) / n)
        return scores


def _box(text: str):
    try:
        return read_box(text, 1.0, 1.0)
    except ValueError:
        return None
