"""Checkpoints of both trainers: DeepSpeed's engine state (ZeRO partitions, optimizer, scheduler) plus each
rank's train state (step, data position, log window, RNG states) in one folder per step,
`checkpoints/stepNNNNNNNN`. A folder counts only once every rank has written it and rank 0 has added
`complete.json`; `resume: auto` picks the newest complete one, so a half-written checkpoint is never used.

Layout format 1 (`complete.json` without a `format` entry was written before the entry existed and has the
same layout): `complete.json` {format, step, world_size, model, ...}, `model_config.json`,
`train_state_rank<r>.pt` per rank, and DeepSpeed's own files of the step's tag.

A checkpoint resumes on another number of ranks or skill placement too: its ZeRO partitions are rewritten
once, whole per parameter, into DeepSpeed's universal layout (`universal/` inside the folder, written by the
resuming ranks together, or beforehand by `python -m training.reshard`), from which each rank cuts its own;
the trainers map the train states (`load` returns every saving rank's)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .distributed import Topology
from .zero import universal
from .zero.internals import partial_offload_moments_loaded, partial_offload_moments_saved, replay_cpu_adam

COMPLETE = "complete.json"
FORMAT = 1
MODEL_KEYS = ("skills", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "skill_layers", "skill_attention", "router", "modalities", "num_experts", "layer_sharing",
              "decoder_layer_sharing")
"""What a resumed model must share with the checkpoint's (dropout or a task's skills may change)."""
LATER_KEYS = {"layer_sharing": "none", "decoder_layer_sharing": None}
"""Keys a checkpoint written before they existed lacks, with the value it had."""


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _step_folders(root: Path) -> list[Path]:
    """The checkpoint folders this trainer writes under `root` (`stepNNNNNNNN`, and `stepNNNNNNNN-delinked`
    after it where a run delinks: `training.delink`), oldest first; nothing else there is ever read or
    removed."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step\d{8}(-delinked)?", p.name))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    return [p for p in _step_folders(root) if (p / COMPLETE).exists()]


def checkpoint_or_run(path: str | Path) -> Path:
    """A complete checkpoint folder as given, or a run folder's newest one (what the offline tools read)."""
    folder = Path(path)
    if (folder / COMPLETE).exists():
        return folder
    found = complete_checkpoints(folder / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{folder} is neither a complete checkpoint nor a run folder holding one")
    return found[-1]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The folder to resume from, or None; a named folder that is not complete is an error."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        found = complete_checkpoints(path)  # a run's checkpoints folder: its newest
        if found:
            return found[-1]
        raise FileNotFoundError(f"resume: {resume} holds no complete checkpoint")
    return path


def fingerprint(model_config) -> dict:
    """A model's config as a checkpoint records it (every key, defaults included), to compare on resume."""
    return json.loads(model_config.to_json_string(use_diff=False))


@dataclass
class Resume:
    """The checkpoint a run continues from, and how it maps onto this run."""
    folder: Path
    meta: dict
    """Its `complete.json` (`world_size`: how many ranks wrote it)."""
    universal: bool
    """Written by another number of ranks or skill placement: the engine loads its universal copy."""
    reshard: bool = False
    """Another data layout (ranks, workers, task split): the loader deals out the saved run's leftovers."""


def find_resume(setting: str, root: Path, model_config, topology: Topology, placement: dict | None = None,
                model_keys: tuple[str, ...] = MODEL_KEYS,
                check: Callable[[Resume], Resume] | None = None) -> Resume | None:
    """The checkpoint `checkpoint.resume` names (`auto`: the newest complete one under `root`), checked against
    this run's model, and by `check` (a trainer's own checks, which may fill in `reshard`), before any heavy
    work; None to start afresh. A checkpoint of another layout is announced on stderr (by the main rank) and
    loaded through its universal copy."""
    folder = resolve_resume(setting, root)
    if folder is None:
        return None
    meta = check_compatible(folder, fingerprint(model_config), model_keys)
    resume = Resume(folder, meta, needs_universal(meta, topology.world_size, placement))
    resume = check(resume) if check is not None else resume
    if resume.universal and topology.is_main:
        print(describe_resize(folder, meta, topology.world_size, placement), file=sys.stderr)
    return resume


def check_compatible(folder: Path, model_config: dict, model_keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Refuse, in one line naming what differs, a checkpoint this run cannot continue from: another layout
    format, a missing rank file, another model. Return its `complete.json`: another rank count or skill
    placement is mapped (`needs_universal`)."""
    meta = check_readable(folder)
    saved = meta["model"]
    saved = {**LATER_KEYS, **saved}
    diff = [k for k in model_keys if saved.get(k) != model_config.get(k)]
    if diff:
        k = diff[0]
        hint = (" (`python -m training.delink` turns a shared model's checkpoint into the real model's)"
                if k in ("layer_sharing", "decoder_layer_sharing") and saved.get(k) != "none" else "")
        raise ValueError(f"checkpoint {folder} does not fit the config: {k} is {saved.get(k)!r} there, "
                         f"{model_config.get(k)!r} here{hint}")
    return meta


def check_readable(folder: Path) -> dict:
    """Refuse, in one line, a checkpoint of another layout format or missing a rank's file; return its
    `complete.json`."""
    try:
        meta = json.loads((folder / COMPLETE).read_text())
        meta["model"], written_by = dict(meta["model"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder}: unreadable {COMPLETE} ({type(e).__name__}: {e})") from None
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"checkpoint {folder} has layout format {meta['format']}; this release reads format {FORMAT}")
    missing = [f"train_state_rank{r}.pt" for r in range(written_by)
               if not (folder / f"train_state_rank{r}.pt").exists()]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return meta


def needs_universal(meta: dict, world_size: int, placement: dict | None = None) -> bool:
    """Whether a checkpoint (its `complete.json`) was written by another number of ranks or skill placement
    than this run's, or holds nothing else (`training.delink` writes such): then it loads through its universal
    copy."""
    return (meta["world_size"] != world_size or meta.get("skill_placement") != placement
            or bool(meta.get("universal_only")))


def describe_resize(folder: Path, meta: dict, world_size: int, placement: dict | None = None) -> str:
    """The line a run prints when it resumes a checkpoint of another layout."""
    def layout(world, p):
        return f"{world} rank{'s' * (world > 1)}, " + ("no skill parallelism" if p is None
                                                        else f"{p['mode']} skill placement {p['slots']}")

    return (f"resuming {folder.name} ({layout(meta['world_size'], meta.get('skill_placement'))})"
            f" on {layout(world_size, placement)}")


def agree_on_resume(resume: Path | None) -> None:
    """Every rank must resume from the same checkpoint (each found it on its own before the process group
    existed); refuse rather than hang if another writer changed the folder meanwhile."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, str(resume))
    if len(set(everyone)) > 1:
        raise RuntimeError(f"ranks found different checkpoints to resume from: {sorted(set(everyone))}")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, train_state: dict, model_config: dict, keep_last: int,
         placement: dict | None = None, extra: dict | None = None) -> Path:
    """Write this rank's part of checkpoint `step` (a collective); `extra` joins `complete.json`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = root / _tag(step)
    if (folder / COMPLETE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**train_state, "rng": rng_state()}, folder / f"train_state_rank{rank}.pt")
    with partial_offload_moments_saved(engine):
        engine.save_checkpoint(str(root), tag=folder.name, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        (folder / "model_config.json").write_text(json.dumps(model_config, indent=1))
        tmp = folder / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "step": step, "world_size": world, "model": model_config,
                                   "skill_placement": placement, **(extra or {})}))
        os.replace(tmp, folder / COMPLETE)  # atomic: the folder is complete or it is not
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in _step_folders(root):
            if not (partial / COMPLETE).exists() and partial.name < folder.name:
                shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
    dist.barrier()
    return folder


def ensure_universal(folder: Path) -> Path:
    """The checkpoint's universal copy, written now if it is not there yet (by every rank, a share of the
    parameters each, when a process group is up); complete once renamed into place."""
    out = folder / universal.FOLDER
    if out.is_dir():
        return out
    group = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    barrier = dist.barrier if group else lambda: None
    tmp = folder / (universal.FOLDER + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion
        tmp.mkdir()
    barrier()
    saved_by = json.loads((folder / COMPLETE).read_text())["world_size"]
    universal.convert_parameters(folder, saved_by, tmp, (rank, world), progress=rank == 0)
    barrier()
    if rank == 0:
        universal.finish(folder, tmp)
        os.replace(tmp, out)
    barrier()
    return out


def load(engine, folder: Path, universal_copy: bool = False, every_rank: bool = False) -> dict[int, dict]:
    """Restore the engine and return the saved train states by rank: this rank's alone, or (from a universal
    copy, or asked for `every_rank`) every saving rank's, for the trainer to map. `universal_copy`: another rank
    count or skill placement; the engine loads the universal copy, as it does when its optimizer groups differ from
    the checkpoint's (one written before ZeRO-3's partitioned build kept the weight-decay groups apart).
    This rank's RNG states are restored from the saving rank of its number; a rank the saving run did not
    have starts streams seeded by (step, rank)."""
    if universal_copy or universal.saved_groups(folder) != universal.engine_groups(engine):
        ensure_universal(folder)
        universal.load(engine, folder)
    else:
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
    partial_offload_moments_loaded(engine)
    replay_cpu_adam(engine)
    saved_by = json.loads((folder / COMPLETE).read_text())["world_size"]
    rank = dist.get_rank()
    ranks = range(saved_by) if universal_copy or every_rank else [rank]
    states = {r: torch.load(folder / f"train_state_rank{r}.pt", weights_only=False) for r in ranks}
    if rank in states:
        set_rng_state(states[rank]["rng"])
    else:
        seed = states[0]["step"] * 1_000_003 + rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
    return states
