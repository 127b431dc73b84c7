"""One test per use of DeepSpeed internals (`training/zero`), on real engines in this process (one rank,
gloo, every parameter partitioned under ZeRO-3): when DeepSpeed moves one of them, its test says which."""

import copy

import deepspeed
import pytest
import torch
import torch.distributed as dist
from torch import nn

from training import checkpoint, distributed, zero
from training.distributed import Topology
from training.zero import internals
from training.zero.layout import STATES, parameter_layout, whole_parameters
from training.zero.traces import TraceSwitch


class Two(nn.Module):
    """`a` always runs, `b` only when asked: a task that leaves some parameters untouched."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, use_b: bool = True):
        h = self.a(x)
        return (self.b(h) if use_b else h).pow(2).mean()


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not dist.is_initialized():
        distributed.init(Topology(0, 1, 0))


def _config(stage: int, **extra) -> dict:
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    return zero.merge(ds, extra)


def _engine(model, ds, lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return zero.initialize(model, optimizer, None, ds)


def _full(engine) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


X = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_tested_range_is_the_pinned_range():
    import re
    from pathlib import Path

    pinned = re.search(r'"deepspeed([^"]*)"',
                       (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()).group(1)
    assert pinned == ",".join(zero.TESTED)
    from packaging.specifiers import SpecifierSet

    assert deepspeed.__version__.split("+")[0] in SpecifierSet(pinned)


def test_clear_gradient_partitions_keeps_untouched_parameters_out_of_the_next_step():
    """Step 1 trains a and b, step 2 only a: step 2's gradient norm is a's alone (with b's stale gradient
    it would be larger)."""
    torch.manual_seed(0)
    engine = _engine(Two(), _config(3))
    engine.backward(engine(X[0]))
    engine.step()
    internals.clear_gradient_partitions(engine)
    reference = Two()
    reference.load_state_dict(_full(engine))
    reference(X[1], use_b=False).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.a.parameters()]).norm()
    engine.backward(engine(X[1], use_b=False))
    engine.step()
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_batched_grad_norm_is_the_norm_over_every_gradient(stage):
    """The engine's norm (the batched one `zero.initialize` installs) is DeepSpeed's own per-tensor norm, and
    the norm of the gradients a plain backward gives; with clipping it scales the step alike."""
    torch.manual_seed(0)
    model = Two()
    reference = copy.deepcopy(model)
    engine = _engine(model, _config(stage, gradient_clipping=1e-3))
    assert engine.optimizer.get_grad_norm_direct.__name__ == "grad_norm"
    engine.backward(engine(X[0]))
    optimizer = engine.optimizer
    grads, params = ((optimizer.averaged_gradients[0], optimizer.params_in_partition[0]) if stage == 2 else
                     (optimizer.averaged_gradients[0], optimizer.fp16_groups[0]))
    own = type(optimizer).get_grad_norm_direct(optimizer, grads, params)
    batched = optimizer.get_grad_norm_direct(grads, params)
    reference(X[0]).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()]).double().norm()
    assert float(batched) == pytest.approx(float(own), rel=1e-9)
    assert float(batched) == pytest.approx(float(expected), rel=1e-5)
    engine.step()
    assert float(engine.get_global_grad_norm()) == pytest.approx(float(expected), rel=1e-5)


def test_one_reduction_equals_one_backward_of_the_mean():
    torch.manual_seed(0)
    model = Two()
    coalesced, single = _engine(copy.deepcopy(model), _config(3)), _engine(copy.deepcopy(model), _config(3))
    with internals.one_reduction(coalesced):
        for x in X[:2]:
            coalesced.backward(coalesced(x) / 2)
    coalesced.step()
    single.backward(single(torch.cat(X[:2])))  # the mean over both micro-batches' rows
    single.step()
    got, expected = _full(coalesced), _full(single)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_expert_groups_and_tagged_parameters_get_groups_of_their_own():
    name, group, data_group = internals.expert_groups(1)
    assert name == "ep_size_1" and dist.get_world_size(group) == 1 and dist.get_world_size(data_group) == 1
    model = Two()
    for p in model.b.parameters():
        internals.tag_expert(p, name, data_group)
    groups = internals.expert_parameter_groups([{"name": "all", "params": list(model.parameters())}])
    experts = [g for g in groups if g.get("moe")]
    assert len(experts) == 1 and {id(p) for p in experts[0]["params"]} == {id(p) for p in model.b.parameters()}


def test_whole_on_rank0_writes_back_into_the_partitions():
    with deepspeed.zero.Init(config_dict_or_path=_config(3)):
        layer = nn.Linear(8, 4)
    assert layer.weight.numel() == 0  # partitioned
    with internals.whole_on_rank0([layer.weight, layer.bias]):
        assert layer.weight.shape == (4, 8)
        layer.weight.data.fill_(2.0)
        layer.bias.data.fill_(-1.0)
    assert layer.weight.numel() == 0
    with deepspeed.zero.GatheredParameters([layer.weight, layer.bias]):
        assert bool((layer.weight == 2).all()) and bool((layer.bias == -1).all())


class Nested(nn.Module):
    """Containers without parameters of their own around the modules that hold them, as in a skill layer."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"one": Two(), "two": Two()})
        self.drop = nn.Dropout(0.0)

    def forward(self, x, use_b: bool = True):
        return self.block["one"](self.drop(x), use_b) + self.block["two"](x, use_b)


def test_zero3_hooks_only_the_modules_holding_parameters():
    """ZeRO-3's per-module hooks go on the modules that hold parameters and on the model, not on the
    containers; training is the same, bit for bit, as with DeepSpeed's hooks on every module."""
    torch.manual_seed(0)
    model = Nested()
    ours, theirs = _engine(copy.deepcopy(model), _config(3)), copy.deepcopy(model)
    everywhere, *_ = deepspeed.initialize(model=theirs, config=_config(3),
                                          optimizer=torch.optim.AdamW(theirs.parameters(), lr=1e-2))
    hooked = {name for name, m in ours.module.named_modules() if m._forward_pre_hooks}
    assert hooked == {"", "block.one.a", "block.one.b", "block.two.a", "block.two.b"}
    assert all(m._forward_pre_hooks for m in everywhere.module.modules())  # DeepSpeed's own: every module
    for engine in (ours, everywhere):
        for step, x in enumerate(X):
            engine.backward(engine(x, use_b=step % 2 == 0))
            engine.step()
    got, expected = _full(ours), _full(everywhere)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    persistent = _engine(copy.deepcopy(model),
                         _config(3, zero_optimization={"stage3_param_persistence_threshold": 100}))
    assert {name for name, m in persistent.module.named_modules() if m._forward_pre_hooks} == {""}  # none to gather


def test_a_released_engine_leaves_nothing_alive():
    """After `zero.release`, a ZeRO-3 engine whose trace was complete (so DeepSpeed cached what to release
    per module) and its model are garbage: nothing keeps the process groups their parameters hold."""
    import gc
    import weakref

    def trained():
        torch.manual_seed(0)
        engine = _engine(Nested(), _config(3))
        for x in X:
            engine.backward(engine(x))
            engine.step()
        zero.release(engine)
        return weakref.ref(engine), weakref.ref(engine.module)

    engine, model = trained()
    gc.collect()
    assert engine() is None and model() is None


def test_cpu_adam_resumes_bit_exactly(tmp_path):
    """The offloaded optimizer (DeepSpeed's CPU Adam, ZeRO-2): 4 steps straight equal 2 steps, a checkpoint,
    a new engine resumed from it (bias corrections replayed) and 2 more steps, bit for bit."""
    from training.config import OptimConfig
    from training.optim import build_optimizer

    ds = _config(2, zero_optimization={"offload_optimizer": {"device": "cpu"}})

    def engine():
        torch.manual_seed(0)
        model = Two()
        optimizer, scheduler = build_optimizer([{"params": list(model.parameters()), "weight_decay": 0.01}],
                                               OptimConfig(lr=1e-2, warmup_steps=0), 10, cpu_adam=True)
        return zero.initialize(model, optimizer, scheduler, ds)

    def steps(e, xs):
        for x in xs:
            e.backward(e(x))
            e.step()

    straight = engine()
    steps(straight, X)
    first = engine()
    steps(first, X[:2])
    folder = checkpoint.save(first, tmp_path / "checkpoints", 2, {"step": 2}, {}, keep_last=1)
    resumed = engine()
    assert checkpoint.load(resumed, folder)[0]["step"] == 2
    steps(resumed, X[2:])
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(a, b), name


def test_weight_decay_follows_a_partitioned_parameters_own_shape():
    """Under `deepspeed.zero.Init` a parameter holds an empty tensor between gathers; its matrices still decay."""
    from training.optim import parameter_groups

    with deepspeed.zero.Init(config_dict_or_path=_config(3)):
        model = Two()
    assert model.a.weight.numel() == 0
    decay, no_decay = parameter_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.a.weight), id(model.b.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.a.bias), id(model.b.bias)}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_universal_copy_loads_weights_moments_and_each_groups_settings(tmp_path, stage):
    """Converted and loaded into a new engine: the weights and moments of every parameter are the saved
    ones, and each optimizer group keeps its own weight decay (DeepSpeed's ZeRO-3 loader gives every group
    the first one's) and the saved learning rate."""
    from training.config import OptimConfig
    from training.optim import build_optimizer, parameter_groups
    from training.zero import universal

    def engine():
        torch.manual_seed(0)
        model = Two()
        optimizer, scheduler = build_optimizer(parameter_groups(model, 0.1), OptimConfig(lr=1e-2, warmup_steps=3), 10)
        return zero.initialize(model, optimizer, scheduler, _config(stage))

    first = engine()
    for x in X[:2]:
        first.backward(first(x))
        first.step()
    first.save_checkpoint(str(tmp_path), tag="step")
    out = tmp_path / "step" / universal.FOLDER
    assert universal.convert_parameters(tmp_path / "step", 1, out) == 4
    universal.finish(tmp_path / "step", out)
    resumed = engine()
    universal.load(resumed, tmp_path / "step")
    assert not resumed._config.load_universal_checkpoint  # set for the load only
    resumed.save_checkpoint(str(tmp_path), tag="again")
    layout, _ = parameter_layout(tmp_path / "step", 1)
    again = {name: whole for name, _, whole in whole_parameters(tmp_path / "again", 1, layout, STATES)}
    for name, _, whole in whole_parameters(tmp_path / "step", 1, layout, STATES):
        for key in STATES:
            assert torch.equal(again[name][key], whole[key]), (name, key)
    groups = universal._base(resumed).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr"] for g in groups] == [g["lr"] for g in universal._base(first).param_groups]
    assert resumed.lr_scheduler.last_epoch == first.lr_scheduler.last_epoch == 2


def test_a_checkpoint_with_other_optimizer_groups_resumes_through_its_universal_copy(tmp_path):
    """ZeRO-3 checkpoints written before the partitioned build kept the weight-decay groups apart hold one
    optimizer group; an engine with two loads them parameter by parameter, weights and moments intact."""
    from training.optim import parameter_groups

    def engine(groups):
        torch.manual_seed(0)
        model = Two()
        return zero.initialize(model, torch.optim.AdamW(groups(model), lr=1e-2), None, _config(3))

    old = engine(lambda m: [{"params": list(m.parameters()), "weight_decay": 0.0}])
    old.backward(old(X[0]))
    old.step()
    folder = checkpoint.save(old, tmp_path / "checkpoints", 1, {"step": 1}, {}, keep_last=1)
    resumed = engine(lambda m: parameter_groups(m, 0.1))
    assert checkpoint.load(resumed, folder)[0]["step"] == 1 and (folder / "universal").is_dir()
    resumed.save_checkpoint(str(tmp_path), tag="again")
    again = {name: whole for name, _, whole in whole_parameters(tmp_path / "again", 1,
                                                                parameter_layout(tmp_path / "again", 1)[0], STATES)}
    saved = list(whole_parameters(folder, 1, parameter_layout(folder, 1)[0], STATES))
    assert len(saved) == len(again) == 4
    for name, _, whole in saved:
        assert all(torch.equal(again[name][key], whole[key]) for key in STATES), name


def test_comm_clock_counts_the_gathered_bytes():
    ds = zero.engine_config(_config(3), 1, 1, 0.0, False, profile_comm=True)
    from deepspeed import comm

    comm.comms_logger.comms_dict.clear()
    clock = internals.CommClock()
    engine = _engine(Two(), ds)  # one rank gathers each parameter once, as it is set up, and keeps it
    assert clock.read() == sum(p.ds_numel for p in engine.module.parameters()) * 4  # fp32 bytes
    engine.backward(engine(X[0]))
    engine.step()  # a reduce-scatter of the gradients: timed, nothing gathered
    assert clock.read() == 0 and clock.take_seconds() > 0.0 and clock.take_seconds() == 0.0


def test_trace_switch_keeps_one_trace_per_kind_of_call():
    """Calls of two kinds alternate (with b, without b): with one trace per kind, every call of a kind seen
    twice runs along a complete trace; DeepSpeed's single trace breaks at every change."""
    def run(per_call: bool) -> list[tuple[int, int]]:
        torch.manual_seed(0)
        engine = _engine(Two(), _config(3))
        switch, counts = TraceSwitch(engine, per_call), []
        for i in range(8):
            use_b = i % 2 == 0
            switch.select(use_b)
            engine.backward(engine(X[i % 4], use_b=use_b))
            engine.step()
            counts.append(switch.take())
        return counts

    per_call, single = run(True), run(False)
    assert all(calls == 1 for calls, _ in per_call)
    assert [traced for _, traced in per_call][4:] == [1, 1, 1, 1]
    assert sum(traced for _, traced in single) < sum(traced for _, traced in per_call)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_layout_gives_back_every_parameter_and_its_moments(tmp_path, stage):
    """The weights and AdamW moments read back from the files equal the engine's, and a plain AdamW's."""
    torch.manual_seed(0)
    model = Two()
    reference = copy.deepcopy(model)
    engine = _engine(model, _config(stage))
    engine.backward(engine(X[0]))
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="step")
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference(X[0]).backward()
    adamw.step()
    layout, buffers = parameter_layout(tmp_path / "step", 1)
    expected = _full(engine)
    assert [name for name, *_ in layout] == list(expected) and buffers == {}
    moments = {name: adamw.state[p] for name, p in reference.named_parameters()}
    for name, shape, whole in whole_parameters(tmp_path / "step", 1, layout, STATES, batch_bytes=1):
        assert torch.equal(whole["fp32"], expected[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert (whole[key].abs().sum() > 0
                    and torch.allclose(whole[key], moments[name][key], rtol=1e-6, atol=0)), (name, key)


@pytest.mark.parametrize("stage, per_parameter", [(0, 12), (2, 16), (3, 20)])
def test_state_bytes_counts_weights_master_copies_moments_and_gradient_partitions(stage, per_parameter):
    """After a step: fp32 weights and two Adam moments (12 bytes a parameter), ZeRO-2's fp32 master copy
    (16), ZeRO-3's gradient partitions (20); twice the width, four times the bytes."""
    held = []
    for width in (64, 128):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
        engine = _engine(model, _config(stage))
        engine.backward(engine(torch.randn(4, width)).pow(2).mean())
        engine.step()
        held.append(internals.state_bytes(engine))
        assert held[-1].keys() == {"cpu"}
        assert held[-1]["cpu"] / (2 * width * (width + 1)) == pytest.approx(per_parameter, rel=1e-3)
    assert held[1]["cpu"] / held[0]["cpu"] == pytest.approx(4, rel=0.02)


def test_skill_offload_trains_as_the_resident_model_with_only_the_steps_skills_on_the_device(tmp_path):
    """ZeRO-3 with the optimizer on the CPU, the tiny SkillNet: with skill offloading (each skill in optimizer
    groups of its own, the inactive skills' partitions in host buffers) every step, a skill the step did not
    announce (brought in by its module's hook, a miss), a checkpoint written with skills offloaded and resumed
    into a new offloaded engine give the weights of the same steps without offloading, bit for bit; after each
    `begin_step` exactly the shared parameters and the announced skills lie in device buffers."""
    from skillnet import SkillNetModel, load_config
    from training.config import OptimConfig
    from training.optim import build_optimizer, parameter_groups
    from training.zero.offload import SkillOffload, skill_groups, skill_of

    config = load_config("tiny")
    ds = _config(3, zero_optimization={"offload_optimizer": {"device": "cpu"}})
    steps = ["text", "image", "image", "code", "text", "audio", "code"]
    announced = [True, True, True, True, True, False, True]  # step 5 ("audio") is not announced

    def engine(offloaded: bool):
        torch.manual_seed(0)
        model = SkillNetModel(config).eval()  # no dropout: the resumed engine's random state starts afresh
        groups = skill_groups(model, parameter_groups(model, 0.01)) if offloaded else parameter_groups(model, 0.01)
        optimizer, scheduler = build_optimizer(groups, OptimConfig(lr=1e-2, warmup_steps=0), 10, cpu_adam=True)
        e = zero.initialize(model, optimizer, scheduler, ds)
        return e, SkillOffload(e, torch.device("cpu")) if offloaded else None

    def skills(i):
        return set(config.registry.skill_names(steps[i])) if i < len(steps) and announced[i] else set()

    def run(e, offload, first, last):
        for i in range(first, last):
            if offload is not None:
                offload.begin_step(skills(i), skills(i + 1))
                assert offload.resident == skills(i) | skills(i + 1)
                on_host = {t.untyped_storage().data_ptr() for t in offload.host.values()}
                for name, p in e.module.named_parameters():
                    held_on_host = p.ds_tensor.untyped_storage().data_ptr() in on_host
                    assert held_on_host == (skill_of(name) is not None and skill_of(name) not in offload.resident)
            ids = torch.randint(5, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(i))
            e.backward(e(input_ids=ids, task=steps[i]).last_hidden_state.pow(2).mean())
            if offload is not None:
                offload.before_optimizer_step()
            e.step()
            internals.clear_gradient_partitions(e)  # as the trainers' step does

    straight, _ = engine(False)
    run(straight, None, 0, len(steps))
    first, offload = engine(True)
    run(first, offload, 0, 4)
    assert offload.take()["misses"] == 0
    folder = checkpoint.save(first, tmp_path / "checkpoints", 4, {"step": 4}, {}, keep_last=1)
    resumed, offload = engine(True)
    checkpoint.load(resumed, folder)
    run(resumed, offload, 4, len(steps))
    held = offload.take()
    assert held["misses"] == 1  # audio's sound skill (generic is in for the next step)
    assert offload.shared_bytes < held["peak"] < held["model"]
    for (name, a), b in zip(_full(straight).items(), _full(resumed).values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("regroup", [False, True])
def test_partial_offload_keeps_the_moments_of_the_sub_groups_stepped_on_the_accelerator(tmp_path, regroup):
    """ZeRO-3's partial optimizer offload (`offload_optimizer.ratio` 0.5) steps the first sub-groups on the
    accelerator with torch's AdamW, whose state DeepSpeed leaves out of its checkpoints. On a CPU machine
    every sub-group is the CPU's; here the first is marked as a GPU machine marks it. 6 steps straight equal
    3, a checkpoint and 3 more in a new engine, bit for bit, resumed as saved or (other optimizer groups)
    through the universal copy."""
    from training.config import OptimConfig
    from training.optim import build_optimizer

    ds = _config(3, zero_optimization={"offload_optimizer": {"device": "cpu", "ratio": 0.5}, "sub_group_size": 100})
    xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def engine(split_biases=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        params = dict(model.named_parameters())
        groups = ([{"params": [p for n, p in params.items() if n.endswith(end)], "weight_decay": 0.0}
                   for end in ("weight", "bias")] if split_biases else [{"params": list(params.values())}])
        optimizer, scheduler = build_optimizer(groups, OptimConfig(lr=1e-2, warmup_steps=0), 10, cpu_adam=True)
        e = zero.initialize(model, optimizer, scheduler, ds)
        assert len(e.optimizer.fp16_groups) >= 2
        e.optimizer.subgroup_to_device[0] = "cuda"  # what `ratio` 0.5 gives the first sub-groups on a GPU
        return e

    def steps(e, batch):
        for x in batch:
            e.backward(e(x).pow(2).mean())
            e.step()
            internals.clear_gradient_partitions(e)

    straight = engine()
    steps(straight, xs)
    first = engine()
    steps(first, xs[:3])
    assert first.optimizer.backup_optimizer.state  # sub-group 0's moments live there
    folder = checkpoint.save(first, tmp_path / "checkpoints", 3, {"step": 3}, {}, keep_last=1)
    resumed = engine(split_biases=regroup)
    checkpoint.load(resumed, folder)
    assert (folder / "universal").is_dir() == regroup
    steps(resumed, xs[3:])
    for (name, a), b in zip(_full(straight).items(), _full(resumed).values()):
        assert torch.equal(a, b), name
