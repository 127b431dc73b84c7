"""A linear-chain conditional random field for sequence labelling heads, in plain torch.

For emissions e (batch, seq, tags) and a tag path y_1..y_L (L from the mask), the score of the path is

    start[y_1] + e_1[y_1] + sum_{t=2..L} (transitions[y_{t-1}, y_t] + e_t[y_t]) + end[y_L]

and its probability is exp(score) / Z, Z summing exp(score) over every path of length L. All computations are
vectorised over the batch and loop over time only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CRF"]


class CRF(nn.Module):
    """Linear-chain CRF over ``num_tags`` tags; ``transitions[i, j]`` scores moving from tag i to tag j.

    Masks are boolean (batch, seq), True on real tokens: each row must be a prefix of Trues (left-aligned
    sequences), and the first column must be all True since every sequence needs at least one token.
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be at least 1, got {num_tags}")
        self.num_tags = num_tags
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every transition score uniformly from [-0.1, 0.1]."""
        for p in (self.start_transitions, self.end_transitions, self.transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}"

    def _check(self, emissions: torch.Tensor, mask: torch.Tensor, tags: torch.Tensor | None = None) -> None:
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags:
            raise ValueError(f"emissions must be (batch, seq, {self.num_tags}), got {tuple(emissions.shape)}")
        if emissions.size(1) == 0:
            raise ValueError("sequences must have at least one token")
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match emissions' (batch, seq) "
                             f"{tuple(emissions.shape[:2])}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if tags is not None and tags.shape != emissions.shape[:2]:
            raise ValueError(f"tags {tuple(tags.shape)} do not match emissions' (batch, seq) "
                             f"{tuple(emissions.shape[:2])}")
        if not mask[:, 0].all():
            raise ValueError("mask's first column must be all True: every sequence needs at least one token")
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("each mask row must be True then False (left-aligned sequences, no gaps)")

    def _score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised score of the given tag paths, (batch,)."""
        m = mask.to(emissions.dtype)
        emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (batch, seq)
        moved = self.transitions[tags[:, :-1], tags[:, 1:]]  # (batch, seq - 1)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1)
        return (self.start_transitions[tags[:, 0]] + (emitted * m).sum(1) + (moved * m[:, 1:]).sum(1)
                + self.end_transitions[last])

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per sequence, (batch,): the log-sum-exp of the scores of every tag path of the masked length."""
        self._check(emissions, mask)
        return self._log_partition(emissions, mask)

    def _log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        alpha = self.start_transitions + emissions[:, 0]  # (batch, tags): log-sum over paths ending in each tag
        for t in range(1, emissions.size(1)):
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t].unsqueeze(1), step, alpha)
        return torch.logsumexp(alpha + self.end_transitions, dim=1)

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``tags`` (batch, seq) under the CRF, averaged over the batch (a scalar).

        Tags at masked-out positions are ignored and may hold any value, such as a -100 padding label.
        """
        self._check(emissions, mask, tags)
        tags = tags.long().masked_fill(~mask, 0)  # padding labels (e.g. -100) past a sequence's end are ignored
        return (self._log_partition(emissions, mask) - self._score(emissions, tags, mask)).mean()

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi: the highest-scoring tag path of each sequence, as lists whose lengths follow the mask."""
        self._check(emissions, mask)
        score = self.start_transitions + emissions[:, 0]  # (batch, tags): best path score ending in each tag
        backpointers = []  # backpointers[t - 1][b, j]: best previous tag when tag j is at step t
        for t in range(1, emissions.size(1)):
            best, prev = (score.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1)).max(dim=1)
            score = torch.where(mask[:, t].unsqueeze(1), best, score)
            backpointers.append(prev)
        tag = (score + self.end_transitions).argmax(dim=1)  # each sequence's last tag
        path = torch.empty(mask.shape, dtype=torch.long, device=emissions.device)
        for t in range(emissions.size(1) - 1, 0, -1):
            # Past a sequence's end the mask is False, so its last tag is carried back unchanged to step length - 1.
            path[:, t] = tag
            tag = torch.where(mask[:, t], backpointers[t - 1].gather(1, tag.unsqueeze(1)).squeeze(1), tag)
        path[:, 0] = tag
        return [row[:n] for row, n in zip(path.tolist(), mask.sum(1).tolist())]
