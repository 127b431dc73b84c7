"""The skill layer: outputs are the mean of the active skills, inactive skills cost nothing."""

from unittest.mock import patch

import pytest
import torch
from conftest import nlu_config
from torch.utils.flop_counter import FlopCounterMode

from skillnet import SkillNetModel
from skillnet.layers import SkillFFN, SkillLinear
from skillnet.skills import Route


def _names(n):
    return [f"s{i}" for i in range(n)]


def test_wide_ffn_equals_mean_of_separate_skill_ffns():
    layer = SkillFFN(_names(5), 16, 32, "gelu")
    x = torch.randn(3, 7, 16)
    active = (0, 2, 4)
    expected = torch.stack([layer.skills[f"s{i}"](x) for i in active]).mean(0)
    torch.testing.assert_close(layer(x, Route([(None, active)])), expected)


def test_skill_linear_equals_mean_of_projections():
    layer = SkillLinear(_names(4), 16, 16)
    x = torch.randn(2, 5, 16)
    expected = (layer.skills["s1"](x) + layer.skills["s3"](x)) / 2
    torch.testing.assert_close(layer(x, Route([(None, (1, 3))])), expected)


def test_inactive_skills_get_no_gradient():
    layer = SkillFFN(_names(6), 16, 32, "gelu")
    layer(torch.randn(2, 4, 16), Route([(None, (1, 5))])).sum().backward()
    for name, p in layer.named_parameters():
        skill = name.split(".")[1]
        if skill in ("s1", "s5"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_compute_follows_active_skills_only():
    x = torch.randn(4, 8, 16, requires_grad=True)

    def run(num_skills, active):
        layer = SkillFFN(_names(num_skills), 16, 32, "gelu")
        return _flops(lambda: layer(x, Route([(None, active)])).sum().backward())

    one = run(4, (0,))
    assert run(4, (0, 1)) == 2 * one
    assert run(32, (3, 17)) == run(4, (0, 1))  # the number of skills held costs nothing
    assert run(32, (0, 5, 9, 31)) == 4 * one


def test_whole_model_gradient_only_reaches_the_task_skills():
    model = SkillNetModel(nlu_config())
    ids = torch.randint(1, 128, (2, 10))
    model(input_ids=ids, task="named_entity_recognition").last_hidden_state.sum().backward()
    for name, p in model.named_parameters():
        if ".skills." in name:
            skill = name.split(".skills.")[1].split(".")[0]
            assert (p.grad is not None) == (skill in ("token", "generic")), name


@pytest.mark.parametrize("skill_attention", [False, True])
def test_per_sample_activation_equals_each_sample_alone(skill_attention):
    model = SkillNetModel(nlu_config(skill_attention=skill_attention)).eval()
    ids = torch.randint(1, 128, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    tasks = ["sentiment_analysis", "named_entity_recognition", "sentiment_analysis", "reading_comprehension"]
    mixed = model(input_ids=ids, attention_mask=mask, task=tasks).last_hidden_state
    for i, task in enumerate(tasks):
        alone = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], task=task).last_hidden_state
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # the same mix given as skill lists and as a mask
    registry = model.registry
    skills = [[registry.names[j] for j in registry.task_skills(t)] for t in tasks]
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, skills=skills).last_hidden_state, mixed)
    skill_mask = torch.stack([registry.mask(registry.task_skills(t)) for t in tasks])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, skill_mask=skill_mask).last_hidden_state,
                               mixed)


def test_skill_layers_placement_builds_dense_layers_elsewhere():
    model = SkillNetModel(nlu_config(num_hidden_layers=4, skill_layers="top:1"))
    kinds = [type(layer.ffn).__name__ for layer in model.encoder.layers]
    assert kinds == ["FFN", "FFN", "FFN", "SkillFFN"]
    model = SkillNetModel(nlu_config(num_hidden_layers=4, skill_layers="every:2", skill_attention=True))
    assert [type(layer.attn.q).__name__ for layer in model.encoder.layers] == ["SharedLinear", "SkillLinear"] * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="poetry"), "unknown task 'poetry'"),
        (dict(skills=["token", "humour"]), r"unknown skills \['humour'\]"),
        (dict(), "needs task=, skills= or skill_mask="),
        (dict(task="masked_lm", skills=["token"]), "pass one of task, skills, skill_mask"),
        (dict(task=["masked_lm"]), "task has 1 entries for a batch of 2"),
        (dict(skill_mask=torch.ones(2, 3, dtype=torch.bool)), r"skill_mask must be \(batch=2, num_skills=7\)"),
    ],
)
def test_bad_routing_is_refused(kwargs, message):
    config = nlu_config()
    config.default_task = None  # every call names its skills
    with pytest.raises(ValueError, match=message):
        SkillNetModel(config)(input_ids=torch.randint(1, 128, (2, 5)), **kwargs)


def test_a_call_naming_no_skills_runs_the_default_task():
    """As a pipeline calls it (the tokenizer's outputs only): the config's `default_task`, from its shipped
    skill set or set by the user."""
    model = SkillNetModel(nlu_config()).eval()
    ids = torch.randint(1, 128, (2, 5))
    assert model.config.default_task == "masked_lm"
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                               model(input_ids=ids, task="masked_lm").last_hidden_state)
    model.config.default_task = "sentiment_analysis"
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                               model(input_ids=ids, task="sentiment_analysis").last_hidden_state)
    with pytest.raises(ValueError, match="default_task 'poetry' is not in the task table"):
        nlu_config(default_task="poetry")


def test_mlm_logits_only_at_masked_positions():
    from skillnet import SkillNetForPreTraining

    model = SkillNetForPreTraining(nlu_config(vocab_size=4096))
    ids = torch.randint(1, 4096, (4, 32))

    def step(fraction):
        labels = ids.masked_fill(torch.arange(32) >= int(32 * fraction), -100)
        return _flops(lambda: model(input_ids=ids, task="masked_lm", labels=labels).loss.backward())

    assert step(0.15) < 0.6 * step(1.0)


def test_masked_positions_given_spare_reading_the_labels():
    """A trainer that masked on the host passes the masked positions: the same logits and loss as finding
    them in the labels, and no read of the labels (a host synchronisation on an accelerator)."""
    from skillnet import SkillNetForPreTraining

    model = SkillNetForPreTraining(nlu_config(vocab_size=512)).eval()
    ids = torch.randint(1, 512, (3, 16))
    labels = ids.masked_fill(torch.rand(ids.shape) > 0.3, -100)
    found = model(input_ids=ids, task="masked_lm", labels=labels)
    positions = torch.nonzero(labels.flatten() != -100).flatten()
    read = []
    nonzero = torch.nonzero
    with patch.object(torch, "nonzero", lambda *a, **k: read.append(1) or nonzero(*a, **k)):
        given = model(input_ids=ids, task="masked_lm", labels=labels, masked_positions=positions)
    assert not read
    assert torch.equal(given.prediction_logits, found.prediction_logits) and torch.equal(given.loss, found.loss)


def test_attention_gets_no_mask_without_padding(monkeypatch):
    """Unpadded inputs (images, text given no attention mask) and the decoder's causal attention pass no
    mask to SDPA, so its efficient kernels stay eligible; padded text passes one."""
    import torch.nn.functional as F

    from skillnet import SkillNetForConditionalGeneration, SkillNetModel, load_config

    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append((k["attn_mask"] is None, k["is_causal"])) or sdpa(*a, **k))
    model = SkillNetModel(load_config("tiny"))
    model(pixel_values=torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), task="image")
    model(input_ids=torch.randint(5, 500, (2, 7)), task="text")
    assert seen == [(True, False)] * 4
    seen.clear()
    model(input_ids=torch.randint(5, 500, (2, 7)), attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
          task="text")
    assert seen == [(False, False)] * 2
    seen.clear()
    gen = SkillNetForConditionalGeneration(nlu_config(num_decoder_layers=1, decoder_start_token_id=1))
    gen(input_ids=torch.randint(1, 128, (2, 5)), labels=torch.randint(1, 128, (2, 4)), task="summarization"
        if "summarization" in gen.config.tasks else "sentiment_analysis")
    assert (True, True) in seen  # the decoder's self-attention
