"""A skill is a module that is called: wrappers that work through module calls and hooks (PEFT adapters,
accelerate's offload hooks, forward hooks) see exactly the active skills."""

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
