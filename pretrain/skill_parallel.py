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

ZeRO-3 needs the same module and parameter structure on every rank, so a position holding fewer skills
than the others holds padding to make up the count: empty parameters in a skill's slots, never run, never
given a gradient, costing nothing to gather, and left out of the export.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from skillnet.layers import FFN, SkillFFN, SkillLinear


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


def _skill_sum(chosen: list[FFN], x: torch.Tensor, act) -> torch.Tensor:
    """sum_k(W2_k act(W1_k x + b1_k) + b2_k) as one wide FFN: [W2_1 .. W2_k] act([W1_1; ..; W1_k] x + [b1]) + sum(b2)."""
    w1 = torch.cat([e.fc1.weight for e in chosen])  # (k*F, H)
    b1 = torch.cat([e.fc1.bias for e in chosen])
    w2 = torch.cat([e.fc2.weight for e in chosen], dim=1)  # (H, k*F)
    b2 = torch.stack([e.fc2.bias for e in chosen]).sum(0)
    h = act(torch.addmm(b1, x.reshape(-1, x.shape[-1]), w1.t()))
    return torch.addmm(b2, h, w2.t()).view(*x.shape[:-1], w2.shape[0])


def _partial_sum(chosen: list[nn.Module], x: torch.Tensor, act) -> torch.Tensor:
    """The sum of the outputs of `chosen` skills: FFNs as one wide FFN, linear maps as one linear map."""
    # the skills' weights are read, their modules never called: ZeRO-3 then sees the same module calls on
    # every rank of the group, whichever skills each holds
    if isinstance(chosen[0], nn.Linear):
        return F.linear(x, torch.stack([m.weight for m in chosen]).sum(0), torch.stack([m.bias for m in chosen]).sum(0))
    return _skill_sum(chosen, x, act)


def _empty_like(skill: nn.Module) -> nn.Module:
    """A padding skill: the modules and parameter slots of `skill` (ZeRO-3 checks that every rank traces the
    same modules and parameters) holding empty tensors, so gathering it costs nothing."""
    pad = copy.deepcopy(skill)
    for module in pad.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.new_empty(0)))
    return pad


class SkillParallel(nn.Module):
    """A skill FFN or skill projection (`SkillFFN`, `SkillLinear`) of which this rank holds the skills of its
    position (and the shared ones); tokens are exchanged with the other positions of the skill-parallel
    group by all-to-all, and the outputs of a token's skills averaged as before. Unlike the model's skill
    layers it reads its skills' weights instead of calling them (ZeRO-3 demands the same module calls on
    every rank, and each rank holds other skills), so they are registered as its external parameters
    (`pretrain/parallelize.py`) and gathered together when the layer runs."""

    def __init__(self, layer: SkillFFN | SkillLinear, placement: Placement, slot: int, group, stage: str = "encoder"):
        super().__init__()
        self.names = list(layer.skills)  # every skill, in table order: the route's indices
        # the same structure at every position: shared skills, this position's, then padding
        held = placement.shared + placement.slots[slot]
        self.skills = nn.ModuleDict({n: layer.skills[n] for n in held})
        first = next(iter(layer.skills.values()))
        self.padding = nn.ModuleList(_empty_like(first) for _ in range(placement.width - len(placement.slots[slot])))
        # a plain function, not the activation module: module calls here would differ between ranks
        self.act = first.act.forward if isinstance(layer, SkillFFN) else None
        self.out_features = first.out_features if isinstance(first, nn.Linear) else first.fc2.out_features
        self.placement, self.slot, self.group = placement, slot, group
        self.stage = stage
        """Which tokens the layer sees ("encoder", or the decoder's own): every layer of a stage exchanges the
        same counts and skill codes, so they cross the group once per stage and forward (`Route.scratch`)."""
        self.bytes_sent = 0  # sent to other ranks: tokens and their skill codes out, partial sums back, gradients

    def _count_backward(self, n: int) -> None:
        self.bytes_sent += n

    def forward(self, x: torch.Tensor, route) -> torch.Tensor:
        hidden, size = x.shape[-1], self.placement.size
        sends: list[list[torch.Tensor]] = [[] for _ in range(size)]
        codes: list[list[torch.Tensor]] = [[] for _ in range(size)]
        pieces = []  # per route group: its inputs' shape, its skill count, shared skills' sum, [(slot, rows)]
        for samples, indices in route.groups:
            inputs = x if samples is None else x.index_select(0, samples)
            tokens = inputs.reshape(-1, hidden)
            names = [self.names[i] for i in indices]
            shared = [self.skills[n] for n in names if n in self.placement.shared]
            partial = _partial_sum(shared, tokens, self.act) if shared else None
            remote = []
            for slot in range(size):
                held = self.placement.slots[slot]
                mask = sum(1 << held.index(n) for n in names if n in held)
                if mask:
                    sends[slot].append(tokens)
                    codes[slot].append(torch.full((tokens.shape[0],), mask, dtype=torch.int64, device=x.device))
                    remote.append((slot, tokens.shape[0]))
            pieces.append((inputs.shape, len(names), partial, remote))

        flat = x.reshape(-1, hidden)
        send_counts = [sum(t.shape[0] for t in sends[s]) for s in range(size)]
        send = torch.cat([flat[:0]] + [t for s in range(size) for t in sends[s]])  # [:0] keeps the graph
        send_codes = torch.cat([torch.zeros(0, dtype=torch.int64, device=x.device)] + [c for s in range(size) for c in codes[s]])
        plan, first = self._exchange_plan(route, send_counts, send_codes)
        recv_counts = plan["recv_counts"]
        recv = all_to_all_single(send.new_empty(sum(recv_counts), hidden), send, recv_counts, send_counts, self.group)

        result = self._run_local(recv, plan)
        back = all_to_all_single(result.new_empty(send.shape[0], self.out_features), result, send_counts, recv_counts, self.group)
        # bytes this rank sends to the others: tokens and codes out, partial sums back; the backward
        # sends as many gradient rows the other way
        out_rows = sum(send_counts) - send_counts[self.slot]
        back_rows = sum(recv_counts) - recv_counts[self.slot]
        sent = out_rows * hidden + back_rows * self.out_features
        self.bytes_sent += sent * x.element_size() + (out_rows * send_codes.element_size() if first else 0)
        if back.requires_grad:
            back.register_hook(lambda grad: self._count_backward(sent * grad.element_size()))

        # the partial sums come back in the order they were sent: position by position, group by group
        starts, offset = [], 0
        for s in range(size):
            starts.append(offset)
            offset += send_counts[s]
        out = None
        for g, (shape, k, partial, remote) in enumerate(pieces):
            total = partial
            for slot, rows in remote:
                part = back[starts[slot]:starts[slot] + rows]
                starts[slot] += rows
                total = part if total is None else total + part
            y = (total / k).view(*shape[:-1], self.out_features)
            samples = route.groups[g][0]
            if samples is None:
                return y
            out = y.new_zeros(*x.shape[:-1], self.out_features) if out is None else out
            out = out.index_copy(0, samples, y)
        return out

    def _exchange_plan(self, route, send_counts: list[int], send_codes: torch.Tensor) -> tuple[dict, bool]:
        """The counts and skill codes this rank receives, and how its tokens group by code: the same for every
        layer of a stage, so exchanged (and read on the host) once per stage and forward. Returns the plan and
        whether this call made it."""
        key = ("skill_parallel", id(self.group), self.stage)
        if key in route.scratch:
            return route.scratch[key], False
        size, device = self.placement.size, send_codes.device
        recv_counts = torch.zeros(size, dtype=torch.int64, device=device)  # NCCL exchanges device tensors only
        dist.all_to_all_single(recv_counts, torch.tensor(send_counts, dtype=torch.int64, device=device), group=self.group)
        recv_counts = recv_counts.tolist()
        codes = torch.empty(sum(recv_counts), dtype=torch.int64, device=device)
        dist.all_to_all_single(codes, send_codes, recv_counts, send_counts, group=self.group)
        order = torch.argsort(codes, stable=True)
        values, counts = torch.unique_consecutive(codes[order], return_counts=True)
        plan = {"recv_counts": recv_counts, "order": order, "restore": torch.argsort(order),
                "groups": list(zip(values.tolist(), counts.tolist()))}
        route.scratch[key] = plan
        return plan, True

    def _run_local(self, recv: torch.Tensor, plan: dict) -> torch.Tensor:
        """Sum of this position's skills named by each received token's code, computed code by code."""
        held = [self.skills[n] for n in self.placement.slots[self.slot]]
        ordered = recv.index_select(0, plan["order"])
        parts, start = [ordered[:0, :1].expand(0, self.out_features)], 0
        for code, count in plan["groups"]:
            chosen = [m for i, m in enumerate(held) if code >> i & 1]
            parts.append(_partial_sum(chosen, ordered[start:start + count], self.act))
            start += count
        return torch.cat(parts).index_select(0, plan["restore"])


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
                for param in [*own, *layer.padding.parameters()]:
                    param.allreduce = False
                    param.group_name = group_name
                    param.ds_zero_placement_family = "autoep_expert"
                    param.ds_zero_partition_group_name = group_name
                    param.ds_zero_partition_process_group = data_group
    return layers
