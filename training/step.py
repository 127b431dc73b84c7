"""One optimizer step over several micro-batches, on a DeepSpeed engine of any ZeRO stage."""

from __future__ import annotations

import contextlib

from .zero.internals import clear_gradient_partitions, one_reduction


class _Backward:
    def __init__(self, engine, micro_batches: int, coalesce: bool):
        self.engine, self.micro_batches, self.coalesce, self.done = engine, micro_batches, coalesce, 0

    def __call__(self, loss) -> None:
        self.done += 1
        if self.done > self.micro_batches:
            raise RuntimeError(f"more backward passes than the step's {self.micro_batches} micro-batches")
        if self.coalesce:  # the engine sees one micro-step: scale here
            self.engine.backward(loss / self.micro_batches)
            return
        self.engine.backward(loss)  # the engine scales by its gradient_accumulation_steps
        if self.done < self.micro_batches:
            self.engine.step()  # counted as a micro-step; the optimizer steps at the boundary, below


@contextlib.contextmanager
def optimizer_step(engine, micro_batches: int, coalesce: bool = False, before_step=None):
    """`with optimizer_step(engine, n) as backward:` call `backward(loss)` once per micro-batch; the
    optimizer steps when the block ends (`before_step()` first, e.g. to read gradients), and gradients the
    step's tasks left untouched are cleared (see `clear_gradient_partitions`).

    `coalesce`: hold all the step's gradients and reduce them once at the end, in parameter order (for
    ranks whose backward graphs differ, see `one_reduction`); the engine's `gradient_accumulation_steps`
    must then be 1. Otherwise it must be `micro_batches`."""
    backward = _Backward(engine, micro_batches, coalesce)
    with one_reduction(engine) if coalesce else contextlib.nullcontext():
        yield backward
    if backward.done != micro_batches:
        raise RuntimeError(f"{backward.done} backward passes in a step of {micro_batches} micro-batches")
    if before_step is not None:
        before_step()
    engine.step()
    clear_gradient_partitions(engine)
