"""Skill parallelism: the skills of every skill layer split over a group of P ranks.

Each rank of a skill-parallel group holds only its skills (ZeRO-3 partitions them over the ranks that
hold the same skills: DeepSpeed's expert-data-parallel group). In every skill layer a token travels by
all-to-all to the ranks holding the skills its task activates, each of those ranks adds the outputs of
its skills, and the partial sums travel back to be averaged. Every rank takes part in every exchange,
sending nothing when it has nothing to send, so the collectives always line up.

Two placements:
- balanced: skills dealt round-robin, every rank trains on every task;
- data_local: the tasks are split over the P positions of the group and each skill sits where the
  tasks using it train, so most tokens never leave their rank (as in domain-parallel training). A skill
  every task activates (the generic skill) is shared: every rank holds it as an ordinary data-parallel
  parameter, as MoE models hold shared experts.

ZeRO-3 needs the same module calls on every rank, so a position holding fewer skills than the others holds
padding to make up the count: modules with a skill's parameter slots (frozen, one element each), called as
the skills are (on no tokens), computing zeros, costing next to nothing to gather, left out of the export.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from skillnet.layers import SkillFFN, SkillLinear
from training.zero.internals import tag_expert


@dataclass
class Placement:
    mode: str
    slots: list[list[str]]
    """The skills held by each position of a skill-parallel group."""
    task_slots: list[list[str]] | None = None
    """data_local: the tasks the ranks at each position train on."""
    shared: list[str] = field(default_factory=list)
    """Skills every rank holds (data_local: those every task activates)."""

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        """Skills per position, padding included."""
        return max(len(held) for held in self.slots)

    def to_dict(self) -> dict:
        return asdict(self)


def balanced(skills: list[str], size: int) -> Placement:
    """Skills dealt round-robin in table order."""
    if size > len(skills):
        raise ValueError(f"distributed.skill_parallel_size={size} exceeds the model's {len(skills)} skills")
    return Placement("balanced", [skills[i::size] for i in range(size)])


def data_local(skills: list[str], task_skills: dict[str, list[str]], weights: dict[str, float], size: int) -> Placement:
    """Tasks split over the P positions and skills placed where the tasks using them train: starting from
    the tasks dealt by weight, tasks move or swap between positions while that raises the share of
    (task, skill) activations that stay local minus the spread of the positions' sampling weight (each
    position's ranks draw only its tasks, so an uneven split shifts the task mixture). Skills every task
    activates are shared."""
    tasks = sorted(weights, key=lambda t: (-weights[t], t))
    if len(tasks) < size:
        raise ValueError(f"skill_placement data_local needs at least skill_parallel_size={size} pretraining tasks "
                         f"to spread over the ranks; the data config has {len(tasks)}")
    shared = [k for k in skills if len(tasks) > 1 and all(k in task_skills[t] for t in tasks)]
    split = [k for k in skills if k not in shared]
    if size > len(split):
        raise ValueError(f"distributed.skill_parallel_size={size} exceeds the {len(split)} skills that are not "
                         f"shared by every task ({split})")
    room, total = math.ceil(len(split) / size), sum(weights.values())

    def place(where: dict[str, int]) -> list[list[str]]:
        use = {(k, s): sum(weights[t] for t in tasks if where[t] == s and k in task_skills[t])
               for k in split for s in range(size)}
        slots = [[] for _ in range(size)]
        for k, s in sorted(use, key=lambda ks: (-use[ks], skills.index(ks[0]), ks[1])):
            if len(slots[s]) < room and not any(k in held for held in slots):
                slots[s].append(k)
        return slots

    def score(where: dict[str, int]) -> float:
        slots = place(where)
        local = sum(weights[t] * sum(k in slots[where[t]] or k in shared for k in task_skills[t]) / len(task_skills[t])
                    for t in tasks)
        load = [sum(weights[t] for t in tasks if where[t] == s) for s in range(size)]
        return (local - (max(load) - min(load))) / total

    where = {t: i % size for i, t in enumerate(tasks)}
    best = score(where)
    improved = True
    while improved:  # hill-climb over moving one task and swapping two
        improved = False
        candidates = [{**where, t: s} for t in tasks for s in range(size) if s != where[t]]
        candidates += [{**where, a: where[b], b: where[a]} for a in tasks for b in tasks if where[a] < where[b]]
        for moved in candidates:
            if len(set(moved.values())) == size and (value := score(moved)) > best + 1e-12:
                where, best, improved = moved, value, True
                break
    slots = place(where)
    return Placement("data_local", [sorted(held, key=skills.index) for held in slots],
                     [[t for t in tasks if where[t] == s] for s in range(size)], shared)


PADDING = "_padding"
"""The name prefix of padding skills."""


class _PaddingLinear(nn.Module):
    """A stand-in for a linear map: the parameter slots of one (frozen, one element each: ZeRO-3 never marks
    an empty parameter gathered), and zeros as its output, which still depend on the input so that the
    backward pass reaches this module on every rank as it reaches a skill."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.new_zeros(1), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.new_zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1].expand(*x.shape[:-1], self.out_features) * 0


def _padding_like(skill: nn.Module) -> nn.Module:
    """A padding skill: `skill`'s modules and parameter slots (ZeRO-3 checks that every rank calls the same
    modules with the same parameters), of one element each, computing zeros."""
    if isinstance(skill, nn.Linear):
        return _PaddingLinear(skill)
    pad = copy.deepcopy(skill)  # an FFN: fc1, act, fc2
    for name, child in list(pad.named_children()):
        if isinstance(child, nn.Linear):
            setattr(pad, name, _PaddingLinear(child))
    return pad


class SkillParallel(nn.Module):
    """A skill FFN or skill projection (`SkillFFN`, `SkillLinear`) of which this rank holds the skills of its
    position (and the shared ones); tokens are exchanged with the other positions of the skill-parallel
    group by all-to-all, and the outputs of a token's skills averaged as before. Every skill it holds, and
    its padding, is called once per forward on every rank, on the tokens that need it (possibly none): so
    each rank makes the same module calls, as ZeRO-3 demands, whichever skills it holds."""

    def __init__(self, layer: SkillFFN | SkillLinear, placement: Placement, slot: int, group, stage: str = "encoder"):
        super().__init__()
        self.names = list(layer.skills)  # every skill, in table order: the route's indices
        # the same structure at every position: shared skills, this position's, then padding (named so that
        # no skill can be: skill names start with a letter)
        first = next(iter(layer.skills.values()))
        padding = {f"{PADDING}{i}": _padding_like(first) for i in range(placement.width - len(placement.slots[slot]))}
        self.skills = nn.ModuleDict({**{n: layer.skills[n] for n in placement.shared + placement.slots[slot]},
                                     **padding})
        self.slots = [*placement.slots[slot], *padding]
        """The names of this position's skills and padding, in the order of their bits in a token's skill code."""
        self.out_features = first.out_features if isinstance(first, nn.Linear) else first.fc2.out_features
        self.placement, self.slot, self.group = placement, slot, group
        self.stage = stage
        """Which tokens the layer sees ("encoder", or the decoder's own): every layer of a stage exchanges the
        same counts and skill codes, so they cross the group once per stage and forward (`Route.scratch`)."""
        self.bytes_sent = 0  # sent to other ranks: tokens and their skill codes out, partial sums back, gradients

    def _count_backward(self, n: int) -> None:
        self.bytes_sent += n

    def take_bytes_sent(self) -> int:
        """Bytes sent since the last take."""
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def forward(self, x: torch.Tensor, route) -> torch.Tensor:
        hidden = x.shape[-1]
        flat = x.reshape(-1, hidden)
        tokens = self._tokens(route, x.shape[0], flat.shape[0] // max(1, x.shape[0]), x.device)
        # shared skills, here: one call each on the tokens whose skills include it
        out = flat.new_zeros(flat.shape[0], self.out_features)
        for name in self.placement.shared:
            rows = tokens["shared"][name]
            out = out.index_add(0, rows, self.skills[name](flat.index_select(0, rows)))
        # the others where they are held: tokens out, partial sums back, position by position
        send_rows = tokens["send"]
        send = flat.index_select(0, torch.cat(send_rows))
        send_counts = [len(r) for r in send_rows]
        plan, first = self._exchange_plan(route, send_counts, tokens["codes"])
        recv_counts = plan["recv_counts"]
        recv = all_to_all_single(send.new_empty(sum(recv_counts), hidden), send, recv_counts, send_counts, self.group)
        result = recv.new_zeros(recv.shape[0], self.out_features)
        for name, rows in zip(self.slots, plan["slot_rows"]):
            result = result.index_add(0, rows, self.skills[name](recv.index_select(0, rows)))
        back = all_to_all_single(result.new_empty(send.shape[0], self.out_features), result, send_counts, recv_counts,
                                 self.group)
        out = out.index_add(0, torch.cat(send_rows), back)
        # bytes this rank sends to the others: tokens and codes out, partial sums back; the backward
        # sends as many gradient rows the other way
        out_rows = sum(send_counts) - send_counts[self.slot]
        back_rows = sum(recv_counts) - recv_counts[self.slot]
        sent = out_rows * hidden + back_rows * self.out_features
        self.bytes_sent += sent * x.element_size() + (out_rows * tokens["codes"].element_size() if first else 0)
        if back.requires_grad:
            back.register_hook(lambda grad: self._count_backward(sent * grad.element_size()))
        return (out / tokens["k"].to(out.dtype)).view(*x.shape[:-1], self.out_features)

    def _tokens(self, route, rows: int, per_row: int, device) -> dict:
        """Which tokens (rows of the flattened input) go where: per shared skill the tokens using it; per
        position the tokens to send there and each one's skill code there (bit i: the position's i-th
        skill); every token's skill count. The same for every layer of a stage: made once per forward."""
        key = ("skill_parallel_tokens", self.stage)
        if key in route.scratch:
            return route.scratch[key]
        size, slots = self.placement.size, self.placement.slots
        shared = {n: [] for n in self.placement.shared}
        send, codes = [[] for _ in range(size)], [[] for _ in range(size)]
        k = torch.empty(rows * per_row, device=device)
        positions = torch.arange(per_row, device=device)
        for samples, indices in route.groups:
            samples = torch.arange(rows, device=device) if samples is None else samples
            group = (samples[:, None] * per_row + positions).flatten()
            names = [self.names[i] for i in indices]
            k[group] = len(names)
            for n in names:
                if n in shared:
                    shared[n].append(group)
            for s in range(size):
                if mask := sum(1 << slots[s].index(n) for n in names if n in slots[s]):
                    send[s].append(group)
                    codes[s].append(torch.full((len(group),), mask, dtype=torch.int64, device=device))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        plan = {"shared": {n: torch.cat([empty, *g]) for n, g in shared.items()},
                "send": [torch.cat([empty, *g]) for g in send],
                "codes": torch.cat([empty, *(c for s in codes for c in s)]), "k": k.unsqueeze(-1)}
        route.scratch[key] = plan
        return plan

    def _exchange_plan(self, route, send_counts: list[int], send_codes: torch.Tensor) -> tuple[dict, bool]:
        """The counts this rank receives and, per skill slot it holds (padding included), the received tokens
        that need it: the same for every layer of a stage, so exchanged (and read on the host) once per
        stage and forward. Returns the plan and whether this call made it."""
        key = ("skill_parallel", id(self.group), self.stage)
        if key in route.scratch:
            return route.scratch[key], False
        size, device = self.placement.size, send_codes.device
        recv_counts = torch.zeros(size, dtype=torch.int64, device=device)  # NCCL exchanges device tensors only
        dist.all_to_all_single(recv_counts, torch.tensor(send_counts, dtype=torch.int64, device=device),
                               group=self.group)
        recv_counts = recv_counts.tolist()
        codes = torch.empty(sum(recv_counts), dtype=torch.int64, device=device)
        dist.all_to_all_single(codes, send_codes, recv_counts, send_counts, group=self.group)
        plan = {"recv_counts": recv_counts,
                "slot_rows": [torch.nonzero(codes >> i & 1).flatten() for i in range(self.placement.width)]}
        route.scratch[key] = plan
        return plan, True


def shard_skills(model: nn.Module, placement: Placement, slot: int, group, data_group, group_name: str) -> list:
    """Replace every `SkillFFN` and `SkillLinear` of `model` with its `SkillParallel` at position `slot`, and
    tag the parameters only this position holds for ZeRO-3 the way DeepSpeed tags AutoEP experts:
    partitioned over `data_group` (the ranks at the same position), gradients averaged over every rank.
    Shared skills stay ordinary parameters."""
    layers = []
    names = {module: name for name, module in model.named_modules()}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (SkillFFN, SkillLinear)):
                qualified = f".{names[parent]}.{name}"
                # the decoder's own tokens, or (cross-attention keys and values) the encoder's
                decoder = ".decoder." in qualified and not qualified.endswith((".cross_attn.k", ".cross_attn.v"))
                layer = SkillParallel(child, placement, slot, group, "decoder" if decoder else "encoder")
                setattr(parent, name, layer)
                layers.append(layer)
                own = [p for n in placement.slots[slot] for p in layer.skills[n].parameters()]
                padding = [p for n in layer.slots if n.startswith(PADDING) for p in layer.skills[n].parameters()]
                for param in [*own, *padding]:
                    tag_expert(param, group_name, data_group)
    return layers
