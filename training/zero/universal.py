"""DeepSpeed's universal checkpoint: a ZeRO checkpoint (stage 1, 2 or 3, any rank count and skill placement)
rewritten parameter by parameter, whole, so that an engine of any world size loads it
(`load`; each rank cuts its own partitions). The layout is DeepSpeed's,
as its `ds_to_universal` writes it:

    universal/zero/<parameter name>/{fp32,exp_avg,exp_avg_sq,step}.pt    the whole tensors ({"param": ...})
    universal/zero/optimizer_state.pt                                    loss scaler, clipping, groups, step
    universal/*model_states.pt                                           DeepSpeed's own (scheduler, steps)

`ds_to_universal` cannot read these checkpoints (skills held by some ranks only, under DeepSpeed's AutoEP
tags but without AutoEP's stacked expert tensors), and it loads ranks' files whole; this converter streams
(`layout.whole_parameters`). A DeepSpeed internal (see the package docstring): `load` sets the engine's
config flag for universal loading for one call, and works around the ZeRO-3 loader's handling of
parameter groups.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .layout import STATES, optimizer_settings, parameter_layout, whole_parameters

FOLDER = "universal"
"""Where a checkpoint's universal copy goes, inside its folder."""


def convert_parameters(folder: Path, world: int, out: Path, share: tuple[int, int] = (0, 1),
                       progress: bool = False) -> int:
    """Write this process's share of the parameters of `folder` (written by `world` ranks) into `out`:
    parameters i, i + n, ... for `share` = (i, n), so that the ranks of a run convert together. Returns the
    number written. Frozen parameters are not the optimizer's: a universal load leaves them as the model
    was built (as DeepSpeed's own loader does)."""
    layout, _ = parameter_layout(folder, world, frozen_ok=True)
    step = _step(folder)
    mine = [entry for i, entry in enumerate(layout) if i % share[1] == share[0]]
    wholes = whole_parameters(folder, world, mine, STATES)
    if progress:
        from tqdm import tqdm

        wholes = tqdm(wholes, total=len(mine), desc="converting", unit=" tensors")
    for name, _, whole in wholes:
        target = out / "zero" / name
        target.mkdir(parents=True, exist_ok=True)
        for key, tensor in whole.items():
            torch.save({"param": tensor.clone()}, target / f"{key}.pt")
        torch.save(step, target / "step.pt")
    return len(mine)


def finish(folder: Path, out: Path) -> None:
    """Add the optimizer's global state and DeepSpeed's model-state files (linked where the file system
    allows) to the converted parameters in `out`."""
    torch.save(optimizer_settings(folder), out / "zero" / "optimizer_state.pt")
    for states in folder.glob("*model_states.pt"):
        try:
            os.link(states, out / states.name)
        except OSError:
            shutil.copy2(states, out / states.name)


def held_parameters(folder: Path) -> list[tuple[str, torch.Size, None]]:
    """(name, shape, None) of every parameter the universal copy in checkpoint `folder` holds, in name order
    (the `layout.Layout` entries of a checkpoint that holds nothing else, as `training.delink` writes)."""
    root = folder / FOLDER / "zero"
    return [(p.name, torch.load(p / "fp32.pt", map_location="cpu", weights_only=False, mmap=True)["param"].shape, None)
            for p in sorted(root.iterdir()) if (p / "fp32.pt").exists()]


def read_parameter(folder: Path, name: str) -> torch.Tensor:
    """One parameter's fp32 values from the universal copy in checkpoint `folder`."""
    return torch.load(folder / FOLDER / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)["param"]


def _step(folder: Path):
    groups = optimizer_settings(folder)["optimizer_state_dict"]["state"]
    return next(iter(groups.values()))["step"] if groups else 0


def _base(engine):
    return engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer


def group_settings(engine) -> list[dict]:
    """The hyperparameters of each of the engine's optimizer groups (what `restore_groups` puts back)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in _base(engine).param_groups]


def saved_groups(folder: Path) -> int:
    """The number of optimizer parameter groups of a checkpoint (ZeRO-3: its flat sub-groups)."""
    return len(optimizer_settings(folder)["param_groups"])


def engine_groups(engine) -> int:
    return len(_base(engine).param_groups)


def load(engine, folder: Path) -> None:
    """Load the universal copy in `folder` into `engine`, whatever its world size. DeepSpeed reads a universal
    checkpoint when its config sets `checkpoint.load_universal`, which only its loading consults: set here
    for this one call, so that a run decides at resume time."""
    settings = group_settings(engine)
    flag = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(str(folder), tag=FOLDER)
    finally:
        engine._config.load_universal_checkpoint = flag
    restore_groups(engine, settings)


def restore_groups(engine, settings: list[dict]) -> None:
    """After a universal load: DeepSpeed's ZeRO-3 loader sets every parameter group's hyperparameters to those
    of the checkpoint's first group (its weight decay included), and the scheduler's state keeps one base
    learning rate per group of the saved run, which may have had another number of groups (skills split
    over ranks have groups of their own). Put back each group's own settings, keep the loaded learning
    rate (one schedule drives every group), and size the scheduler's lists to the groups."""
    optimizer = _base(engine)
    lr = optimizer.param_groups[0]["lr"]
    for group, own in zip(optimizer.param_groups, settings):
        group.update({**own, "lr": lr})
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
