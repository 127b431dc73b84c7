"""Checkpoints of both trainers: DeepSpeed's engine state (ZeRO partitions, optimizer, scheduler) plus each
rank's train state (step, data position, log window, RNG states) in one folder per step,
`checkpoints/stepNNNNNNNN`. A folder counts only once every rank has written it and rank 0 has added
`complete.json`; `resume: auto` picks the newest complete one, so a half-written checkpoint is never used.

Layout format 1 (`complete.json` without a `format` entry was written before the entry existed and has the
same layout): `complete.json` {format, step, world_size, model, ...}, `model_config.json`,
`train_state_rank<r>.pt` per rank, and DeepSpeed's own files of the step's tag."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .zero.internals import replay_cpu_adam

COMPLETE = "complete.json"
FORMAT = 1
MODEL_KEYS = ("skills", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "skill_layers", "skill_attention", "router", "modalities", "num_experts")
"""What a resumed model must share with the checkpoint's (dropout or a task's skills may change)."""


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _step_folders(root: Path) -> list[Path]:
    """The checkpoint folders this trainer writes under `root` (`stepNNNNNNNN`), oldest first; nothing else
    there is ever read or removed."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step\d{8}", p.name))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    return [p for p in _step_folders(root) if (p / COMPLETE).exists()]


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


def check_compatible(folder: Path, model_config: dict, world_size: int, placement: dict | None = None,
                     model_keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Refuse, in one line naming what differs, a checkpoint whose layout, model, rank count or skill
    placement differ from this run's; return its `complete.json`."""
    try:
        meta = json.loads((folder / COMPLETE).read_text())
        saved, written_by = meta["model"], meta["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder}: unreadable {COMPLETE} ({type(e).__name__}: {e})") from None
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"checkpoint {folder} has layout format {meta['format']}; this release reads format {FORMAT}")
    missing = [f"train_state_rank{r}.pt" for r in range(written_by) if not (folder / f"train_state_rank{r}.pt").exists()]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    diff = [k for k in model_keys if saved.get(k) != model_config.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {folder} does not fit the config: {k} is {saved.get(k)!r} there, "
                         f"{model_config.get(k)!r} here")
    if written_by != world_size:
        raise ValueError(f"checkpoint {folder} was written by {written_by} ranks; exact resume needs "
                         f"{written_by}, this run has {world_size}")
    if meta.get("skill_placement") != placement:
        def describe(p):
            return "no skill parallelism" if p is None else f"{p['mode']} skill placement {p['slots']}"
        raise ValueError(f"checkpoint {folder} was written with {describe(meta.get('skill_placement'))}; this run has "
                         f"{describe(placement)}: each rank's optimizer state holds only its skills, so they must match")
    return meta


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
         placement: dict | None = None) -> Path:
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = root / _tag(step)
    if (folder / COMPLETE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**train_state, "rng": rng_state()}, folder / f"train_state_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=folder.name, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        (folder / "model_config.json").write_text(json.dumps(model_config, indent=1))
        tmp = folder / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "step": step, "world_size": world, "model": model_config,
                                   "skill_placement": placement}))
        os.replace(tmp, folder / COMPLETE)  # atomic: the folder is complete or it is not
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in _step_folders(root):
            if not (partial / COMPLETE).exists() and partial.name < folder.name:
                shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
    dist.barrier()
    return folder


def load(engine, folder: Path) -> dict:
    """Restore the engine and return this rank's train state (its RNG states already restored)."""
    engine.load_checkpoint(str(folder.parent), tag=folder.name)
    replay_cpu_adam(engine)
    state = torch.load(folder / f"train_state_rank{dist.get_rank()}.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
