"""Retrieval (`retrieval`): contrastive matching of a text query with a candidate of another modality,
through the model's contrastive projections.

Spec: `candidate_modality` (image, audio, video or code) and `candidate_task`, the task whose skills the
candidate side runs (default: the modality's name; the query side runs the task's own skills). Data:
WebDataset shards of the candidate modality, each sample's caption its query. A prediction is the keys of
the ten best candidates of the whole evaluation set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MEDIA_INPUTS, Head, tensors

TOP = 10
"""Candidates kept per query: enough for recall@10."""


class Retrieval(Head):
    name = "retrieval"
    main_metric = "recall@1"
    targets = ()

    @property
    def candidate_task(self) -> str:
        return self.spec.get("candidate_task", self.spec["candidate_modality"])

    @property
    def routes(self) -> tuple[str, ...]:
        return (self.task, self.candidate_task)

    @property
    def modalities(self) -> set[str]:
        return {"text", self.spec["candidate_modality"]}

    def check(self, config) -> None:
        if config.projection_dim <= 0:
            raise ValueError(f"task {self.task!r}: a retrieval head needs projection_dim > 0 in the model config")
        modality = self.spec.get("candidate_modality")
        if modality not in config.modalities or modality == "text":
            raise ValueError(f"task {self.task!r}: candidate_modality must be one of the model's non-text modalities "
                             f"{[m for m in config.modalities if m != 'text']}, got {modality!r}")
        if self.candidate_task not in config.tasks:
            raise ValueError(f"task {self.task!r}: candidate_task {self.candidate_task!r} is not in the task table")

    def forward(self, model, candidate=None, **inputs):
        """In-batch contrastive loss: query i matches candidate i, every other candidate is a negative. Both
        sides run in one call of the encoder (`SkillNetModel`'s `packed`)."""
        if candidate is None:
            raise ValueError(f"retrieval task {self.task!r} needs candidate= (the inputs of the other side)")
        modality = self.spec["candidate_modality"]
        sides = [model.task_inputs(self.task, inputs, "text"),
                 model.task_inputs(self.candidate_task, candidate, modality)]
        queries, candidates = (model.embedding(out) for out in model.skillnet(packed=sides))
        logits = model.similarities(queries, candidates)
        targets = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.T.float(), targets)) / 2
        return loss, logits, None

    @property
    def shard_modality(self) -> str:
        return self.spec["candidate_modality"]

    def example(self, row, fields, tokenizer, labelled, where):
        caption = tokenizer(row["caption"], truncation=True, max_length=fields.max_length)
        if self.shard_modality == "code":
            code = tokenizer(row["code"], truncation=True, max_length=fields.max_length)
            candidate = {"input_ids": torch.tensor(code["input_ids"]),
                         "attention_mask": torch.tensor(code["attention_mask"])}
        else:
            candidate = {k: v for k, v in row.items() if k in MEDIA_INPUTS}
        return {**tensors(caption), **{f"candidate_{k}": v for k, v in candidate.items()}, "meta": {"key": row["key"]}}

    def predict(self, model, batches, fields, tokenizer) -> list[list[str]]:
        """For each query (caption), the keys of the `TOP` best candidates among all of the set's."""
        modality = self.spec["candidate_modality"]
        queries, candidates, keys = [], [], []
        for inputs, meta in batches:
            candidate = inputs.pop("candidate")
            queries.append(model.embed("text", self.task, **inputs))
            candidates.append(model.embed(modality, self.candidate_task, **candidate))
            keys += [m["key"] for m in meta]
        similarity = torch.cat(queries) @ torch.cat(candidates).T
        ranked = similarity.argsort(dim=1, descending=True, stable=True)[:, :TOP]
        return [[keys[j] for j in row] for row in ranked.tolist()]

    def gold(self, example) -> str:
        return example["meta"]["key"]  # a caption's own sample

    @classmethod
    def score(cls, predictions, golds):
        """Recall@1/5/10: the caption's own sample among the best k of the set."""
        return {f"recall@{k}": sum(g in p[:k] for p, g in zip(predictions, golds)) / len(golds) for k in (1, 5, 10)}
