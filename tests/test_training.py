"""The shared training layer's pieces on their own: configs, the weight-decay rule and schedule, the task
sampler, the logging window and warnings (the engines are in test_zero_internals.py, whole runs in
test_distributed.py)."""

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from training import distributed
from training.config import build, dump, read_tree, resolve_ds_config
from training.distributed import Topology
from training.metrics import Window
from training.optim import linear_schedule, parameter_groups
from training.sampling import TaskSampler, sampling_probabilities

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Leaf:
    name: str
    size: int = 1


@dataclass
class Tree:
    leaves: list[Leaf] = field(default_factory=list)
    pair: tuple[float, float] = (0.0, 1.0)
    first: Leaf | None = None


def test_configs_build_nested_lists_and_name_unknown_keys_by_place(tmp_path):
    tree = build(Tree, {"leaves": [{"name": "a"}, {"name": "b", "size": 3}], "pair": [0.5, 2], "first": {"name": "c"}})
    assert tree == Tree([Leaf("a"), Leaf("b", 3)], (0.5, 2), Leaf("c"))
    with pytest.raises(ValueError, match=r"unknown config key leaves\[1\]\.colour"):
        build(Tree, {"leaves": [{"name": "a"}, {"name": "b", "colour": 1}]})
    dump(tree, tmp_path / "tree.yaml")
    assert build(Tree, read_tree(tmp_path / "tree.yaml", [], tmp_path)) == tree
    assert read_tree(tmp_path / "tree.yaml", ["leaves.1.size=7"], tmp_path)["leaves"][1]["size"] == 7
    with pytest.raises(FileNotFoundError, match="no config file 'nope'"):
        read_tree("nope", [], tmp_path)


def test_config_values_take_their_field_type():
    """YAML reads `3e-4` (no dot) as a string: a float field takes it as the number; what is no number of
    the field's kind is refused by name."""
    @dataclass
    class Optim:
        lr: float = 0.1
        steps: int = 1
        on: bool = False
        betas: tuple[float, float] = (0.9, 0.99)

    assert build(Optim, {"lr": "3e-4", "steps": 5, "betas": ["1e-1", 1]}) == Optim(3e-4, 5, False, (0.1, 1.0))
    for key, value, message in (("lr", "fast", "lr must be a number, got 'fast'"),
                                ("steps", 2.5, "steps must be a whole number, got 2.5"),
                                ("on", "yes please", "on must be true or false")):
        with pytest.raises(ValueError, match=message):
            build(Optim, {key: value})


def test_shipped_deepspeed_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(ROOT / "training" / "ds_configs" / "zero3.json")  # the package's link to ds_configs/
    assert resolve_ds_config("ds_configs/zero3.json") == resolve_ds_config("zero3") == shipped
    with pytest.raises(FileNotFoundError, match="no file ds_configs/zero9.json"):
        resolve_ds_config("ds_configs/zero9.json")
    assert resolve_ds_config("my/own.json") == "my/own.json"  # the user's path, as given


def test_one_weight_decay_rule():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(10, 4))
    model[0].bias.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias)}  # frozen left out


def test_schedule_warms_up_then_decays_to_zero():
    factor = linear_schedule(warmup=4, total=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == 0.5 and factor(12) == 0.0 and factor(20) == 0.0


def test_task_sampler_draws_by_the_alpha_rule_from_the_index_alone():
    sampler = TaskSampler(["a", "b", "c"], [10, 30, 60], alpha=0.5, seed=3)
    draws = Counter(sampler.task(i) for i in range(20000))
    for name, p in zip("abc", sampling_probabilities([10, 30, 60], 0.5)):
        assert abs(draws[name] / 20000 - p) < 0.015
    again = TaskSampler(["a", "b", "c"], [10, 30, 60], alpha=0.5, seed=3)
    assert [again.task(i) for i in range(500, 600)] == [sampler.task(i) for i in range(500, 600)]  # no history
    assert {sampler.task(i, among=["b", "c"]) for i in range(100)} == {"b", "c"}
    with pytest.raises(ValueError, match="alpha must be in"):
        TaskSampler(["a"], [1], alpha=2.0, seed=0)


def test_the_logging_window_survives_a_resume():
    if not dist.is_initialized():
        distributed.init(Topology(0, 1, 0))
    window = Window()
    window.add("mlm", torch.tensor(2.0), ["text", "generic"])
    window.add("mlm", torch.tensor(4.0), ["text", "generic"])
    window.add("image", torch.tensor(1.0), ["image", "generic"])
    resumed = Window()
    resumed.load_state_dict(window.state_dict())
    expected, _ = window.scalars()
    got, _ = resumed.scalars()
    assert got == expected
    assert expected["loss/mlm"] == 3.0 and expected["loss"] == 7.0 / 3 and expected["tasks/mlm"] == 2
    assert expected["skills/activations/generic"] == 3
    assert window.scalars()[0]["loss"] == 0.0 and not window.counts  # cleared by reading


def test_each_warning_is_printed_once_even_when_filters_change():
    """DeepSpeed's deprecated collectives warn at every step, and libraries reset the warnings filters in
    between; each distinct warning still reaches the log once."""
    code = """
import warnings
from training.metrics import show_each_warning_once
show_each_warning_once()
for _ in range(5):
    warnings.warn("`torch.distributed.x` is deprecated", FutureWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
warnings.warn("another", UserWarning)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is deprecated") == 1 and done.stderr.count("another") == 1


def test_engine_config_fills_what_the_run_sets():
    from training import zero

    base = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto",
            "zero_optimization": {"stage": 2}}
    ds = zero.engine_config(base, 4, 2, 1.0, bf16=False, overrides={"zero_optimization": {"stage": 3}})
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False and "train_batch_size" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="left at 'auto'.*zero_optimization.reduce_bucket_size"):
        zero.engine_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, 1, 1, 0.0, False)
