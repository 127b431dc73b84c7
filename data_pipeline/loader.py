"""Streaming, mixing and exact resume of WebDataset shards across ranks and data-loader workers.

Each (rank, worker) pair is a *slot*. Every epoch the shards of a source are shuffled with the shared seed
and dealt to the slots (shard i of the permutation to slot i mod slots), so no sample reaches two slots in
an epoch. A slot reads its shards in *rounds* of `shards_per_round` shards through a shuffle buffer that
drains at the end of each round; its position is (round, samples emitted in the round). Resuming replays
the current round's raw samples (no decoding) up to that position, so a restarted run yields exactly the
keys of an uninterrupted one. With `resample`, each round draws its shards with replacement instead
(an infinite stream).

Batches are built inside the workers. Batch i of a rank comes from worker i mod W (the DataLoader's
round-robin order), and its task is drawn for index i from the shared seed with probability
proportional to (task size)^alpha, so every rank trains the same task at the same step.

A resume with another number of ranks or workers, or another split of tasks over ranks, *reshards* the
stream: what every slot of the saved run had left of its current epoch (the rest of its current round,
replayed and cut where it stopped, and its untouched rounds) is dealt to the new slots, which read it
before starting the next epoch, laid out for the new slots. So no sample of an epoch under way is read
twice or left out, and the task mixture is the same; the order of the samples is not the one a run of the
new size would have read from the start. Resampled sources carry over their current rounds and then draw
new ones.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.sampling import TaskSampler, seeded

from .media import BadSample, MediaConfig, decode_sample
from .shards import MODALITIES, SkipCounter, Source, check_modality, open_source, read_raw_samples


@dataclass
class SourceConfig:
    """One dataset feeding a task."""

    shards: str
    """Shard pattern: local paths with braces (`data/img-{000000..000127}.tar`), `::`-separated lists, `pipe:`
    commands, or an index file (`data/img.index.json`) standing for all the shards it lists."""
    index: str | None = None
    """The shard index; by default `<prefix>.index.json` beside the shards."""
    weight: float = 1.0
    """Relative draw weight among the task's sources (per sample)."""


@dataclass
class TaskConfig:
    """A stream of batches for one task: its modality and sources. Its skills come from the model's task table."""

    name: str
    modality: str
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks to mix."""
    batch_size: int = 8
    """Samples per batch on each rank."""
    alpha: float = 1.0
    """Task i is drawn with probability proportional to (its samples)^alpha: 0 uniform, 1 natural."""
    batch_mode: str = "task"
    """"task": each batch is one task (the papers' default); "mixed": each sample draws its own task."""
    shuffle_buffer: int = 256
    """Samples held by each slot's shuffle buffer."""
    shards_per_round: int = 4
    """Shards a slot reads per round; the buffer drains each round, and a resume replays at most one."""
    resample: bool = False
    """Draw each round's shards with replacement (infinite stream, no epochs)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: in the main process)."""
    prefetch_batches: int = 4
    """Batches each worker may have ready ahead: room for tasks whose batches cost very different times."""
    seed: int = 0
    max_text_tokens: int = 128
    """Text, code and captions are truncated to this many tokens."""
    max_consecutive_skips: int = 1000
    """A task whose last this-many drawn samples were all unusable stops the run (its data is broken)."""

    def __post_init__(self):
        self.tasks = [t if isinstance(t, TaskConfig) else TaskConfig(**t) for t in self.tasks]
        for t in self.tasks:
            t.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in t.sources]

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("data: no tasks")
        for t in self.tasks:
            check_modality(t.modality)
            if not t.sources:
                raise ValueError(f"data: task {t.name!r} has no sources")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"data.alpha must be in [0, 1], got {self.alpha}")
        if self.batch_mode not in ("task", "mixed"):
            raise ValueError(f"data.batch_mode must be 'task' or 'mixed', got {self.batch_mode!r}")
        if self.batch_mode == "mixed" and len({t.modality for t in self.tasks}) > 1:
            raise ValueError("data.batch_mode 'mixed' needs tasks of one modality (a batch feeds one front-end)")
        if self.batch_size < 1 or self.shuffle_buffer < 1 or self.shards_per_round < 1 or self.num_workers < 0:
            raise ValueError("data: batch_size, shuffle_buffer and shards_per_round must be >= 1, num_workers >= 0")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"data.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a task none of whose samples decode). Raised in a DataLoader worker,
    it reaches the training process wrapped in the worker's traceback: `one_line` recovers the message."""

    @staticmethod
    def one_line(error: BaseException) -> str:
        return str(error).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]


_rng = seeded


class SourceStream:
    """The raw samples of one source for one slot, round after round, shuffled and resumable.

    A round is read from a *spec*: its shards, the key of its shuffle, and how many of its samples to pass
    over (already read). A stream first reads the rounds *carried* to it when a run was resharded, then
    its own regular rounds: those of epoch `base_epoch` onwards, dealt over the slots of its generation
    (the number of reshardings behind it, part of every seed it draws, so a resharded run draws anew)."""

    def __init__(self, source: Source, name: str, slot: int, num_slots: int, cfg: DataConfig, skipped: SkipCounter,
                 generation: int = 0):
        self.source, self.name, self.slot, self.num_slots, self.cfg, self.skipped = source, name, slot, num_slots, cfg, skipped
        self.generation = generation
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
        return [self.cfg.seed, self.name, kind, *([self.generation] if self.generation else []), *rest]

    def round_shards(self, r: int) -> list[str]:
        urls, per = self.source.urls, self.cfg.shards_per_round
        if self.cfg.resample:
            return _rng(*self._key("resample", self.slot, r)).choices(urls, k=per)
        epoch, j = divmod(r, self.rounds_per_epoch)
        order = list(urls)
        _rng(self.cfg.seed, self.name, "epoch", self.base_epoch + epoch).shuffle(order)
        return order[self.slot :: self.num_slots][j * per : (j + 1) * per]

    def round_spec(self, r: int) -> dict:
        """Round `r`'s shards, shuffle key and epoch (None: resampled)."""
        epoch = None if self.cfg.resample else self.base_epoch + r // self.rounds_per_epoch
        return {"urls": self.round_shards(r), "shuffle": self._key("shuffle", self.slot, r), "skip": 0, "epoch": epoch}

    def epoch(self) -> int:
        """The epoch this stream is in (before its generation's first while it reads carried rounds)."""
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
        rng = _rng(*spec["shuffle"])
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
                raise DataError(f"source {self.describe()} yields no readable samples (skipped so far: {dict(self.skipped)})")
            if self.carry:
                self.carry.pop(0)
            else:
                self.round += 1
            self.emitted, self._samples = 0, None


class Collator:
    """Decoded samples of one modality -> padded model inputs, captions tokenised alongside."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def _tokens(self, texts: list[str], prefix: str = "") -> dict:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {f"{prefix}input_ids": enc["input_ids"], f"{prefix}attention_mask": enc["attention_mask"]}

    def __call__(self, samples: list[dict], modality: str) -> dict:
        batch = {"keys": [s["key"] for s in samples], "epochs": [s.get("epoch") for s in samples]}
        if modality == "text":
            batch["texts"] = [s["text"] for s in samples]
            batch.update(self._tokens(batch["texts"]))
            return batch
        batch.update(self._tokens([s["caption"] for s in samples], "caption_"))
        if modality == "code":
            batch.update(self._tokens([s["code"] for s in samples]))
        elif modality == "audio":
            frames = [s["input_features"].shape[1] for s in samples]
            features = torch.zeros(len(samples), samples[0]["input_features"].shape[0], max(frames))
            mask = torch.zeros(len(samples), max(frames), dtype=torch.long)
            for i, (s, n) in enumerate(zip(samples, frames)):
                features[i, :, :n] = s["input_features"]
                mask[i, :n] = 1
            batch["input_features"], batch["feature_attention_mask"] = features, mask
        else:
            name = "pixel_values" if modality == "image" else "pixel_values_videos"
            batch[name] = _stack([s[name] for s in samples])
        return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack; inside a DataLoader worker, straight into shared memory, so sending the batch to the
    training process copies nothing more (as torch's default collate does)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    out = tensors[0].new_empty((len(tensors), *tensors[0].shape)).share_memory_()
    return torch.stack(tensors, out=out)


class _SlotBatches(IterableDataset):
    """What one DataLoader worker runs: the batches of its logical slot, with the slot's state attached."""

    def __init__(self, loader: "MultiTaskLoader", offset: int, resume: dict[int, dict]):
        self.loader, self.offset, self.resume = loader, offset, resume

    def __iter__(self):
        info = get_worker_info()
        workers = max(1, self.loader.cfg.num_workers)
        logical = (info.id + self.offset) % workers if info is not None else 0
        for batch in self.loader._slot_batches(logical, self.resume.get(logical)):
            yield _pack(batch) if info is not None else batch


# Tensors below this size cross from a worker pickled inline (as numpy): passing a shared-memory file
# descriptor costs the training process a socket round trip per tensor, more than copying a few kB.
INLINE_BYTES = 1 << 26


def _pack(batch: dict) -> dict:
    return {k: v.numpy() if torch.is_tensor(v) and v.nbytes < INLINE_BYTES else v for k, v in batch.items()}


def _unpack(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Slurm signals every process of a job step, loader workers too: `--signal` sends SIGUSR1, a plain
    `scancel` SIGTERM. A worker killed by either would end the run with the DataLoader's error before the
    trainer checkpoints. Workers ignore SIGUSR1 and every SIGTERM but their parent's (torch's own worker
    handler dies of a foreign one): the trainer checkpoints, stops and then stops them."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    threading.Thread(target=_exit_on_the_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _exit_on_the_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's handler does when the DataLoader (or multiprocessing at exit) stops us


def _as_is(batch):
    return batch


class MultiTaskLoader:
    """Batches of tasks mixed by the alpha rule, split over ranks and workers, with exact resume.

    Every batch is a dict of model inputs plus `task` (a name, or one per sample in mixed mode),
    `modality`, `skills` and `keys`. `state_dict()` is the position after the batches consumed so far.
    """

    def __init__(self, cfg: DataConfig, tokenizer, media: MediaConfig, task_skills: dict[str, list[str]],
                 rank: int = 0, world_size: int = 1):
        cfg.validate()
        unknown = [t.name for t in cfg.tasks if t.name not in task_skills]
        if unknown:
            raise ValueError(f"data tasks {unknown} are not in the model's task table {sorted(task_skills)}")
        self.cfg, self.tokenizer, self.media, self.task_skills = cfg, tokenizer, media, task_skills
        self.rank, self.world_size = rank, world_size
        self.sources = {t.name: [open_source(s.shards, s.index, s.weight) for s in t.sources] for t in cfg.tasks}
        for t in cfg.tasks:
            for src, spec in zip(self.sources[t.name], t.sources):
                if src.index.modality != t.modality:
                    raise ValueError(f"task {t.name!r} is {t.modality} but {spec.shards} holds {src.index.modality}")
            for i, (src, spec) in enumerate(zip(self.sources[t.name], t.sources)):
                if src.samples == 0:
                    raise ValueError(f"task {t.name!r}: source {spec.shards} holds no samples (index {src.index.path})")
                slots = world_size * max(1, cfg.num_workers)
                if not cfg.resample and len(src.urls) < slots:
                    raise ValueError(f"task {t.name!r}: source {spec.shards} has {len(src.urls)} shards for {slots} "
                                     f"readers ({world_size} ranks x {max(1, cfg.num_workers)} workers): write more, "
                                     "smaller shards, use fewer workers, or set data.resample")
        self.sizes = [sum(s.samples for s in self.sources[t.name]) for t in cfg.tasks]
        self.sampler = TaskSampler([t.name for t in cfg.tasks], self.sizes, cfg.alpha, cfg.seed)
        self.probabilities = self.sampler.probabilities
        self.consumed, self.generation = 0, 0
        self.slot_states: dict[int, dict] = {}
        self.task_groups, self.group = None, 0
        self.collate = Collator(tokenizer, cfg.max_text_tokens)

    # -- what every rank agrees on ---------------------------------------------------------------------

    def split_tasks(self, task_groups: list[list[str]], group: int) -> None:
        """Train this rank on the tasks of `task_groups[group]` only (skill parallelism's data-local
        placement; rank r is at position r mod the number of groups): batch i of a rank at position g is
        drawn from group g's tasks, by the alpha rule among them, with the same seed everywhere, so every
        rank knows every position's task. A task's shards are dealt over the ranks that train it."""
        self.task_groups, self.group = task_groups, group

    def readers(self) -> dict[str, list[int]]:
        """The ranks reading each task: every rank, or (split tasks) those at the positions training it."""
        ranks = range(self.world_size)
        if self.task_groups is None:
            return {t.name: list(ranks) for t in self.cfg.tasks}
        return {t.name: [r for r in ranks if t.name in self.task_groups[r % len(self.task_groups)]] for t in self.cfg.tasks}

    def layout(self) -> dict:
        """What a resume must share with the saved run to continue each slot as it was (else: `reshard`)."""
        return {"world_size": self.world_size, "num_workers": self.cfg.num_workers, "readers": self.readers()}

    def task_for_batch(self, index: int, group: int | None = None) -> str:
        """The task of batch `index` of the ranks at position `group` (this rank's by default); without
        task groups, the same on every rank (shared seed, no communication)."""
        among = None if self.task_groups is None else self.task_groups[self.group if group is None else group]
        return self.sampler.task(index, among)

    # -- inside a worker -------------------------------------------------------------------------------

    def _streams(self, rank: int, logical: int, workers: int, readers: dict[str, list[int]], generation: int,
                 skipped: SkipCounter) -> dict[str, list[SourceStream]]:
        """The streams of slot (rank, logical worker) for the tasks the rank reads; a task's slots are its
        readers' workers, rank by rank."""
        streams = {}
        for t in self.cfg.tasks:
            if rank in readers[t.name]:
                slot, num_slots = readers[t.name].index(rank) * workers + logical, len(readers[t.name]) * workers
                streams[t.name] = [SourceStream(src, f"{t.name}.{i}", slot, num_slots, self.cfg, skipped, generation)
                                   for i, src in enumerate(self.sources[t.name])]
        return streams

    def _slot_batches(self, logical: int, state: dict | None) -> Iterator[dict]:
        cfg, workers = self.cfg, max(1, self.cfg.num_workers)
        skipped = SkipCounter()
        generation = state.get("generation", 0) if state is not None else self.generation
        streams = self._streams(self.rank, logical, workers, self.readers(), generation, skipped)
        modality = {t.name: t.modality for t in cfg.tasks}
        draws = Counter()
        made = 0
        if state is not None:
            made, draws = state["batches"], Counter(state["draws"])
            skipped.update(state["skipped"])
            for name, task_streams in streams.items():
                for i, stream in enumerate(task_streams):
                    stream.load_state(state["sources"][f"{name}.{i}"])
        while True:
            index = made * workers + logical
            if cfg.batch_mode == "task":
                tasks = [self.task_for_batch(index)] * cfg.batch_size
            else:
                tasks = self.sampler.tasks(cfg.batch_size, self.rank, index)
            samples = [self._next_sample(streams[t], t, modality[t], draws, skipped) for t in tasks]
            batch = self.collate(samples, modality[tasks[0]])
            made += 1
            if self.task_groups is not None:
                batch["group_tasks"] = [self.task_for_batch(index, g) for g in range(len(self.task_groups))]
            batch.update(task=tasks[0] if cfg.batch_mode == "task" else tasks, modality=modality[tasks[0]],
                         skills=self.task_skills[tasks[0]] if cfg.batch_mode == "task" else [self.task_skills[t] for t in tasks])
            batch["_state"] = {"slot": logical, "batches": made, "draws": dict(draws), "skipped": dict(skipped),
                               "generation": generation, "sources": {s.name: s.state() for ss in streams.values() for s in ss}}
            yield batch

    def _next_sample(self, streams: list[SourceStream], task: str, modality: str, draws: Counter,
                     skipped: SkipCounter) -> dict:
        weights = [s.source.weight for s in streams]
        failed, tried = Counter(), set()
        while sum(failed.values()) < self.cfg.max_consecutive_skips:
            stream = streams[0]
            if len(streams) > 1:
                g, slot = streams[0].generation, streams[0].slot
                stream = _rng(self.cfg.seed, "source", *([g] if g else []), task, slot, draws[task]).choices(streams, weights)[0]
            draws[task] += 1
            raw = next(stream)
            try:
                return {**decode_sample(raw, modality, self.media), "epoch": stream.reading}
            except BadSample as e:
                skipped.skip(e.reason, raw["__url__"], raw["__key__"], e.detail)
                failed[e.reason] += 1
                tried.add(stream)
        reasons = ", ".join(f"{n} {r}" for r, n in failed.most_common())
        raise DataError(f"task {task!r}: the last {sum(failed.values())} samples drawn were all unusable ({reasons}) "
                        f"from source {', '.join(s.describe() for s in tried)}; see the warnings above for examples")

    # -- in the training process -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        workers = self.cfg.num_workers
        dataset = _SlotBatches(self, self.consumed % max(1, workers), dict(self.slot_states))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # dropout would differ from the uninterrupted run's
        batches = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                             worker_init_fn=_leave_signals_to_the_trainer,
                             generator=torch.Generator().manual_seed(self.cfg.seed),
                             prefetch_factor=self.cfg.prefetch_batches if workers else None,
                             persistent_workers=False,
                             pin_memory=torch.cuda.is_available())  # copied to the GPU without stopping the host
        for batch in batches:
            batch = _unpack(batch)
            state = batch.pop("_state")
            self.slot_states[state["slot"]] = state
            self.consumed += 1
            yield batch

    @property
    def skipped(self) -> Counter:
        """Samples skipped so far on this rank, by reason (corrupt_shard, undecodable_image, empty_caption...)."""
        total = Counter()
        for state in self.slot_states.values():
            total.update(state["skipped"])
        return total

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "slots": self.slot_states, "num_workers": self.cfg.num_workers,
                "world_size": self.world_size, "rank": self.rank, "seed": self.cfg.seed, "readers": self.readers(),
                "generation": self.generation, "shards": self._shards()}

    def _shards(self) -> dict[str, int]:
        return {f"{t.name}.{i}": len(src.urls) for t in self.cfg.tasks for i, src in enumerate(self.sources[t.name])}

    def saved_layout(self, state: dict) -> dict:
        """The `layout` of a saved state (one written before task splits were recorded: every rank read every task)."""
        every = list(range(state["world_size"]))
        readers = state.get("readers") or {}
        return {"world_size": state["world_size"], "num_workers": state["num_workers"],
                "readers": {t.name: readers.get(t.name, every) for t in self.cfg.tasks}}

    def check_state(self, state: dict) -> None:
        """Refuse a saved state whose positions do not map onto this run's sources (another seed, other shards)."""
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"data loader state was saved with data.seed={state['seed']}, this run has {self.cfg.seed}")
        now = self._shards()
        for name, n in state.get("shards", {}).items():
            if now.get(name) != n:
                task, i = name.rsplit(".", 1)
                raise ValueError(f"data loader state was saved with {n} shards in task {task!r} source {i}; this run has "
                                 f"{now.get(name, 'no such source')}: the saved positions do not map")

    def needs_reshard(self, state: dict) -> bool:
        """Whether a saved state (any rank's) was written by another layout (ranks, workers, task split)."""
        return self.saved_layout(state) != self.layout()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank stopped; the layout must be the saved one (else `reshard`)."""
        self.check_state(state)
        if self.needs_reshard(state) or state["rank"] != self.rank:
            raise ValueError(f"data loader state was saved with layout {self.saved_layout(state)}, this run has "
                             f"{self.layout()}: reshard it")
        self.consumed, self.generation = state["consumed"], state.get("generation", 0)
        self.slot_states = {int(k): v for k, v in state["slots"].items()}

    def reshard(self, states: list[dict]) -> None:
        """Continue the stream of a run of another layout from every one of its ranks' states (in rank order):
        each source's leftovers of the epochs under way, dealt to this run's slots (see the module
        docstring), the batch count and the skip counts carried over."""
        for state in states:
            self.check_state(state)
        old = self.saved_layout(states[0])
        old_workers, old_readers = max(1, old["num_workers"]), old["readers"]
        old_generation = max(state.get("generation", 0) for state in states)
        generation, workers, readers = old_generation + 1, max(1, self.cfg.num_workers), self.readers()
        dealt: dict[str, tuple[list[list[dict]], int]] = {}  # stream -> (specs per new slot, base epoch)
        for t in self.cfg.tasks:
            old_streams = []
            for rank in old_readers[t.name]:
                for logical in range(old_workers):
                    slot = states[rank]["slots"].get(logical) or states[rank]["slots"].get(str(logical))
                    streams = self._streams(rank, logical, old_workers, old_readers,
                                            slot.get("generation", 0) if slot else states[rank].get("generation", 0),
                                            SkipCounter())[t.name]
                    for i, stream in enumerate(streams):
                        if slot is not None:
                            stream.load_state(slot["sources"][f"{t.name}.{i}"])
                    old_streams.append(streams)
            new_slots = len(readers[t.name]) * workers
            for i in range(len(self.sources[t.name])):
                through = max(streams[i].epoch() for streams in old_streams)
                specs = [spec for streams in old_streams for spec in streams[i].remainder(through)]
                dealt[f"{t.name}.{i}"] = ([specs[j::new_slots] for j in range(new_slots)], through + 1)
        self.consumed, self.generation = states[0]["consumed"], generation
        skipped = Counter()
        for state in states:
            for slot in state["slots"].values():
                skipped.update(slot["skipped"])
        self.slot_states = {}
        for logical in range(workers):
            sources = {}
            for t in self.cfg.tasks:
                if self.rank in readers[t.name]:
                    slot = readers[t.name].index(self.rank) * workers + logical
                    for i in range(len(self.sources[t.name])):
                        specs, base = dealt[f"{t.name}.{i}"]
                        sources[f"{t.name}.{i}"] = {"round": 0, "emitted": 0, "carry": specs[slot],
                                                    "base_epoch": base}
            made = max(0, -(-(self.consumed - logical) // workers))  # batches this worker would have made
            self.slot_states[logical] = {"slot": logical, "batches": made, "draws": {}, "generation": generation,
                                         "skipped": dict(skipped) if self.rank == 0 and logical == 0 else {},
                                         "sources": sources}


__all__ = ["DataConfig", "MODALITIES", "MultiTaskLoader", "SourceConfig", "TaskConfig"]
