"""The loop both trainers run: steps until the last, logging every `log_every` steps and checkpointing every
`checkpoint_every`, on a stop signal (then stopping, and asking Slurm to requeue for SIGUSR1) and at the
end (also when it resumed at its last step: `resume=<another run's checkpoint>` with that step rewrites the
checkpoint for this run's ranks and skill placement). A trainer brings its step, its scalars and its
checkpoint (see `Trainer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .metrics import Metrics
from .signals import GO_ON, REQUEUE, Stop, requeue


class Trainer(Protocol):
    @property
    def steps_done(self) -> int: ...  # optimizer steps done

    def train_step(self, stop: Stop) -> tuple[dict, int]:
        """One optimizer step: its record for `steps.jsonl`, and the stop any rank was asked for."""

    def scalars(self) -> dict:
        """TensorBoard scalars of the steps since the last log (a collective: every rank calls it)."""

    def after_step(self, step: int, last: bool) -> dict:
        """Anything else a step ends with (e.g. evaluation); its scalars, logged at once."""

    def save(self) -> Path:
        """Checkpoint the current step (a collective)."""


def train_loop(trainer: Trainer, steps: int, log_every: int, checkpoint_every: int, metrics: Metrics,
               is_main: bool, checkpoint_at: tuple[int, ...] = ()) -> dict:
    """Runs `trainer` to `steps`, checkpointing also at the steps `checkpoint_at`; returns {step, checkpoint,
    stopped, requeued}. On a failure the progress
    bar ends before the error propagates, and the step records since the last checkpoint stay unwritten
    (that checkpoint does not hold them)."""
    stop, saved, stopping = Stop(), None, GO_ON
    try:
        while trainer.steps_done < steps and stopping == GO_ON:
            record, stopping = trainer.train_step(stop)
            step = trainer.steps_done
            metrics.advance(step, record)
            scalars = trainer.scalars() if step % log_every == 0 or step == steps else {}
            scalars.update(trainer.after_step(step, step == steps))
            if scalars:
                metrics.log(step, scalars)
                metrics.flush()
            if step % checkpoint_every == 0 or step == steps or stopping != GO_ON or step in checkpoint_at:
                metrics.flush()
                saved = trainer.save()
        if saved is None:  # resumed at its last step: the run's folder still ends with its checkpoint (the
            saved = trainer.save()  # same one, or, resumed from elsewhere, one in this run's layout)
        requeued = stopping == REQUEUE and is_main and requeue()
    except BaseException:
        metrics.close(flush=False)
        raise
    metrics.close()
    return {"step": trainer.steps_done, "checkpoint": saved, "stopped": stopping != GO_ON, "requeued": requeued}
