"""Generation (`generation`): text to text (summarisation, data-to-text) with the decoder of a model that
has `num_decoder_layers > 0`; the task's skills run in the encoder and in the decoder at every step.

Data rows: `text` (the source) and `target` (the text to generate, at most `max_length` - 1 tokens and
the end-of-sequence token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import bleu, rouge_l
from .base import Head, field, tensors


class Generation(Head):
    name = "generation"
    main_metric = "rouge_l"

    def check(self, config) -> None:
        if config.num_decoder_layers < 1 or config.decoder_start_token_id is None:
            raise ValueError(f"task {self.task!r}: a generation head needs a model with num_decoder_layers >= 1 and a "
                             "decoder_start_token_id (an encoder-decoder such as skillnet-nlg-base)")
        if self.spec.get("prompts"):
            raise ValueError(f"task {self.task!r}: prompt tuning is not available for generation tasks")

    def forward(self, model, labels=None, **inputs):
        """Teacher-forced decoding of `labels` (target ids, -100 on padding); one route serves the encoder
        and the decoder."""
        if labels is None:
            raise ValueError(f"generation task {self.task!r}: pass labels (training) or call generate()")
        route = model.skillnet.route(inputs["input_ids"].shape[0], task=self.task, device=inputs["input_ids"].device)
        encoded = model.skillnet(**inputs, route=route, return_dict=True)
        logits, _ = model.decode(model.shift_right(labels), encoded.last_hidden_state, encoded.attention_mask, route)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, logits, encoded.aux_loss

    def example(self, row, fields, tokenizer, labelled, where):
        source = tensors(tokenizer(field(row, fields.text, where), truncation=True, max_length=fields.max_length))
        if not labelled:
            return source
        target = field(row, fields.target, where)
        ids = tokenizer(target, add_special_tokens=False, truncation=True,
                        max_length=fields.max_length - 1)["input_ids"]
        return {**source, "labels": torch.tensor(ids + [tokenizer.eos_token_id]), "meta": {"target": target}}

    def predict(self, model, batches, fields, tokenizer) -> list[str]:
        """Greedy generation of at most `max_length` tokens per source."""
        out = []
        for inputs, _ in batches:
            ids = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], task=self.task,
                                 max_new_tokens=fields.max_length, do_sample=False, num_beams=1)
            out += [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in ids.tolist()]
        return out

    def gold(self, example) -> str:
        return example["meta"]["target"]

    @classmethod
    def score(cls, predictions, golds):
        return {"rouge_l": rouge_l(predictions, golds), "bleu": bleu(predictions, [[g] for g in golds])}
