"""Typed configs from YAML: dataclasses built from a tree merged as defaults <- YAML file <- `key=value`.

An unknown key anywhere is an error naming it; the resolved config is written to the run folder with
`dump` and reloads to the same config. The sections both trainers share (optimizer, checkpoints,
DeepSpeed) are defined here.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached after `warmup_steps`, then decayed linearly to 0 at the last step."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    """AdamW's decoupled decay, on matrices only: biases and normalisation weights are never decayed."""
    betas: tuple[float, float] = (0.9, 0.98)
    """The papers' Adam settings."""
    eps: float = 1e-6


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every this many steps (and on a stop signal, and at the end)."""
    keep_last: int = 3
    resume: str = "auto"
    """"auto": the newest complete checkpoint in the run folder, if any; "none"; or a checkpoint folder."""

    def validate(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass
class DistributedConfig:
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed config file; batch size, accumulation, clipping and bf16 are filled from this config (a
    shipped one, e.g. the default, resolves from any working directory)."""
    ds_overrides: dict = field(default_factory=dict)
    """DeepSpeed config entries merged over the file, nested dicts merged key by key, e.g.
    `distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0`."""


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass fields and lists of dataclasses;
    unknown keys are errors naming their place (`data.tasks[0].sources[1].shards`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}"
                         f"; {where or 'top level '}keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _value(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _value(hint, value, where: str):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:  # `X | None`
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return value if value is None or len(inner) != 1 else _value(inner[0], value, where)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build(hint, value, where + ".")
    if typing.get_origin(hint) is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return [build(item, v, f"{where}[{i}].") for i, v in enumerate(value)]
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(_value(h, v, where) for h, v in zip(typing.get_args(hint), value))
    if hint is float and not isinstance(value, bool):
        try:  # YAML reads 3e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _set(tree: dict, dotted: str, value) -> None:
    """Set `a.b.c` in nested dicts; a number picks an entry of a list (`tasks.0.data.train`)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        if isinstance(tree, list):
            if not p.isdigit() or int(p) >= len(tree):
                raise ValueError(f"override {dotted}: {p} is not an index of a list of {len(tree)}")
            tree = tree[int(p)]
        else:
            tree = tree.setdefault(p, {})
        if not isinstance(tree, (dict, list)):
            raise ValueError(f"override {dotted}: {p} is not a section")
    if isinstance(tree, list):
        if not leaf.isdigit() or int(leaf) >= len(tree):
            raise ValueError(f"override {dotted}: {leaf} is not an index of a list of {len(tree)}")
        tree[int(leaf)] = value
    else:
        tree[leaf] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set each dotted `key=value` (the value parsed as YAML) in a config tree."""
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {key}: its value is not YAML ({str(e).splitlines()[0]})") from None
        _set(tree, key, parsed)
    return tree


def read_tree(path: str | Path, overrides: list[str], shipped: Path) -> dict:
    """The YAML file at `path` (or the shipped config of that name in the folder `shipped`) with the
    overrides applied."""
    path = Path(path)
    if not path.exists():
        named = shipped / f"{path}.yaml"
        if not named.exists():
            raise FileNotFoundError(f"no config file {str(path)!r}"
                                    f" (shipped: {sorted(p.stem for p in shipped.glob('*.yaml'))})")
        path = named
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return apply_overrides(tree, overrides)


def under_root(root: str, path: str | None) -> str | None:
    """`path` read from the folder `root` (a config's `data_root`) when it is relative; an absolute path, a
    URL or a `pipe:` command as it is."""
    if not root or not path or os.path.isabs(path) or path.startswith(("pipe:", "http:", "https:", "s3:", "gs:")):
        return path
    return str(Path(root) / path)


SHIPPED_DS_CONFIGS = Path(__file__).parent / "ds_configs"


def resolve_ds_config(path: str) -> str:
    """A DeepSpeed config file as given or, when no such file is here and it names a shipped one
    (`ds_configs/zero3.json` or `zero3`), the shipped file (package data): it works from any working
    directory and in an installed package."""
    given = Path(path)
    if given.is_absolute() or given.exists() or given.parent.name not in ("", "ds_configs"):
        return path
    shipped = SHIPPED_DS_CONFIGS / (given.name if given.suffix == ".json" else f"{given.name}.json")
    if not shipped.exists():
        raise FileNotFoundError(f"distributed.ds_config: no file {path} (shipped: "
                                f"{sorted(p.name for p in SHIPPED_DS_CONFIGS.glob('*.json'))})")
    return str(shipped)


def dump(config, path: str | Path) -> None:
    """Write a resolved config as YAML (tuples as lists: reloadable by the same loader)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    Path(path).write_text(yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False))
