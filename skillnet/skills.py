"""Named skills, task-to-skill tables and the routing they produce.

A skill is a named, described group of parameters in every skill layer. A task declares the skills it
needs; only those run. The three shipped tables follow the SkillNet papers: NLU (Table 1 and 2 of
arXiv 2203.03312), NLG (arXiv 2204.12184) and the multimodal model (arXiv 2205.06126).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Skill:
    name: str
    description: str


# Each table: (skills as (name, description), tasks as name -> skill names). The generic skill is not
# listed in the tasks: it is added to every task unless the config turns that off.
NLU_SKILLS = [
    ("sequence", "s1: get the semantic meaning of a sequence"),
    ("token", "s2: get the semantic meaning of a token"),
    ("interaction", "s3: understand how two text segments interact"),
    ("sentiment", "s4: understand the sentiment of texts"),
    ("question", "s5: understand natural language questions"),
    ("finance", "s6: understand texts in finance domain"),
    ("generic", "s7: generic skill"),
]
NLU_TASKS = {
    "sentiment_analysis": ["sequence", "sentiment"],  # T1
    "natural_language_inference": ["sequence", "interaction"],  # T2
    "semantic_similarity": ["sequence", "interaction", "finance"],  # T3
    "text_classification": ["sequence"],  # T4
    "named_entity_recognition": ["token"],  # T5
    "reading_comprehension": ["token", "interaction", "question"],  # T6
    # Sparse pre-training (section 3.5): MLM activates {s2, s7}, NSP {s1, s3, s7}.
    "masked_lm": ["token"],
    "next_sentence": ["sequence", "interaction"],
}

NLG_SKILLS = [
    ("open_ended", "s1: open-ended text generation"),
    ("non_open_ended", "s2: non-open-ended text generation"),
    ("conversation", "s3: generate conversational text"),
    ("data_to_text", "s4: generate text from structured data"),
    ("question", "s5: understand and generate questions"),
    ("generic", "s6: generic skill"),
]
NLG_TASKS = {
    "summarization": ["non_open_ended"],
    "paraphrase": ["non_open_ended"],
    "advertisement_generation": ["open_ended", "data_to_text"],
    "question_answering": ["open_ended", "question"],
    "dialogue": ["open_ended", "conversation"],
    "question_generation": ["non_open_ended", "question"],
    "denoising": ["non_open_ended"],
}

MULTIMODAL_SKILLS = [
    ("text", "understand natural language text"),
    ("image", "process images"),
    ("sound", "process sound and speech"),
    ("video", "process video"),
    ("code", "understand source code"),
    ("generic", "generic skill"),
]
# One task per input modality: a contrastive pair runs each side with its own modality's skills.
MULTIMODAL_TASKS = {
    "text": ["text"],
    "image": ["image"],
    "audio": ["sound"],
    "video": ["video"],
    "code": ["code"],
    "masked_lm": ["text"],
    "masked_code": ["code"],
    "next_sentence": ["text"],
}

MULTIMODAL_TASK_MODALITIES = {"image": "image", "audio": "audio", "video": "video", "code": "code",
                              "masked_code": "code"}

# name -> (skills, tasks, the input modality of each task that is not text, the task a call naming none runs)
SKILL_SETS = {
    "nlu": (NLU_SKILLS, NLU_TASKS, {}, "masked_lm"),
    "nlg": (NLG_SKILLS, NLG_TASKS, {}, "denoising"),
    "multimodal": (MULTIMODAL_SKILLS, MULTIMODAL_TASKS, MULTIMODAL_TASK_MODALITIES, "masked_lm"),
}


def skill_set(name: str) -> dict:
    """Config entries (`skills`, `tasks`, `task_modalities`, `default_task`) of a shipped set: 'nlu', 'nlg'
    or 'multimodal'."""
    if name not in SKILL_SETS:
        raise ValueError(f"unknown skill set {name!r}; shipped sets: {sorted(SKILL_SETS)}")
    skills, tasks, modalities, default_task = SKILL_SETS[name]
    return {
        "skills": [{"name": n, "description": d} for n, d in skills],
        "tasks": {t: list(s) for t, s in tasks.items()},
        "task_modalities": dict(modalities),
        "default_task": default_task,
    }


class SkillRegistry:
    """The skills of a model and the task table, validated once; resolves tasks to skill indices."""

    def __init__(
        self,
        skills: Sequence[dict],
        tasks: dict[str, Sequence[str]],
        generic_skill: str | None = "generic",
        always_generic: bool = True,
    ):
        self.skills = [Skill(s["name"], s.get("description", "")) for s in skills]
        names = [s.name for s in self.skills]
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"skill name {name!r} must start with a letter and hold only letters, digits, _ or -")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"skills declared twice: {dupes}")
        self.index = {n: i for i, n in enumerate(names)}
        if generic_skill is not None and generic_skill not in self.index:
            raise ValueError(f"generic_skill {generic_skill!r} is not among the skills {names}")
        self.generic_skill = generic_skill
        self.always_generic = always_generic and generic_skill is not None
        self.tasks: dict[str, tuple[int, ...]] = {}
        for task, task_skills in tasks.items():
            self.tasks[task] = self.resolve(task_skills, what=f"task {task!r}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.skills]

    def __len__(self) -> int:
        return len(self.skills)

    def resolve(self, skill_names: Sequence[str], what: str = "skills") -> tuple[int, ...]:
        """Sorted skill indices for a list of names, the generic skill added when it is always on."""
        if isinstance(skill_names, str):
            skill_names = [skill_names]
        unknown = [n for n in skill_names if n not in self.index]
        if unknown:
            raise ValueError(f"{what}: unknown skills {unknown}; known skills: {self.names}")
        chosen = {self.index[n] for n in skill_names}
        if self.always_generic:
            chosen.add(self.index[self.generic_skill])
        if not chosen:
            raise ValueError(f"{what} activates no skill")
        return tuple(sorted(chosen))

    def task_skills(self, task: str) -> tuple[int, ...]:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; the model holds tasks {sorted(self.tasks)}")
        return self.tasks[task]

    def skill_names(self, task: str) -> list[str]:
        """The names of the skills `task` activates (the generic skill included when always on)."""
        return [self.skills[i].name for i in self.task_skills(task)]

    def task_id(self, task: str) -> int:
        """A stable id (tasks sorted by name), for the task-level router's embedding."""
        self.task_skills(task)
        return sorted(self.tasks).index(task)

    def mask(self, indices: Sequence[int]) -> torch.Tensor:
        m = torch.zeros(len(self), dtype=torch.bool)
        m[list(indices)] = True
        return m


@dataclass
class Route:
    """Which skills each sample of a batch activates, computed once per forward and read by every layer.

    `groups` holds (sample indices or None for the whole batch, skill indices): the samples that share a
    skill set. `task_embedding` (batch, dim) feeds the task-level router baseline. Routing layers
    append their load-balancing losses to `aux_losses`.
    """

    groups: list[tuple[torch.Tensor | None, tuple[int, ...]]]
    task_embedding: torch.Tensor | None = None
    aux_losses: list[torch.Tensor] | None = None
    samples: torch.Tensor | None = None
    """For packed inputs (`Route.packed`) with task embeddings, whose rows are tokens: the sample of every
    row; None when the rows are the samples."""
    scratch: dict = field(default_factory=dict, repr=False)
    """Per-forward state of wrappers applied from outside (e.g. skill parallelism's exchanged counts)."""
    _per_skill: list | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.aux_losses is None:
            self.aux_losses = []

    @property
    def active(self) -> tuple[int, ...]:
        """Every skill some sample in the batch uses."""
        return tuple(sorted({i for _, idx in self.groups for i in idx}))

    def per_skill(self) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
        """(skill, the samples that activate it, each one's weight 1/k) for every active skill, in skill
        order; samples and weights are None when the whole batch shares one skill set. Computed once per
        route and reused by every layer."""
        if self._per_skill is None:
            if len(self.groups) == 1:
                self._per_skill = [(i, None, None) for i in self.groups[0][1]]
            else:
                self._per_skill = []
                for skill in self.active:
                    members = [(rows, len(idx)) for rows, idx in self.groups if skill in idx]
                    rows = torch.cat([r for r, _ in members])
                    weight = torch.cat([torch.full((len(r),), 1.0 / k, device=r.device) for r, k in members])
                    self._per_skill.append((skill, rows, weight))
        return self._per_skill

    @classmethod
    def packed(cls, routes: list["Route"], shapes: list[tuple[int, int]], device=None) -> "Route":
        """The route of several inputs run by one call, their tokens laid end to end as the rows of one
        (tokens, hidden) tensor: input by input, sample by sample, position by position (`shapes`: each
        input's (batch, length)). Groups hold token rows; with task embeddings (the task-level router), so
        does `samples`, the inputs' samples numbered in order."""
        by_skills: dict[tuple[int, ...], list[torch.Tensor]] = {}
        samples, offset, first_sample = [], 0, 0
        for route, (batch, length) in zip(routes, shapes):
            positions = torch.arange(length, device=device)
            for rows, skills in route.groups:
                rows = torch.arange(batch, device=device) if rows is None else rows.to(device)
                by_skills.setdefault(skills, []).append((offset + rows[:, None] * length + positions).flatten())
            samples.append(torch.arange(first_sample, first_sample + batch, device=device).repeat_interleave(length))
            offset, first_sample = offset + batch * length, first_sample + batch
        if len(by_skills) == 1 and all(len(r.groups) == 1 and r.groups[0][0] is None for r in routes):
            groups = [(None, next(iter(by_skills)))]
        else:
            groups = [(torch.cat(rows), skills) for skills, rows in by_skills.items()]
        embeddings = [r.task_embedding for r in routes if r.task_embedding is not None]
        if not embeddings:
            return cls(groups)
        return cls(groups, torch.cat(embeddings), samples=torch.cat(samples))

    @classmethod
    def from_mask(cls, mask: torch.Tensor, device: torch.device | str | None = None) -> "Route":
        """A route from a (batch, num_skills) bool mask; one group when every sample agrees. Sample
        indices are put on `device` (where the activations live) once, not in every layer."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError("skill_mask must be a bool tensor (batch, num_skills), "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("skill_mask has a sample with no active skill")
        rows, inverse = torch.unique(mask, dim=0, return_inverse=True)
        sets = [tuple(torch.nonzero(r).flatten().tolist()) for r in rows]
        if len(sets) == 1:
            return cls([(None, sets[0])])
        groups = [(torch.nonzero(inverse == g).flatten().to(device), s) for g, s in enumerate(sets)]
        return cls(groups)
