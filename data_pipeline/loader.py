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

This module holds the loader (`MultiTaskLoader`) and its DataLoader workers' plumbing; the configuration is
in `config`, a slot's stream of one source in `stream`, collation in `collate`, and dealing a saved run's
leftovers to new slots in `reshard`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.sampling import TaskSampler, seeded

from .collate import Collator, _pack, _unpack, instruction_fields
from .config import DataConfig
from .media import BadSample, MediaConfig, decode_sample
from .reshard import carried_slot_states, deal_leftovers, saved_reshards
from .shards import SkipCounter, open_source
from .stream import DataError, SourceStream


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
        self.consumed, self.reshards = 0, 0
        self.slot_states: dict[int, dict] = {}
        self.task_groups, self.group = None, 0
        self.collate = Collator(tokenizer, cfg.max_text_tokens)
        self.templates = {t.name: t.instruction() for t in cfg.tasks if t.template}

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
        return {t.name: [r for r in ranks if t.name in self.task_groups[r % len(self.task_groups)]]
                for t in self.cfg.tasks}

    def layout(self) -> dict:
        """What a resume must share with the saved run to continue each slot as it was (else: `reshard`)."""
        return {"world_size": self.world_size, "num_workers": self.cfg.num_workers, "readers": self.readers()}

    def task_for_batch(self, index: int, group: int | None = None) -> str:
        """The task of batch `index` of the ranks at position `group` (this rank's by default); without
        task groups, the same on every rank (shared seed, no communication)."""
        among = None if self.task_groups is None else self.task_groups[self.group if group is None else group]
        return self.sampler.task(index, among)

    # -- inside a worker -------------------------------------------------------------------------------

    def _streams(self, rank: int, logical: int, workers: int, readers: dict[str, list[int]], reshards: int,
                 skipped: SkipCounter) -> dict[str, list[SourceStream]]:
        """The streams of slot (rank, logical worker) for the tasks the rank reads; a task's slots are its
        readers' workers, rank by rank."""
        streams = {}
        for t in self.cfg.tasks:
            if rank in readers[t.name]:
                slot, num_slots = readers[t.name].index(rank) * workers + logical, len(readers[t.name]) * workers
                streams[t.name] = [SourceStream(src, f"{t.name}.{i}", slot, num_slots, self.cfg, skipped, reshards)
                                   for i, src in enumerate(self.sources[t.name])]
        return streams

    def _slot_batches(self, logical: int, state: dict | None) -> Iterator[dict]:
        cfg, workers = self.cfg, max(1, self.cfg.num_workers)
        skipped = SkipCounter()
        reshards = saved_reshards(state) if state is not None else self.reshards
        streams = self._streams(self.rank, logical, workers, self.readers(), reshards, skipped)
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
            batch = self.collate(samples, modality[tasks[0]], self.templates.get(tasks[0]))
            made += 1
            if self.task_groups is not None:
                batch["group_tasks"] = [self.task_for_batch(index, g) for g in range(len(self.task_groups))]
            batch.update(task=tasks[0] if cfg.batch_mode == "task" else tasks, modality=modality[tasks[0]],
                         skills=self.task_skills[tasks[0]] if cfg.batch_mode == "task"
                         else [self.task_skills[t] for t in tasks])
            batch["_state"] = {"slot": logical, "batches": made, "draws": dict(draws), "skipped": dict(skipped),
                               "reshards": reshards,
                               "sources": {s.name: s.state() for ss in streams.values() for s in ss}}
            yield batch

    def _next_sample(self, streams: list[SourceStream], task: str, modality: str, draws: Counter,
                     skipped: SkipCounter) -> dict:
        weights = [s.source.weight for s in streams]
        failed, tried = Counter(), set()
        while sum(failed.values()) < self.cfg.max_consecutive_skips:
            stream = streams[0]
            if len(streams) > 1:
                g, slot = streams[0].reshards, streams[0].slot
                stream = seeded(self.cfg.seed, "source", *([g] if g else []), task, slot,
                              draws[task]).choices(streams, weights)[0]
            draws[task] += 1
            raw = next(stream)
            template = self.templates.get(task)
            try:
                sample = decode_sample(raw, modality, self.media, fields=template is not None)
                if template is not None:
                    try:
                        template.check(instruction_fields(sample, template), raw["__key__"])
                    except ValueError as e:
                        raise BadSample("bad_fields", str(e)) from None
                return {**sample, "epoch": stream.reading}
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
                "reshards": self.reshards, "shards": self._shards()}

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
            raise ValueError(f"data loader state was saved with data.seed={state['seed']}, "
                             f"this run has {self.cfg.seed}")
        now = self._shards()
        for name, n in state.get("shards", {}).items():
            if now.get(name) != n:
                task, i = name.rsplit(".", 1)
                raise ValueError(f"data loader state was saved with {n} shards in task {task!r} source {i}; "
                                 f"this run has {now.get(name, 'no such source')}: the saved positions do not map")

    def needs_reshard(self, state: dict) -> bool:
        """Whether a saved state (any rank's) was written by another layout (ranks, workers, task split)."""
        return self.saved_layout(state) != self.layout()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank stopped; the layout must be the saved one (else `reshard`)."""
        self.check_state(state)
        if self.needs_reshard(state) or state["rank"] != self.rank:
            raise ValueError(f"data loader state was saved with layout {self.saved_layout(state)}, this run has "
                             f"{self.layout()}: reshard it")
        self.consumed, self.reshards = state["consumed"], saved_reshards(state)
        self.slot_states = {int(k): v for k, v in state["slots"].items()}

    def reshard(self, states: list[dict]) -> None:
        """Continue the stream of a run of another layout from every one of its ranks' states (in rank order):
        each source's leftovers of the epochs under way, dealt to this run's slots (see the module
        docstring), the batch count and the skip counts carried over."""
        for state in states:
            self.check_state(state)
        reshards, workers, readers = max(map(saved_reshards, states)) + 1, max(1, self.cfg.num_workers), self.readers()
        sources = {t.name: len(self.sources[t.name]) for t in self.cfg.tasks}
        dealt = deal_leftovers(states, self.saved_layout(states[0]), self._streams, sources, readers, workers)
        self.consumed, self.reshards = states[0]["consumed"], reshards
        self.slot_states = carried_slot_states(dealt, states, sources, readers, self.rank, workers, self.consumed,
                                               reshards)


__all__ = ["MultiTaskLoader"]
