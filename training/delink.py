"""Delink a checkpoint of a model whose layers share weights (Pseudo-to-Real, `skillnet.delink`) into a
checkpoint of the real model, which any number of ranks resumes from as from any other checkpoint.

    python -m training.delink runs/pseudo/checkpoints/step00000200 runs/real/step00000200 [--moments rescale]
    python -m training.delink runs/pseudo runs/real/step00000200      # the run's newest checkpoint

Every depth's layer gets the fp32 weights of the shared layer it ran; its AdamW moments are the shared ones
over the n depths that layer served (`rescale`: m/n, v/n^2, the default: the shared gradient summed n
depths'), zeros (`reset`: pair it with a second warmup, `pseudo_to_real.rewarmup_steps`) or the shared ones
(`copy`). The optimizer's step, the scheduler's position, every rank's train state (sample-stream position,
RNG states, log window) and the tokenizer fingerprint are carried over: the real model resumes at the
checkpoint's step. A pretraining run delinks by itself at `pseudo_to_real.delink_at`.

The result holds DeepSpeed's universal layout only (`universal/`, written from the ranks' files first if
the checkpoint has none yet), marked so in `complete.json`; resuming loads it on any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import COMPLETE, check_readable, checkpoint_or_run, ensure_universal
from .metrics import quiet_third_party
from .zero import universal

MOMENTS = ("rescale", "reset", "copy")


def delink(folder: Path, out: Path, moments: str = "rescale", progress: bool = False) -> Path:
    """Write the real model's checkpoint of the shared model's checkpoint `folder` to `out` (new or empty)."""
    from skillnet import SkillNetConfig
    from skillnet.delink import copies, delinked_config

    from .checkpoint import fingerprint

    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    meta = check_readable(folder)
    config = SkillNetConfig.from_dict(meta["model"])
    real = delinked_config(config)  # refuses a model without shared layers
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    source = folder / universal.FOLDER if meta.get("universal_only") else ensure_universal(folder)
    frozen = sorted(name for states in source.glob("*model_states.pt")
                    for name in torch.load(states, map_location="cpu", weights_only=False, mmap=True)
                    .get("frozen_param_shapes") or {}
                    if len(copies(name, config)) > 1 and ".skills._padding" not in name)  # skill parallelism's
    if frozen:
        raise ValueError(f"checkpoint {folder} holds frozen parameters in shared layers ({frozen[0]}): their "
                         f"weights are not in its optimizer states, so they cannot be delinked")
    held = {p.name for p in (source / "zero").iterdir() if p.is_dir()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target_root = tmp / universal.FOLDER / "zero"
    target_root.mkdir(parents=True)
    names = sorted(held)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="delinking", unit=" tensors")
    for name in names:
        for target, n in copies(name, config):
            _write_copy(source / "zero" / name, target_root / target, n, moments)
    _link(source / "zero" / "optimizer_state.pt", target_root / "optimizer_state.pt")
    for states in source.glob("*model_states.pt"):
        _link(states, tmp / universal.FOLDER / states.name)
    for state in folder.glob("train_state_rank*.pt"):
        shutil.copy2(state, tmp / state.name)
    real_model = fingerprint(real)
    (tmp / "model_config.json").write_text(json.dumps(real_model, indent=1))
    (tmp / COMPLETE).write_text(json.dumps({**meta, "model": real_model, "universal_only": True,
                                            "delinked": {"from": str(folder), "moments": moments}}))
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _write_copy(source: Path, target: Path, n: int, moments: str) -> None:
    """One depth's copy of a parameter's universal files: its fp32 weights and step as they are, its moments
    as `moments` says for a tensor shared by `n` depths (a tensor outside the shared stacks keeps its own)."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        key = file.stem
        if key in ("exp_avg", "exp_avg_sq") and n > 1 and moments != "copy":
            tensor = torch.load(file, map_location="cpu", weights_only=False)["param"]
            tensor = torch.zeros_like(tensor) if moments == "reset" else tensor / (n if key == "exp_avg" else n * n)
            torch.save({"param": tensor}, target / file.name)
        else:
            _link(file, target / file.name)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.delink", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a complete checkpoint folder, or a run folder (its newest checkpoint)")
    parser.add_argument("out", help="the real model's checkpoint folder to write (new or empty)")
    parser.add_argument("--moments", default="rescale", choices=MOMENTS,
                        help="each copy's AdamW moments: the shared ones rescaled (default), zeros, or as they are")
    args = parser.parse_args(argv)
    quiet_third_party()
    start = time.perf_counter()
    try:
        out = delink(checkpoint_or_run(args.checkpoint), Path(args.out), args.moments, progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"delinked checkpoint: {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
