"""Stopping on a signal: SIGUSR1 (Slurm's `--signal`, sent before preemption or the time limit) means
checkpoint, stop and requeue; SIGTERM (a plain `scancel`) means checkpoint and stop. The ranks agree on
the strongest request at a step boundary, so they all save the same step."""

from __future__ import annotations

import os
import signal
import subprocess

import torch

GO_ON, STOP, REQUEUE = 0, 1, 2


class Stop:
    """Records the signals; `sum_and_agree` tells every rank what was asked of any."""

    def __init__(self):
        self.requested = GO_ON
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = max(self.requested, REQUEUE if signum == signal.SIGUSR1 else STOP)

    def sum_and_agree(self, counts: list[int], device) -> tuple[list[int], int]:
        """`counts` summed over the ranks, and the strongest stop any rank was asked for: one small
        all-reduce (the step's only host synchronisation)."""
        import torch.distributed as dist

        totals = torch.tensor([*counts, self.requested == STOP, self.requested == REQUEUE], dtype=torch.float64,
                              device=device)
        dist.all_reduce(totals)
        *summed, stop, requeue = totals.tolist()
        return [int(c) for c in summed], REQUEUE if requeue else STOP if stop else GO_ON


def requeue() -> bool:
    """Ask Slurm to requeue this job (from one rank); False outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return False
    subprocess.run(["scontrol", "requeue", job], check=False)
    return True
