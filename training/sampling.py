"""The alpha rule for mixing tasks (SkillNet-NLU eq. 3), drawn so that every rank agrees and a resumed
run draws what the uninterrupted one would: each draw is a function of (seed, index) alone."""

from __future__ import annotations

import random


def sampling_probabilities(sizes: list[int], alpha: float) -> list[float]:
    """q_i = p_i^alpha / sum_j p_j^alpha with p_i = |T_i| / sum_j |T_j|: 0 uniform, 1 natural."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"every task needs examples to be drawn, sizes {sizes}")
    total = sum(sizes)
    powered = [(s / total) ** alpha for s in sizes]
    return [p / sum(powered) for p in powered]


def seeded(*parts) -> random.Random:
    """A generator determined by `parts` alone (string seeding hashes with SHA-512, stable across runs)."""
    return random.Random("/".join(map(str, parts)))


class TaskSampler:
    """Task names drawn by the alpha rule; draw `index` depends on the seed and the index only."""

    def __init__(self, names: list[str], sizes: list[int], alpha: float, seed: int):
        self.names, self.seed = list(names), seed
        self.probabilities = sampling_probabilities(sizes, alpha)

    def task(self, index: int, among: list[str] | None = None) -> str:
        """The task of draw `index`, from all tasks or, by the same rule, from those `among`."""
        names, weights = self.names, self.probabilities
        if among is not None:
            names, weights = list(among), [weights[self.names.index(t)] for t in among]
        if len(names) == 1:
            return names[0]
        return seeded(self.seed, "task", index).choices(names, weights)[0]

    def tasks(self, k: int, *key) -> list[str]:
        """`k` tasks drawn independently (a mixed batch), determined by `key`."""
        return seeded(self.seed, "mixed", *key).choices(self.names, self.probabilities, k=k)
