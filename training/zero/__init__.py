"""DeepSpeed for both trainers: the engine's config and set-up, and, in this package only, every use of
DeepSpeed internals, each tested in `tests/test_zero_internals.py`:

- `internals.one_reduction`: the engine's `coalesce_grad_reduction` (one gradient reduction per step);
- `internals.clear_gradient_partitions`: ZeRO-3's reduced-gradient buffers (`grad_partitions_flat_buffer`,
  `fp32_partitioned_groups_flat`);
- `internals.expert_groups`, `tag_expert`, `expert_parameter_groups`: the private `deepspeed.utils.groups`
  API and AutoEP's parameter tags (skill-parallel process groups, skills partitioned per position);
- `internals.replay_cpu_adam`: the CPU-Adam kernel's running bias corrections after a resume;
- `internals.partial_offload_moments_saved`, `partial_offload_moments_loaded`: ZeRO-3's partial optimizer
  offload (`subgroup_to_device`, `backup_optimizer`), whose accelerator-side Adam state DeepSpeed does not
  checkpoint;
- `internals.whole_on_rank0`: a ZeRO-3 parameter's partition layout (`ds_tensor`);
- `internals.hooks_on_parameter_holders`: ZeRO-3's hook registration (`_register_deepspeed_module`);
- `internals.batched_grad_norm`: ZeRO's gradient-norm method (`get_grad_norm_direct`);
- `internals.forget_module`: ZeRO-3's module-level references to the model (the stack of modules in their
  forward, the parameter coordinator's release cache);
- `internals.CommClock`: the comms logger's records;
- `internals.state_bytes`: the attributes of ZeRO's optimizer wrappers (what a rank holds to train);
- `offload.SkillOffload`: ZeRO-3's per-sub-group flat partitions (`fp16_partitioned_groups_flat`, re-pointed
  by `_unflatten_partitioned_parameters`) and the buffer that held them all (`lp_param_buffer`);
- `traces.TraceSwitch`: ZeRO-3's parameter coordinator (one prefetch trace per kind of model call);
- `layout`: the file layout of ZeRO checkpoints (read by the exporter and the converter);
- `universal`: DeepSpeed's universal checkpoint layout, written from that (`ds_to_universal` cannot read
  skill-parallel checkpoints), and loaded into an engine of any size (`load`: the engine's config flag
  for it, and the ZeRO-3 loader's handling of parameter groups).

They were written against, and are tested with, the DeepSpeed versions `pyproject.toml` pins (TESTED).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..config import resolve_ds_config

TESTED = (">=0.19.8", "<0.20")
"""The DeepSpeed versions these internals are tested with (pyproject.toml pins the same range)."""


def check_version() -> None:
    """Warn (once) when the installed DeepSpeed is outside the tested range: the internals above may have
    moved; the tests in `tests/test_zero_internals.py` say which."""
    import deepspeed
    from packaging.specifiers import SpecifierSet

    if deepspeed.__version__.split("+")[0] not in SpecifierSet(",".join(TESTED)):
        warnings.warn(f"DeepSpeed {deepspeed.__version__} is outside the tested range {','.join(TESTED)}; run "
                      "tests/test_zero_internals.py to check the internals this trainer relies on", stacklevel=2)


def bf16_enabled(setting: str) -> bool:
    """`train.bf16`: "true", "false" or "auto" (bf16 where the accelerator supports it; not on CPU)."""
    return setting == "true" or (setting == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, nested dicts key by key."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def engine_config(base: dict | str | Path, micro_batch: int, accumulation: int, grad_clip: float, bf16: bool,
                  overrides: dict | None = None, profile_comm: bool = False) -> dict:
    """A DeepSpeed config: `base` (a dict or a JSON file) with the batch, accumulation, clipping and
    precision this run sets (any "auto" entry filled the same way) and `overrides` merged over it. Under
    `accelerate launch --use_deepspeed` accelerate's DeepSpeed settings (its ZeRO stage, offload,
    `--deepspeed_config_file`) take the place of `base`, and its `--mixed_precision bf16` turns bf16 on."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import DeepSpeedPlugin

        base = {"zero_allow_untested_optimizer": True, **DeepSpeedPlugin().deepspeed_config}
        bf16 = bf16 or os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    ds = dict(base) if isinstance(base, dict) else _read(resolve_ds_config(str(base)))
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation,
              gradient_clipping=grad_clip, bf16={**(ds.get("bf16") or {}), "enabled": bf16})
    if "fp16" in ds and (bf16 or ds["fp16"].get("enabled") == "auto"):  # fp16 only when asked for, never with bf16
        ds["fp16"] = {**ds["fp16"], "enabled": False}
    ds.pop("train_batch_size", None)  # follows from the two above and the world size
    merge(ds, overrides or {})
    if profile_comm:
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    if zero_stage(ds) not in (1, 2, 3):  # stage 0 saves its optimizer in the model file, which nothing here reads
        raise ValueError(f"zero_optimization.stage {zero_stage(ds)} is not supported: checkpoints are resumed, "
                         f"resharded and exported from ZeRO's own layouts (stage 1, 2 or 3)")
    autos = [k for k, v in _leaves(ds) if v == "auto"]
    if autos:
        raise ValueError(f"DeepSpeed config entries left at 'auto' that this trainer does not fill: {autos}")
    return ds


def _read(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"distributed.ds_config: no file {path}")
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"distributed.ds_config: {path} is not JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"distributed.ds_config: {path} is not a JSON object")
    return ds


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    return (ds.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")


def initialize(model, optimizer, scheduler, ds: dict):
    """The DeepSpeed engine (its scheduler steps with it). Under ZeRO-3 each skill's FFN is gathered as one
    unit (a z3 leaf: one fetch for both its layers, no hooks inside it; not where layers are shared: a leaf
    reduces its gradients each time it is called, and a shared layer is called at each of its depths), and
    only modules holding parameters get ZeRO-3's hooks (`internals.hooks_on_parameter_holders`). The
    gradient norm is taken over all tensors at once (`internals.batched_grad_norm`)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from skillnet.layers import FFN

    from . import internals

    check_version()
    zero3 = zero_stage(ds) == 3
    shared = getattr(getattr(model, "config", None), "shares_layers", False)
    if zero3 and not shared and any(isinstance(m, FFN) for m in model.modules()):
        set_z3_leaf_modules(model, [FFN])
    with internals.hooks_on_parameter_holders() if zero3 else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if zero_stage(ds) > 0:
        internals.batched_grad_norm(engine.optimizer)
    return engine


def release(engine) -> None:
    """Give back what an engine keeps beyond its own life: its hooks and buffers (`engine.destroy()`), and the
    references ZeRO-3 keeps to the model in module-level state (`internals.forget_module`). Those would keep
    the model and, through its parameters, the process groups and their communication threads alive until
    the interpreter's teardown, where a gloo thread still running aborts the process ("terminate called
    without an active exception")."""
    from . import internals

    engine.destroy()
    internals.forget_module(engine.module)


def full_parameters(model, zero3: bool):
    """Under ZeRO-3 the whole model gathered on every process, for code that runs outside training's
    module calls (evaluation, saving); nothing to do otherwise."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))
