"""Hugging Face citizenship: Auto classes, safetensors round trip, BERT initialisation, new skills."""

import pytest
import torch
from conftest import nlu_config
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, BertConfig, BertForPreTraining, BertModel

from skillnet import SkillNetForPreTraining, SkillNetModel
from skillnet.bert import from_bert


def test_save_and_load_round_trip(tmp_path, tiny_config):
    model = SkillNetForPreTraining(tiny_config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).skills == tiny_config.skills
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SkillNetForPreTraining)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.randint(7, 512, (2, 8))
    torch.testing.assert_close(loaded(input_ids=ids, task="text").embeddings,
                               model(input_ids=ids, task="text").embeddings)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, SkillNetModel)


def test_checkpoint_with_other_skills_is_refused(tmp_path):
    SkillNetModel(nlu_config()).save_pretrained(tmp_path)
    other = nlu_config(skills=[{"name": n} for n in ("sequence", "token", "medical", "generic")],
                       tasks={"text_classification": ["sequence"]})
    with pytest.raises(ValueError,
                       match=r"checkpoint does not match the config: missing keys for skills \['medical'\]"):
        SkillNetModel.from_pretrained(tmp_path, config=other)
    with pytest.raises(ValueError, match="shapes differ"):
        SkillNetModel.from_pretrained(tmp_path, config=nlu_config(intermediate_size=48), ignore_mismatched_sizes=True)


def _tiny_bert(path, heads: bool):
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=40)
    bert = (BertForPreTraining if heads else BertModel)(config).eval()
    bert.save_pretrained(path)
    return bert


@pytest.mark.parametrize("skill_attention", [False, True])
@pytest.mark.parametrize("router", ["skill", "moe", "dense"])
def test_model_from_bert_matches_bert(tmp_path, router, skill_attention):
    bert = _tiny_bert(tmp_path, heads=False)
    model = from_bert(str(tmp_path), skill_set="nlu", router=router, skill_attention=skill_attention).eval()
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    ref = bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for task in ("reading_comprehension", "text_classification"):
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, task=task)
        keep = mask.bool()
        torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)
    skills = model.encoder.layers[1].ffn.skills if router == "skill" else None
    if skills is not None:
        torch.testing.assert_close(skills["finance"].fc1.weight, bert.encoder.layer[1].intermediate.dense.weight)


def test_pretraining_heads_come_from_bert(tmp_path):
    bert = _tiny_bert(tmp_path, heads=True)
    model = from_bert(str(tmp_path), SkillNetForPreTraining, skill_set="nlu").eval()
    ids = torch.randint(1, 99, (2, 9))
    ref = bert(input_ids=ids)
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.5, -100)
    labels[0, 0] = ids[0, 0]
    out = model(input_ids=ids, task="masked_lm", labels=labels)
    # the vocabulary logits are computed at the predicted positions only
    predicted = labels != -100
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits[predicted], rtol=1e-4, atol=1e-4)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_bert_sizes_cannot_be_overridden(tmp_path):
    _tiny_bert(tmp_path, heads=False)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] come from the BERT checkpoint"):
        from_bert(str(tmp_path), skill_set="nlu", hidden_size=64)


def test_new_skill_starts_as_the_generic_skill_and_keeps_old_tasks(tmp_path):
    model = SkillNetModel(nlu_config(skill_attention=True)).eval()
    ids = torch.randint(7, 128, (2, 8))
    before = model(input_ids=ids, task="text_classification").last_hidden_state
    model.add_skill("medical", "understand texts in the medical domain")
    model.add_task("medical_qa", ["sequence", "interaction", "question", "medical"])
    for layer in model.encoder.layers:
        torch.testing.assert_close(layer.ffn.skills["medical"].fc1.weight, layer.ffn.skills["generic"].fc1.weight)
        assert layer.ffn.skills["medical"].fc1.weight.data_ptr() != layer.ffn.skills["generic"].fc1.weight.data_ptr()
        torch.testing.assert_close(layer.attn.q.skills["medical"].weight, layer.attn.q.skills["generic"].weight)
    torch.testing.assert_close(model(input_ids=ids, task="text_classification").last_hidden_state, before)
    out = model(input_ids=ids, task="medical_qa").last_hidden_state
    assert out.shape == before.shape
    model.save_pretrained(tmp_path)
    reloaded = SkillNetModel.from_pretrained(tmp_path).eval()
    assert "medical" in reloaded.registry.names
    torch.testing.assert_close(reloaded(input_ids=ids, task="medical_qa").last_hidden_state, out)
    with pytest.raises(ValueError, match="skill 'medical' already exists"):
        model.add_skill("medical")
    with pytest.raises(ValueError, match="unknown skill 'legal'"):
        model.add_skill("tax", init_from="legal")
