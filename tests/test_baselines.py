"""SkillNet and the four baselines it is compared with train and lose loss on the same data."""

import pytest
import torch
from conftest import nlu_config

from skillnet import SkillNetForPreTraining, SkillNetModel


def _train(model, steps=30):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 128, (8, 12), generator=g)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=g) < 0.3
    labels[masked] = ids[masked]
    inputs = ids.masked_fill(masked, 4)
    pair = torch.randint(0, 2, (8,), generator=g)
    losses = []
    for step in range(steps):
        task = "masked_lm" if step % 2 == 0 else "next_sentence"
        out = model(input_ids=inputs, task=task,
                    **({"labels": labels} if task == "masked_lm" else {"next_sentence_label": pair}))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("router", ["skill", "dense", "moe", "prototype", "task_router"])
def test_every_router_trains(router):
    model = SkillNetForPreTraining(nlu_config(router=router, num_experts=4, prototype_groups=2)).train()
    losses = _train(model)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (router, first, last)


def test_moe_routes_top2_tokens_and_adds_balancing_loss():
    model = SkillNetModel(nlu_config(router="moe", num_experts=7, moe_top_k=2))
    out = model(input_ids=torch.randint(7, 128, (2, 6)))
    assert out.aux_loss is not None and out.aux_loss > 0
    layer = model.encoder.layers[0].ffn
    assert len(layer.experts) == 7 and layer.top_k == 2


def test_prototype_uses_one_expert_per_group():
    model = SkillNetModel(nlu_config(router="prototype", num_experts=6, prototype_groups=3))
    ffn = model.encoder.layers[0].ffn
    x = torch.randn(1, 5, 32)
    from skillnet.skills import Route

    route = Route([(None, ())])
    calls = []
    hooks = [e.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for e in ffn.experts]
    ffn(x, route)
    for h in hooks:
        h.remove()
    assert len(calls) == 6  # every expert is called, even with no tokens
    assert sum(calls) == 5 * 3  # each token visits one expert in each of the three groups


def test_task_router_is_per_task_and_deterministic_at_inference():
    model = SkillNetModel(nlu_config(router="task_router", num_experts=3)).eval()
    ids = torch.randint(7, 128, (2, 6))
    a = model(input_ids=ids, task="masked_lm").last_hidden_state
    torch.testing.assert_close(a, model(input_ids=ids, task="masked_lm").last_hidden_state)
    torch.testing.assert_close(a, model(input_ids=ids).last_hidden_state)  # the default task
    model.config.default_task = None
    with pytest.raises(ValueError, match="needs task="):
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, task=["masked_lm", "next_sentence"]).last_hidden_state.sum().backward()
    router = model.encoder.layers[0].ffn.router
    assert router[0].weight.grad is not None and router[0].weight.grad.abs().sum() > 0  # straight-through
    assert model.task_embedding.weight.grad.abs().sum() > 0
