"""What a run reports: TensorBoard scalars, a tqdm bar and `steps.jsonl` on rank 0, from a window of
per-task losses and counts summed over every rank since the last log (carried over a resume)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import torch


def show_each_warning_once() -> None:
    """Print each distinct warning (message and category) once per process. DeepSpeed calls collectives
    torch deprecates at every step, and the warnings filter's own "once" forgets what it showed whenever
    any library changes the filters (as `catch_warnings` does), which happens every step."""
    if getattr(warnings.showwarning, "shows_once", False):
        return
    seen, show = set(), warnings.showwarning

    def once(message, category, filename, lineno, file=None, line=None):
        key = (str(message), category)
        if key not in seen:
            seen.add(key)
            show(message, category, filename, lineno, file, line)

    once.shows_once = True
    warnings.showwarning = once


def quiet_third_party() -> None:
    """Keep a run's log to what its user can act on: each warning once per process (`show_each_warning_once`),
    and, filtered where they are raised, the messages that only say how a library works inside:
    - torch's deprecation of `all_gather_into_tensor` and `reduce_scatter_tensor`, which DeepSpeed's ZeRO
      calls (by category, message and the module torch raises it from);
    - DeepSpeed's "Setting accelerator to CPU" where it finds no GPU (a filter on its "DeepSpeed" logger, which
      it creates when first imported and never clears; its choice of accelerator is left alone)."""
    show_each_warning_once()
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", FutureWarning, r"torch\.distributed\.c10d_logger")
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _not_the_cpu_fallback not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_not_the_cpu_fallback)


def _not_the_cpu_fallback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def summed_over_ranks(**tables: dict) -> dict[str, dict]:
    """Each named table of numbers summed key by key over every rank (a collective: every rank calls it)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {name: {k: float(v) for k, v in table.items()} for name, table in tables.items()})
    totals = {name: {} for name in tables}
    for rank_tables in gathered:
        for name, table in rank_tables.items():
            for key, value in table.items():
                totals[name][key] = totals[name].get(key, 0) + value
    return totals


class Window:
    """Sums since the last log on this rank: loss and count per task, activations per skill. Losses stay on
    the device until `scalars` reads them (at logging steps); the window is part of the train state, so a
    resumed run logs what the uninterrupted one would."""

    def __init__(self):
        self.losses: dict[str, torch.Tensor | float] = {}
        self.counts: Counter = Counter()
        self.skills: Counter = Counter()

    def add(self, task: str, loss: torch.Tensor, skills: list[str]) -> None:
        self.losses[task] = self.losses.get(task, 0.0) + loss.detach()
        self.counts[task] += 1
        self.skills.update(skills)

    def scalars(self, **extra: dict) -> tuple[dict[str, float], dict[str, dict]]:
        """(TensorBoard scalars of the window over all ranks: `loss` and `loss/<task>` as means per
        micro-batch, `tasks/<task>` counts, `skills/activations/<skill>`; the `extra` tables summed over
        ranks too), then clear it. A collective."""
        totals = summed_over_ranks(losses=self.losses, counts=self.counts, skills=self.skills, **extra)
        counts = totals["counts"]
        scalars = {f"loss/{t}": totals["losses"][t] / n for t, n in counts.items()}
        scalars["loss"] = sum(totals["losses"].values()) / max(1, sum(counts.values()))
        scalars.update({f"tasks/{t}": n for t, n in counts.items()})
        scalars.update({f"skills/activations/{s}": n for s, n in totals["skills"].items()})
        self.losses, self.counts, self.skills = {}, Counter(), Counter()
        return scalars, {name: totals[name] for name in extra}

    def state_dict(self) -> dict:
        return {"losses": {t: float(v) for t, v in self.losses.items()}, "counts": dict(self.counts),
                "skills": dict(self.skills)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = dict(state["losses"])
        self.counts, self.skills = Counter(state["counts"]), Counter(state["skills"])

    @staticmethod
    def summed(states: list[dict]) -> dict:
        """Several ranks' saved windows as one (what a rank of a resized run carries for them all)."""
        losses, counts, skills = Counter(), Counter(), Counter()
        for state in states:
            losses.update(state["losses"])
            counts.update(state["counts"])
            skills.update(state["skills"])
        return {"losses": dict(losses), "counts": dict(counts), "skills": dict(skills)}


class Metrics:
    """TensorBoard scalars, a tqdm bar and `steps.jsonl` (one record per step) on rank 0. Step records may
    hold device tensors: they are read (one host sync) and written when `flush` is called, at logging
    steps and before every checkpoint, so `steps.jsonl` always covers the newest checkpoint."""

    def __init__(self, run_dir: Path, main: bool, total: int, start: int, desc: str):
        self.main = main
        self.writer = self.bar = self.steps = None
        self.pending: list[dict] = []
        if main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            tqdm.monitor_interval = 0  # no monitor thread: nothing of ours runs on after `close`
            self.bar = tqdm(total=total, initial=start, desc=desc, unit=" steps", dynamic_ncols=True)
            self.steps = (run_dir / "steps.jsonl").open("a")

    def log(self, step: int, scalars: dict) -> None:
        if not self.main:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.3f}")

    def advance(self, step: int, record: dict) -> None:
        """A step's record, stamped with the time it ended (seconds since the epoch)."""
        if self.main:
            self.bar.update(1)
            self.pending.append({"step": step, "time": time.time(), **record})

    def flush(self) -> None:
        if self.main and self.pending:
            for record in self.pending:
                self.steps.write(json.dumps({k: float(v) if torch.is_tensor(v) else v
                                             for k, v in record.items()}) + "\n")
            self.steps.flush()
            self.pending.clear()

    def close(self, flush: bool = True) -> None:
        """`flush=False` after a failure: the records since the last checkpoint stay unwritten, as that
        checkpoint does not hold them."""
        if flush:
            self.flush()
        if self.main:
            self.writer.close()
            self.bar.close()
            self.steps.close()


def skill_grad_norms(model) -> dict[str, float]:
    """L2 norm of each skill's gradient over all its layers (a collective). Under ZeRO-3 every rank gathers
    each skill parameter's gradient, so call it on logging steps only, after the last backward of a step
    and before the optimizer steps."""
    import math

    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    squares: Counter = Counter()
    for name, param in model.named_parameters():
        if ".skills." in name:
            grad = safe_get_full_grad(param)
            if grad is not None:
                squares[name.split(".skills.")[1].split(".")[0]] += float(grad.float().pow(2).sum())
    everyone = [None] * dist.get_world_size()  # under skill parallelism each rank holds some of the skills
    dist.all_gather_object(everyone, dict(squares))
    return {skill: math.sqrt(total) for held in everyone for skill, total in held.items()}


def memory_scalars() -> dict[str, float]:
    import psutil

    scalars = {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return scalars
