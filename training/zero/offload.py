"""Skill-granular offloading under ZeRO-3 (`distributed.offload.skills: inactive`).

ZeRO-Offload keeps the optimizer (fp32 master weights and Adam moments) in CPU memory and the weights'
bit16 partitions on the accelerator; ZeRO-Infinity moves those partitions to the CPU too, all of them, and
copies each one in whenever its module runs. A skill-routed model knows before a step which skills the
step's tasks run: here the shared parameters (embeddings, norms, front-ends, heads) and the skills of the
step's tasks stay on the accelerator, every other skill's partition waits in pinned CPU memory beside its
optimizer state, and the skills of the next step's tasks are copied in on a side stream while the current
step runs. A skill that is called without being resident (a route the step's tasks did not announce) is
brought in by a forward pre-hook on its module, counted as a miss.

What makes it possible: ZeRO-3's optimizer keeps each sub-group's partitions as one flat tensor
(`fp16_partitioned_groups_flat[i]`), whose narrows are the parameters' `ds_tensor`s; the optimizer step
writes the updated fp32 partition into that flat tensor wherever it lies, and a gather copies a
partition to the accelerator whatever its device. With each skill's parameters in optimizer groups of
their own (`skill_groups`), a skill's sub-groups move by replacing their flat tensors and re-pointing the
`ds_tensor`s (`_unflatten_partitioned_parameters`). Training is numerically unchanged: only where a
partition lies moves, never what it holds.
"""

from __future__ import annotations

import re

import torch

SKILL_PARAMETER = re.compile(r"(?:^|\.)skills\.([^.]+)\.")
SKILL_MODULE = re.compile(r"(?:^|\.)skills\.([^.]+)$")


def skill_of(name: str) -> str | None:
    """The skill a parameter belongs to (its name runs through a skill dictionary), or None (shared)."""
    match = SKILL_PARAMETER.search(name)
    return match.group(1) if match else None


def skill_groups(model, groups: list[dict]) -> list[dict]:
    """`groups` with each skill's parameters split into groups of their own (`<group>/skill:<name>`, same
    settings), so that no ZeRO-3 sub-group holds two skills, or a skill and shared parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        by_skill: dict[str | None, list] = {}
        for param in group["params"]:
            by_skill.setdefault(skill_of(names[id(param)]), []).append(param)
        for skill, params in sorted(by_skill.items(), key=lambda kv: kv[0] or ""):
            name = group.get("name", "group") + ("" if skill is None else f"/skill:{skill}")
            out.append({**group, "name": name, "params": params})
    return out


def check(ds: dict, skill_names: list[str]) -> None:
    """Refuse, in one line, skill offloading where it cannot work: not ZeRO-3, the optimizer not offloaded
    to the CPU in whole, parameters offloaded already (ZeRO-Infinity keeps all of them on the CPU), or a
    model without named skills."""
    zero = ds.get("zero_optimization") or {}
    optimizer = zero.get("offload_optimizer") or {}
    where = "distributed.offload.skills=inactive"
    stage = int(zero.get("stage", 0))
    if stage != 3:
        raise ValueError(f"{where} needs ZeRO stage 3 (its partitions move per skill), not stage {stage}")
    if optimizer.get("device") != "cpu" or float(optimizer.get("ratio", 1.0)) != 1.0:
        raise ValueError(f"{where} needs zero_optimization.offload_optimizer.device 'cpu' with the whole optimizer "
                         f"offloaded (ratio 1), so that an inactive skill's optimizer state is on the CPU already: "
                         f"e.g. distributed.ds_config=ds_configs/zero3_offload_skills.json")
    if (zero.get("offload_param") or {}).get("device", "none") != "none":
        raise ValueError(f"{where} cannot combine with zero_optimization.offload_param, which keeps every "
                         f"parameter on the CPU already")
    if not skill_names:
        raise ValueError(f"{where} needs a model with named skills (model.router 'skill')")


class SkillOffload:
    """Moves the skills' ZeRO-3 partitions between the accelerator and pinned CPU memory; built on an engine
    whose optimizer groups come from `skill_groups`. Call `begin_step(now, upcoming)` before a step's first
    forward (the skills its tasks run, and the next step's, to prefetch) and `before_optimizer_step()`
    after its last backward. Counts what it holds on the compute device and what it copies."""

    def __init__(self, engine, device: torch.device):
        optimizer = engine.optimizer
        self.optimizer, self.device = optimizer, device
        names = {id(p): n for n, p in engine.module.named_parameters()}
        self.sub_groups: dict[str, list[int]] = {}
        shared = []
        for i, params in enumerate(optimizer.fp16_groups):
            skills = {skill_of(names[id(p)]) for p in params}
            if len(skills) != 1:
                raise RuntimeError(f"ZeRO-3 sub-group {i} mixes skills {sorted(map(str, skills))}: build the "
                                   f"optimizer groups with training.zero.offload.skill_groups")
            skill = skills.pop()
            if skill is None:
                shared.append(i)
            else:
                self.sub_groups.setdefault(skill, []).append(i)
        flats = optimizer.fp16_partitioned_groups_flat
        pinned = device.type == "cuda"
        self.host = {i: torch.empty(flats[i].shape, dtype=flats[i].dtype, pin_memory=pinned).copy_(flats[i])
                     for ids in self.sub_groups.values() for i in ids}
        # the shared partitions in one buffer of their own; the skills' go to the host: the buffer that held
        # them all is freed once nothing points into it
        compact = torch.empty(sum(flats[i].numel() for i in shared), dtype=flats[0].dtype, device=device)
        offset = 0
        for i in shared:
            n = flats[i].numel()
            self._place(i, compact.narrow(0, offset, n).copy_(flats[i]))
            offset += n
        for i, buffer in self.host.items():
            self._place(i, buffer)
        optimizer.lp_param_buffer = compact
        self.shared_bytes = compact.numel() * compact.element_size()
        self.skill_bytes = {s: sum(self.host[i].numel() * self.host[i].element_size() for i in ids)
                            for s, ids in self.sub_groups.items()}
        self.resident: set[str] = set()
        self.pending: set[str] = set()  # copies in flight on the side stream
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.counts = {"misses": 0, "copied_in": 0, "peak": self.shared_bytes}
        for name, module in engine.module.named_modules():
            if (match := SKILL_MODULE.search(name)) and match.group(1) in self.sub_groups:
                module.register_forward_pre_hook(self._hook(match.group(1)), prepend=True)

    @property
    def model_bytes(self) -> int:
        """Every partition this rank holds, shared and skills."""
        return self.shared_bytes + sum(self.skill_bytes.values())

    @property
    def resident_bytes(self) -> int:
        """What lies on the compute device now."""
        return self.shared_bytes + sum(self.skill_bytes[s] for s in self.resident)

    def begin_step(self, now: set[str], upcoming: set[str]) -> None:
        """Make the skills `now` resident, send back those needed neither now nor next, and start copying in
        the `upcoming` ones."""
        now, upcoming = set(now) & set(self.sub_groups), set(upcoming) & set(self.sub_groups)
        self.join()
        for skill in sorted(self.resident - now - upcoming):
            self._evict(skill)
        for skill in sorted(now):
            self._bring(skill, prefetch=False)
        for skill in sorted(upcoming - now):
            self._bring(skill, prefetch=True)

    def before_optimizer_step(self) -> None:
        """The step writes every partition where it lies: the copies in flight land first."""
        self.join()

    def join(self) -> None:
        if self.stream is not None and self.pending:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.pending.clear()

    def take(self) -> dict[str, int]:
        """Since the last call: the peak of bytes resident on the compute device, bytes copied in, misses."""
        counts = {**self.counts, "model": self.model_bytes}
        self.counts = {"misses": 0, "copied_in": 0, "peak": self.resident_bytes}
        return counts

    def _hook(self, skill: str):
        def bring_in(module, args):
            if skill not in self.resident:
                self.counts["misses"] += 1
                self._bring(skill, prefetch=False)
            elif skill in self.pending:
                self.join()
        return bring_in

    def _bring(self, skill: str, prefetch: bool) -> None:
        if skill in self.resident:
            if not prefetch and skill in self.pending:
                self.join()
            return
        side = self.stream if prefetch else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        for i in self.sub_groups[skill]:
            buffer = torch.empty(self.host[i].shape, dtype=self.host[i].dtype, device=self.device)
            if side is not None:
                with torch.cuda.stream(side):
                    buffer.copy_(self.host[i], non_blocking=True)
                buffer.record_stream(side)
            else:
                buffer.copy_(self.host[i], non_blocking=self.device.type == "cuda")
            self._place(i, buffer)
        self.resident.add(skill)
        if side is not None:
            self.pending.add(skill)
        self.counts["copied_in"] += self.skill_bytes[skill]
        self.counts["peak"] = max(self.counts["peak"], self.resident_bytes)

    def _evict(self, skill: str) -> None:
        flats = self.optimizer.fp16_partitioned_groups_flat
        for i in self.sub_groups[skill]:
            self.host[i].copy_(flats[i])  # blocking: the host buffer is read by the optimizer step at once
            self._place(i, self.host[i])
        self.resident.discard(skill)

    def _place(self, i: int, flat: torch.Tensor) -> None:
        self.optimizer.fp16_partitioned_groups_flat[i] = flat
        self.optimizer._unflatten_partitioned_parameters(i)
