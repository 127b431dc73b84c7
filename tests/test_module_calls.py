"""A skill is a module that is called: wrappers that work through module calls and hooks (PEFT adapters,
accelerate's offload hooks, forward hooks) see exactly the active skills."""

import pytest
import torch
from conftest import nlu_config

from skillnet import SkillNetForPreTraining, SkillNetModel


def test_forward_hooks_see_exactly_the_active_skills():
    model = SkillNetModel(nlu_config(skill_attention=True))
    called = set()
    for name, module in model.named_modules():
        if name.endswith(tuple(f".skills.{s}" for s in model.registry.names)):
            module.register_forward_hook(lambda m, i, o, name=name: called.add(name.split(".skills.")[1]))
    model(input_ids=torch.randint(1, 128, (2, 6)), task="reading_comprehension")  # token, interaction, question
    assert called == {"token", "interaction", "question", "generic"}
    called.clear()
    model(input_ids=torch.randint(1, 128, (2, 6)), task=["sentiment_analysis", "named_entity_recognition"])
    assert called == {"sequence", "sentiment", "token", "generic"}


def test_lora_on_skills_trains_the_active_skills_adapters():
    from peft import LoraConfig, get_peft_model

    model = SkillNetModel(nlu_config(skill_attention=True))
    ids = torch.randint(1, 128, (2, 6))
    before = model(input_ids=ids, task="reading_comprehension").last_hidden_state.detach()
    # every skill's FFN and its query and value projections
    targets = r".*\.ffn\.skills\.\w+\.fc[12]|.*\.attn\.[qv]\.skills\.\w+"
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    out = lora(input_ids=ids, task="reading_comprehension").last_hidden_state
    assert not torch.allclose(out, before)  # the adapters are in the path of the active skills
    out.pow(2).mean().backward()
    adapters = {n: p for n, p in lora.named_parameters() if "lora_" in n and ".skills." in n}
    active = ("token", "interaction", "question", "generic")
    for name, p in adapters.items():
        skill = name.split(".skills.")[1].split(".")[0]
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (skill in active), name
    assert sum(p.grad is not None for p in adapters.values()) == 2 * 2 * 4 * 4  # layers x (A, B) x modules x skills


def test_accelerate_cpu_offload_runs_the_model():
    """accelerate's offload hooks move each module's weights in on its call: with weights kept off the
    module (device meta) the model gives the same outputs as in memory."""
    from accelerate import cpu_offload

    model = SkillNetForPreTraining(nlu_config(skill_attention=True)).eval()
    ids = torch.randint(1, 128, (2, 6))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.5, -100)
    labels[0, 0] = ids[0, 0]
    expected = model(input_ids=ids, task="reading_comprehension", labels=labels)
    offloaded = cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    got = offloaded(input_ids=ids, task="reading_comprehension", labels=labels)
    torch.testing.assert_close(got.prediction_logits, expected.prediction_logits)
    torch.testing.assert_close(got.loss, expected.loss)


def test_a_contrastive_pair_runs_in_one_call(tiny_config):
    """Both sides of a pair in one call: every trunk module is called once (so ZeRO-3 gathers it once)
    and each side's embeddings are those of its own call."""
    model = SkillNetForPreTraining(tiny_config).eval()
    images = torch.randn(3, 3, 32, 32)
    ids, mask = torch.randint(7, 512, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0  # a padded caption
    calls = []
    model.skillnet.encoder.layers[0].attn.q.register_forward_hook(lambda *_: calls.append(1))
    out = model(pixel_values=images, task="image", pair={"input_ids": ids, "attention_mask": mask, "task": "text"})
    assert len(calls) == 1
    torch.testing.assert_close(out.embeddings, model(pixel_values=images, task="image").embeddings)
    torch.testing.assert_close(out.pair_embeddings, model(input_ids=ids, attention_mask=mask, task="text").embeddings)


@pytest.mark.parametrize("router", ["skill", "moe", "prototype", "task_router"])
def test_packed_inputs_give_each_input_its_own_outputs(router):
    """Several inputs in one call, per-sample skill sets and prompt vectors included, give what each
    input gives alone, with every router."""
    from skillnet.modeling import PromptEncoder

    model = SkillNetModel(nlu_config(router=router, num_experts=4, prototype_groups=2, skill_attention=True)).eval()
    prompts = PromptEncoder(3, 32, instance_wise=False)
    a = {"input_ids": torch.randint(7, 128, (2, 6)), "task": "named_entity_recognition", "prompts": prompts}
    b = {"input_ids": torch.randint(7, 128, (3, 4)), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 3),
         "task": ["sentiment_analysis", "named_entity_recognition", "reading_comprehension"]}
    packed = model(packed=[a, b], output_hidden_states=True)
    for got, inputs in zip(packed, (a, b)):
        alone = model(**inputs, output_hidden_states=True)
        torch.testing.assert_close(got.last_hidden_state, alone.last_hidden_state)
        torch.testing.assert_close(got.pooler_output, alone.pooler_output)
        torch.testing.assert_close(got.hidden_states[-1], alone.hidden_states[-1])
    if router in ("moe", "prototype"):  # one balancing loss per layer for the whole call
        assert packed[0].aux_loss is not None and packed[1].aux_loss is None
    with pytest.raises(ValueError, match=r"packed input 1: unknown arguments \['labels'\]"):
        model(packed=[a, {**b, "labels": b["input_ids"]}])
