"""The raw samples of one source for one slot (`SourceStream`): its shards dealt per epoch, read in rounds
through a shuffle buffer, resumable at any sample; and `DataError`, for data that cannot feed the run."""

from __future__ import annotations

import math
from typing import Iterator

from training.sampling import seeded

from .config import DataConfig
from .shards import SkipCounter, Source, read_raw_samples


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a task none of whose samples decode). Raised in a DataLoader worker,
    it reaches the training process wrapped in the worker's traceback: `one_line` recovers the message."""

    @staticmethod
    def one_line(error: BaseException) -> str:
        return str(error).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]


class SourceStream:
    """The raw samples of one source for one slot, round after round, shuffled and resumable.

    A round is read from a *spec*: its shards, the key of its shuffle, and how many of its samples to pass
    over (already read). A stream first reads the rounds *carried* to it when a run was resharded, then
    its own regular rounds: those of epoch `base_epoch` onwards, dealt over the slots of its layout
    (`reshards`, the number of reshardings behind it, is part of every seed it draws, so a resharded run
    draws anew)."""

    def __init__(self, source: Source, name: str, slot: int, num_slots: int, cfg: DataConfig, skipped: SkipCounter,
                 reshards: int = 0):
        self.source, self.name, self.slot, self.num_slots = source, name, slot, num_slots
        self.cfg, self.skipped = cfg, skipped
        self.reshards = reshards
        mine = len(range(slot, len(source.urls), num_slots))
        self.rounds_per_epoch = max(1, math.ceil(mine / cfg.shards_per_round))
        self.round, self.emitted, self.carry, self.base_epoch = 0, 0, [], 0
        self._samples: Iterator[dict] | None = None
        self.reading: int | None = None
        """The epoch of the round being read."""

    def state(self) -> dict:
        return {"round": self.round, "emitted": self.emitted, "carry": [dict(c) for c in self.carry],  # a copy: the
                "base_epoch": self.base_epoch}                                                # stream moves on

    def describe(self) -> str:
        urls = self.source.urls
        return f"{self.name} ({len(urls)} shard{'s' * (len(urls) > 1)}, e.g. {urls[0]})"

    def load_state(self, state: dict) -> None:
        self.round, self.emitted, self._samples = state["round"], state["emitted"], None
        self.carry, self.base_epoch = [dict(c) for c in state.get("carry", [])], state.get("base_epoch", 0)

    def _key(self, kind: str, *rest) -> list:
        return [self.cfg.seed, self.name, kind, *([self.reshards] if self.reshards else []), *rest]

    def round_shards(self, r: int) -> list[str]:
        urls, per = self.source.urls, self.cfg.shards_per_round
        if self.cfg.resample:
            return seeded(*self._key("resample", self.slot, r)).choices(urls, k=per)
        epoch, j = divmod(r, self.rounds_per_epoch)
        order = list(urls)
        seeded(self.cfg.seed, self.name, "epoch", self.base_epoch + epoch).shuffle(order)
        return order[self.slot :: self.num_slots][j * per : (j + 1) * per]

    def round_spec(self, r: int) -> dict:
        """Round `r`'s shards, shuffle key and epoch (None: resampled)."""
        epoch = None if self.cfg.resample else self.base_epoch + r // self.rounds_per_epoch
        return {"urls": self.round_shards(r), "shuffle": self._key("shuffle", self.slot, r), "skip": 0, "epoch": epoch}

    def epoch(self) -> int:
        """The epoch this stream is in (the one before `base_epoch` while it reads carried rounds)."""
        return self.base_epoch - 1 if self.carry else self.base_epoch + self.round // self.rounds_per_epoch

    def remainder(self, through_epoch: int) -> list[dict]:
        """The specs of what this stream has left to read: its carried rounds and current round less the
        samples read, then (unless resampled) its untouched rounds of the epochs up to `through_epoch`."""
        specs = [dict(c) for c in self.carry] or [self.round_spec(self.round)]
        specs[0]["skip"] += self.emitted
        r = 0 if self.carry else self.round + 1
        while not self.cfg.resample and self.base_epoch + r // self.rounds_per_epoch <= through_epoch:
            specs.append(self.round_spec(r))
            r += 1
        return [spec for spec in specs if spec["urls"]]

    def _round(self, spec: dict) -> Iterator[dict]:
        rng = seeded(*spec["shuffle"])
        size, buffer = self.cfg.shuffle_buffer, []
        for url in spec["urls"]:
            for sample in read_raw_samples(url, self.skipped):
                if len(buffer) < size:
                    buffer.append(sample)
                    continue
                i = rng.randrange(size)
                yield buffer[i]
                buffer[i] = sample
        rng.shuffle(buffer)
        yield from buffer

    def __next__(self) -> dict:
        empty_rounds = 0
        while True:
            if self._samples is None:
                spec = self.carry[0] if self.carry else self.round_spec(self.round)
                self._samples, self.reading = self._round(spec), spec.get("epoch")
                with self.skipped.muted():  # the replayed part was counted before the restart
                    for _ in range(spec["skip"] + self.emitted):
                        next(self._samples, None)
            sample = next(self._samples, None)
            if sample is not None:
                self.emitted += 1
                return sample
            empty_rounds = empty_rounds + 1 if self.emitted == 0 and not self.carry else 0
            if empty_rounds > self.rounds_per_epoch + 10:
                raise DataError(f"source {self.describe()} yields no readable samples "
                                f"(skipped so far: {dict(self.skipped)})")
            if self.carry:
                self.carry.pop(0)
            else:
                self.round += 1
            self.emitted, self._samples = 0, None
