"""Pseudo-to-Real: layer sharing in the model, delinking the model and a training checkpoint, and the
pretraining run that delinks at a configured step."""

import pytest
import torch

from skillnet import SkillNetForConditionalGeneration, SkillNetForPreTraining, load_config

ROUTERS = {"skill": {}, "dense": {}, "moe": {}, "prototype": {"num_experts": 6}, "task_router": {}}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("sharing", ["all", "cycle:2"])
def test_delinked_model_gives_the_shared_models_outputs_bit_for_bit(router, sharing):
    torch.manual_seed(0)
    config = load_config("tiny", num_hidden_layers=4, layer_sharing=sharing, router=router, **ROUTERS[router])
    shared = SkillNetForPreTraining(config).eval()
    real = shared.delink().eval()
    unique = 1 if sharing == "all" else 2
    assert len(shared.skillnet.encoder.layers) == unique and len(real.skillnet.encoder.layers) == 4
    assert real.config.layer_sharing == "none" and not real.config.shares_layers
    # unique parameters: the shared model holds each layer once
    per_layer = sum(p.numel() for p in real.skillnet.encoder.layers[0].parameters())
    assert sum(p.numel() for p in real.parameters()) - sum(p.numel() for p in shared.parameters()) \
        == (4 - unique) * per_layer
    ids = torch.randint(5, 500, (2, 9))
    a, b = shared(input_ids=ids, task="masked_lm"), real(input_ids=ids, task="masked_lm")
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key
    # the copies are tensors of their own: training one depth leaves the others
    layers = real.skillnet.encoder.layers
    assert layers[0].ffn_norm.weight.data_ptr() != layers[unique].ffn_norm.weight.data_ptr()


def test_delinked_encoder_decoder_generates_as_the_shared_one():
    torch.manual_seed(0)
    config = load_config("tiny", num_hidden_layers=4, num_decoder_layers=2, layer_sharing="cycle:2",
                         decoder_layer_sharing="all", decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
    shared = SkillNetForConditionalGeneration(config).eval()
    assert len(shared.decoder.layers) == 1 and len(shared.skillnet.encoder.layers) == 2
    real = shared.delink().eval()
    assert len(real.decoder.layers) == 2 and len(real.skillnet.encoder.layers) == 4
    ids = torch.randint(5, 500, (2, 7))
    kwargs = dict(task="masked_lm", max_new_tokens=6, do_sample=False)
    assert torch.equal(shared.generate(ids, **kwargs), real.generate(ids, **kwargs))


@pytest.mark.parametrize("overrides, message", [
    ({"layer_sharing": "cycle:3"}, "3 does not divide the stack's 4 layers"),
    ({"layer_sharing": "some"}, "layer_sharing must be 'none', 'all' or 'cycle:M'"),
    ({"layer_sharing": "cycle:2", "skill_layers": [1, 2]}, "shared layer 0 runs, not all"),
])
def test_bad_sharing_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", num_hidden_layers=4, **overrides)


def test_a_model_without_shared_layers_is_not_delinked():
    with pytest.raises(ValueError, match="shares no layers"):
        SkillNetForPreTraining(load_config("tiny")).delink()


def test_rewarmup_scales_the_schedule_after_delinking():
    from training.optim import linear_schedule

    plain, again = linear_schedule(2, 20), linear_schedule(2, 20, rewarmup=(10, 4))
    assert [again(s) for s in range(10)] == [plain(s) for s in range(10)]
    assert again(10) == pytest.approx(plain(10) / 4) and again(13) == pytest.approx(plain(13))


@pytest.mark.slow
def test_pretraining_delinks_at_its_step_and_the_offline_delink_agrees(sample, tmp_path):
    """The run checkpoints the shared model at `delink_at`, delinks it beside it and trains the real model on;
    `python -m training.delink` of the same checkpoint writes the same tensors; both export to a model equal to
    the shared export's `delink()`. (ZeRO-3 on 2 ranks, resuming across the delink and on another world
    size: the pseudo-to-real scenario of test_distributed.py.)"""
    ds = "zero2"
    from pretrain.export import main as export
    from pretrain.train import main
    from training.delink import main as delink

    run = tmp_path / "run"
    common = [f"data_root={sample}", f"run_dir={run}", "train.log_every=2", "model.num_hidden_layers=4",
              "model.layer_sharing=all", "checkpoint.keep_last=5", "checkpoint.every=10", f"distributed.ds_config={ds}",
              "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"]
    assert main(["--config", "tiny", *common, "train.steps=5", "pseudo_to_real.delink_at=3"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step00000003", "step00000003-delinked", "step00000005"]
    offline = tmp_path / "offline"
    assert delink([str(run / "checkpoints" / "step00000003"), str(offline)]) == 0
    online = run / "checkpoints" / "step00000003-delinked"
    files = sorted(p.relative_to(online) for p in (online / "universal" / "zero").rglob("*.pt"))
    assert files == sorted(p.relative_to(offline) for p in (offline / "universal" / "zero").rglob("*.pt"))
    for f in files:
        a, b = torch.load(online / f, weights_only=False), torch.load(offline / f, weights_only=False)
        if isinstance(a, dict) and "param" in a:
            assert torch.equal(a["param"], b["param"]), f
    assert export([str(run / "checkpoints" / "step00000003"), str(tmp_path / "shared")]) == 0
    assert export([str(online), str(tmp_path / "real")]) == 0
    expected = SkillNetForPreTraining.from_pretrained(tmp_path / "shared").delink().state_dict()
    got = SkillNetForPreTraining.from_pretrained(tmp_path / "real").state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # a depth's moments are the shared ones over the 4 depths that shared them
    name = "skillnet.encoder.layers.{}.ffn_norm.weight"
    shared = torch.load(run / "checkpoints/step00000003/universal/zero" / name.format(0) / "exp_avg.pt",
                        weights_only=False)["param"]
    for depth in range(4):
        copy = torch.load(online / "universal/zero" / name.format(depth) / "exp_avg.pt", weights_only=False)
        assert torch.equal(copy["param"], shared / 4)
    # the real model's checkpoint shares no layers: delinking it again is refused
    assert delink([str(online), str(tmp_path / "again")]) == 2


def test_bad_delink_settings_are_refused_before_any_work(sample, tmp_path, capsys):
    from pretrain.train import main

    base = ["--config", "tiny", f"data_root={sample}", f"run_dir={tmp_path / 'run'}"]
    assert main([*base, "train.steps=4", "pseudo_to_real.delink_at=4", "model.layer_sharing=all"]) == 2
    assert "pseudo_to_real.delink_at 4 must lie between 0 and train.steps 4" in capsys.readouterr().err
    assert main([*base, "train.steps=4", "pseudo_to_real.delink_at=2"]) == 2
    assert "needs a model that shares layers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_benchmark_reads_steps_seconds_and_memory_to_reach_scratchs_final_loss(tmp_path):
    """`benchmarks/pseudo_to_real.py`'s summary of made-up runs: a row twice as fast per step as scratch
    reaches scratch's final loss in about half the steps; its state bytes per phase over the real model's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_to_real.py"
    spec = importlib.util.spec_from_file_location("pseudo_to_real_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table, seeds, steps = bench.rows(40), [0, 1], 40
    assert list(table.values())[1] == {"delink_at": 2, "moments": "rescale"}

    def run(rate, seed, phases):
        return {"loss": [max(1.0, 10 - rate * i) + 0.01 * seed for i in range(steps)],
                "time": [0.5 * i for i in range(steps)], "state_bytes": phases}

    runs = {f"{row}|{s}": run(0.2 if row == bench.SCRATCH else 0.4, s, [2**20] if row == bench.SCRATCH
                              else [2**18, 2**20]) for row in table for s in seeds}
    text, summary = bench.summarize(runs, table, seeds, window=4)
    target = summary["target"]
    assert target == pytest.approx(10 - 0.2 * 37.5 + 0.005)
    scratch, fast = summary[bench.SCRATCH], summary["delinked at 5%"]
    assert scratch["reach"][0] == 40 and fast["reach"][0] == 22  # the first full window at or below the target
    assert fast["reach"][1] == pytest.approx(0.5 * 21)
    assert fast["difference"][0] == pytest.approx(1 - target + 0.005)
    assert "| delinked at 5% |" in text and "| 0.25 -> 1.00 |" in text and "| 0.55 |" in text
    bench.plot(runs, table, seeds, 4, target, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_shared_layers_work_with_activation_checkpointing_and_lora(tmp_path):
    """A shared layer is an ordinary module called at several depths: recomputing its activations gives the
    same gradients, and LoRA adapts it once (one adapter per unique layer, trained by every depth)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    config = load_config("tiny", num_hidden_layers=4, layer_sharing="cycle:2", hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    model = SkillNetForPreTraining(config).train()
    ids = torch.randint(5, 500, (2, 9))

    def gradients():
        model.zero_grad()
        model(input_ids=ids, labels=ids, task="masked_lm").loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(".layers.1." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.gradient_checkpointing_disable()

    lora = get_peft_model(model, LoraConfig(r=4, target_modules=r".*\.ffn\.skills\.\w+\.fc[12]",
                                            init_lora_weights=False))
    out = lora(input_ids=ids, labels=ids, task="masked_lm").loss
    out.backward()
    adapters = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    layers = {n.split(".layers.")[1].split(".")[0] for n in adapters}
    assert layers == {"0", "1"}  # two unique layers, four depths
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values())
    lora.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights (no step was taken)
    reloaded = PeftModel.from_pretrained(SkillNetForPreTraining(config), tmp_path).eval()
    lora.eval()
    torch.testing.assert_close(reloaded(input_ids=ids, task="masked_lm").prediction_logits,
                               lora(input_ids=ids, task="masked_lm").prediction_logits)
