"""Resharding: what the slots of a saved run had left of the epochs under way, dealt to the slots of a run
of another layout (another number of ranks or workers, or another split of tasks over ranks; see the
`loader` module's docstring). `MultiTaskLoader.reshard` checks the saved states, then `deal_leftovers`
says what each new slot reads and `carried_slot_states` makes this rank's slot states of it."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from .shards import SkipCounter


def saved_reshards(state: dict) -> int:
    """The reshards behind a saved loader or slot state (states saved before the rename keep them as
    `generation`)."""
    return state.get("reshards", state.get("generation", 0))


def deal_leftovers(states: list[dict], old_layout: dict, streams: Callable[..., dict], sources: dict[str, int],
                   readers: dict[str, list[int]], workers: int) -> dict[str, tuple[list[list[dict]], int]]:
    """What each new slot reads first: {source name: (the round specs of each new slot, the base epoch after
    them)}. `states` are every saved rank's (in rank order), written with `old_layout`; `streams(rank,
    logical, workers, readers, reshards, skipped)` rebuilds a slot's streams by task; `sources` holds the
    number of sources of each task, `readers` the ranks reading each task now, `workers` the slots per rank.
    Each source's leftovers of the epochs under way (the rest of every saved slot's current round, and its
    untouched rounds) are dealt over the new slots."""
    old_workers, old_readers = max(1, old_layout["num_workers"]), old_layout["readers"]
    dealt: dict[str, tuple[list[list[dict]], int]] = {}  # stream -> (specs per new slot, base epoch)
    for task, num_sources in sources.items():
        old_streams = []
        for rank in old_readers[task]:
            for logical in range(old_workers):
                slot = states[rank]["slots"].get(logical) or states[rank]["slots"].get(str(logical))
                task_streams = streams(rank, logical, old_workers, old_readers,
                                       saved_reshards(slot) if slot else saved_reshards(states[rank]),
                                       SkipCounter())[task]
                for i, stream in enumerate(task_streams):
                    if slot is not None:
                        stream.load_state(slot["sources"][f"{task}.{i}"])
                old_streams.append(task_streams)
        new_slots = len(readers[task]) * workers
        for i in range(num_sources):
            through = max(task_streams[i].epoch() for task_streams in old_streams)
            specs = [spec for task_streams in old_streams for spec in task_streams[i].remainder(through)]
            dealt[f"{task}.{i}"] = ([specs[j::new_slots] for j in range(new_slots)], through + 1)
    return dealt


def carried_slot_states(dealt: dict[str, tuple[list[list[dict]], int]], states: list[dict], sources: dict[str, int],
                        readers: dict[str, list[int]], rank: int, workers: int, consumed: int,
                        reshards: int) -> dict[int, dict]:
    """The states of rank `rank`'s slots (one per worker) after a reshard: each reads its share of `dealt`
    first, has made the batches it would have made of the `consumed` ones, and counts no draws; the skip
    counts of every saved slot are carried over once (by rank 0's first slot)."""
    skipped = Counter()
    for state in states:
        for slot in state["slots"].values():
            skipped.update(slot["skipped"])
    slot_states = {}
    for logical in range(workers):
        carried = {}
        for task, num_sources in sources.items():
            if rank in readers[task]:
                slot = readers[task].index(rank) * workers + logical
                for i in range(num_sources):
                    specs, base = dealt[f"{task}.{i}"]
                    carried[f"{task}.{i}"] = {"round": 0, "emitted": 0, "carry": specs[slot], "base_epoch": base}
        made = max(0, -(-(consumed - logical) // workers))  # batches this worker would have made
        slot_states[logical] = {"slot": logical, "batches": made, "draws": {}, "reshards": reshards,
                                "skipped": dict(skipped) if rank == 0 and logical == 0 else {},
                                "sources": carried}
    return slot_states
