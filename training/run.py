"""The skeleton both trainers' command lines share: what `prepare` checked before any process group
(`Prepared`), the run around it (`run`: quiet logs, bad input refused in one line, the process group left on
every way out) and the exit status: 0 finished, 2 bad input, 3 stopped early by a signal (checkpointed)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import distributed
from .checkpoint import Resume
from .metrics import quiet_third_party

DONE, BAD_INPUT, STOPPED = 0, 2, 3
INPUT_ERRORS = (ValueError, FileNotFoundError, TypeError, NotImplementedError)
"""What `prepare` raises for bad input (a config, data, a checkpoint): one line, exit status 2."""


@dataclass
class Prepared:
    """What a trainer's `prepare` checked and built before any process group or heavy work."""
    config: Any
    """The run's resolved config."""
    tokenizer: Any
    ds: dict
    """The DeepSpeed config, read and filled in (a bad file fails here)."""
    resume: Resume | None


def refuse(error: BaseException) -> int:
    print(f"error: {error}", file=sys.stderr)
    return BAD_INPUT


def exit_status(result: dict, steps: int) -> int:
    """DONE when training reached `steps`, STOPPED when a signal ended it earlier."""
    return STOPPED if result["step"] < steps else DONE


def run(prepare: Callable[[], Prepared], train: Callable[[Prepared], int]) -> int:
    """`prepare()`, the process group, then `train(prepared)`, which returns the exit status. Bad input is
    refused before the process group starts; the group is left on every way out."""
    quiet_third_party()
    try:
        try:
            prepared = prepare()
            distributed.init(distributed.detect())  # a device error here is one line too
        except INPUT_ERRORS as e:
            return refuse(e)
        return train(prepared)
    finally:
        distributed.shutdown()
