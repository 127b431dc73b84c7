"""Checkpoints: DeepSpeed's engine state (ZeRO partitions, optimizer, scheduler) plus each rank's train
state (step, tokens seen, data-loader position, RNG states) in one folder per step. A folder counts only
once every rank has written it and rank 0 has added `complete.json`; `resume: auto` picks the newest
complete one, so a half-written checkpoint is never used."""

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

COMPLETE = "complete.json"


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


def check_compatible(folder: Path, model_config: dict, world_size: int, placement: dict | None = None) -> None:
    """Refuse a checkpoint whose skills, shapes, rank count or skill placement differ from this run's."""
    meta = json.loads((folder / COMPLETE).read_text())
    saved = meta["model"]
    keys = ("skills", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "skill_layers", "skill_attention", "router", "modalities", "num_experts")
    diff = [k for k in keys if saved.get(k) != model_config.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"checkpoint {folder} does not fit the config: {k} is {saved.get(k)!r} there, "
                         f"{model_config.get(k)!r} here")
    if meta["world_size"] != world_size:
        raise ValueError(f"checkpoint {folder} was written by {meta['world_size']} ranks; exact resume needs "
                         f"{meta['world_size']}, this run has {world_size}")
    if meta.get("skill_placement") != placement:
        def describe(p):
            return "no skill parallelism" if p is None else f"{p['mode']} skill placement {p['slots']}"
        raise ValueError(f"checkpoint {folder} was written with {describe(meta.get('skill_placement'))}; this run has "
                         f"{describe(placement)}: each rank's optimizer state holds only its skills, so they must match")


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
        tmp.write_text(json.dumps({"step": step, "world_size": world, "model": model_config, "skill_placement": placement}))
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
    _resume_cpu_adam(engine)
    state = torch.load(folder / f"train_state_rank{dist.get_rank()}.pt", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state


def _resume_cpu_adam(engine) -> None:
    """DeepSpeedCPUAdam's kernel (the offloaded optimizer) keeps beta1**t and beta2**t as running float
    products, but a fresh process computes them with pow at its first step, which rounds differently.
    Walk the new kernel through the restored step count (on empty tensors: nothing is updated) so that its
    bias corrections match the uninterrupted run's bit for bit."""
    optimizer = getattr(engine.optimizer, "optimizer", None)
    if not hasattr(optimizer, "ds_opt_adam"):
        return
    steps = max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
    group, empty = optimizer.param_groups[0], torch.zeros(0)
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], *group["betas"], group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)
