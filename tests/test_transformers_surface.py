"""SkillNet's models tested the way a model contributed to transformers is: a model tester with a tiny config,
then the common checks (save/load, outputs as tuples, hidden states, attentions, attention implementations,
embedding resizing, gradient checkpointing, compile and export) over every model class, and the ecosystem
on top: pipelines, warm starts from another class's checkpoint, PEFT adapters and accelerate's offloading."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, pipeline

from skillnet import (
    SkillNetConfig,
    SkillNetForConditionalGeneration,
    SkillNetForMaskedLM,
    SkillNetForMultiTask,
    SkillNetForPreTraining,
    SkillNetModel,
)


class SkillNetModelTester:
    """Tiny configs and inputs for every model class: the NLU skills with skill-specific attention, two
    encoder and two decoder layers, a classification and a generation head."""

    batch, length, vocab = 3, 7, 99
    layers, decoder_layers, heads = 2, 2, 4

    def config(self, **overrides) -> SkillNetConfig:
        return SkillNetConfig(**{**dict(
            skill_set="nlu", tasks={"paraphrase": ["sequence"]}, vocab_size=self.vocab, hidden_size=32,
            num_hidden_layers=self.layers, num_decoder_layers=self.decoder_layers,
            num_attention_heads=self.heads, intermediate_size=48, max_position_embeddings=40,
            skill_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            task_heads={"sentiment_analysis": {"type": "classification", "labels": ["neg", "pos"]},
                        "paraphrase": {"type": "generation"}}), **overrides})

    def inputs(self, model_class, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(7, self.vocab, (self.batch, self.length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # one padded sample
        inputs = {"input_ids": ids, "attention_mask": mask}
        if model_class is SkillNetForConditionalGeneration:
            inputs["decoder_input_ids"] = torch.randint(7, self.vocab, (self.batch, 5), generator=g)
        if model_class is SkillNetForMultiTask:
            inputs["task"] = "sentiment_analysis"
        return inputs

    @staticmethod
    def main_output(model_class, out) -> torch.Tensor:
        name = {SkillNetModel: "last_hidden_state",
                SkillNetForPreTraining: "last_hidden_state"}.get(model_class, "logits")
        return out[name]


tester = SkillNetModelTester()
ALL = [SkillNetModel, SkillNetForPreTraining, SkillNetForMaskedLM, SkillNetForConditionalGeneration,
       SkillNetForMultiTask]
ENCODERS = [SkillNetModel, SkillNetForPreTraining, SkillNetForMaskedLM]


def _model(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(tester.config(**overrides)).eval()


@pytest.mark.parametrize("model_class", ALL)
def test_save_load_and_tuples(model_class, tmp_path):
    model = _model(model_class)
    inputs = tester.inputs(model_class)
    expected = tester.main_output(model_class, model(**inputs))
    model.save_pretrained(tmp_path)
    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(tester.main_output(model_class, loaded.eval()(**inputs)), expected)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and any(t is not None and torch.equal(t, expected)
                                               for t in as_tuple if isinstance(t, torch.Tensor))
    model.config.return_dict = False
    assert isinstance(model(**inputs), tuple)


@pytest.mark.parametrize("model_class", ALL)
def test_input_ids_come_first(model_class):
    model, inputs = _model(model_class), tester.inputs(model_class)
    ids = inputs.pop("input_ids")
    torch.testing.assert_close(tester.main_output(model_class, model(ids, **inputs)),
                               tester.main_output(model_class, model(input_ids=ids, **inputs)))


@pytest.mark.parametrize("model_class", [*ENCODERS, SkillNetForConditionalGeneration])
@pytest.mark.parametrize("from_config", [False, True])
def test_hidden_states_and_attentions(model_class, from_config):
    model, inputs = _model(model_class), tester.inputs(model_class)
    if from_config:
        model.set_attn_implementation("eager")  # transformers keeps SDPA models from returning weights by default
        model.config.output_hidden_states = model.config.output_attentions = True
        out = model(**inputs)
    else:
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    prefix = "encoder_" if model_class is SkillNetForConditionalGeneration else ""
    hidden, attentions = out[f"{prefix}hidden_states"], out[f"{prefix}attentions"]
    assert len(hidden) == tester.layers + 1 and hidden[0].shape == (tester.batch, tester.length, 32)
    assert len(attentions) == tester.layers
    for weights in attentions:
        assert weights.shape == (tester.batch, tester.heads, tester.length, tester.length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights[1, :, :, -2:].abs().max() == 0  # padded keys get no weight
    if model_class is SkillNetForConditionalGeneration:
        n = inputs["decoder_input_ids"].shape[1]
        assert len(out.decoder_hidden_states) == tester.decoder_layers + 1
        assert [w.shape for w in out.decoder_attentions] == [(tester.batch, tester.heads, n, n)] * tester.decoder_layers
        assert out.decoder_attentions[0][:, :, 0, 1:].abs().max() == 0  # causal
        assert [w.shape for w in out.cross_attentions] == [(tester.batch, tester.heads, n, tester.length)] * 2
    without = model(**inputs, output_hidden_states=False, output_attentions=False)
    assert getattr(without, f"{prefix}hidden_states") is None and getattr(without, f"{prefix}attentions") is None


@pytest.mark.parametrize("model_class", ALL)
def test_eager_and_sdpa_attention_agree(model_class, tmp_path):
    assert model_class._supports_sdpa
    _model(model_class).save_pretrained(tmp_path)
    inputs = tester.inputs(model_class)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = model_class.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        outputs[implementation] = tester.main_output(model_class, model(**inputs))
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_class", [SkillNetForPreTraining, SkillNetForMaskedLM, SkillNetForConditionalGeneration,
                                         SkillNetForMultiTask])
def test_resize_token_embeddings(model_class):
    model = _model(model_class)
    for size in (tester.vocab + 13, tester.vocab - 9):
        model.resize_token_embeddings(size)
        assert model.config.vocab_size == size
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        assert inputs.weight.shape[0] == outputs.weight.shape[0] == outputs.bias.shape[0] == size
        assert outputs.weight.data_ptr() == inputs.weight.data_ptr()  # still tied
        batch = tester.inputs(model_class)
        batch["input_ids"] = batch["input_ids"] % size
        if model_class is SkillNetForMultiTask:
            batch["task"] = "paraphrase"
            batch["labels"] = batch["input_ids"]
        out = tester.main_output(model_class, model(**batch))
        if model_class is not SkillNetForPreTraining:
            assert out.shape[-1] == size


@pytest.mark.parametrize("model_class", ALL)
def test_gradient_checkpointing_gives_the_same_gradients(model_class):
    model = _model(model_class).train()
    inputs = tester.inputs(model_class)

    def gradients():
        model.zero_grad()
        tester.main_output(model_class, model(**inputs)).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_class", [SkillNetModel, SkillNetForMaskedLM])
def test_compile_fullgraph_and_export(model_class):
    model = _model(model_class)
    inputs = tester.inputs(model_class)
    expected = tester.main_output(model_class, model(**inputs))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(tester.main_output(model_class, compiled(**inputs)), expected)
    exported = torch.export.export(model, (inputs["input_ids"],), {"attention_mask": inputs["attention_mask"]})
    got = exported.module()(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(tester.main_output(model_class, got), expected)


def test_config_without_arguments_and_by_model_type():
    config = SkillNetConfig()
    assert config.skill_set == "nlu" and config.default_task == "masked_lm" and len(config.skills) == 7
    assert isinstance(AutoConfig.for_model("skillnet"), SkillNetConfig)
    again = SkillNetConfig.from_dict(tester.config().to_dict())
    assert again.skills == tester.config().skills and again.task_heads == tester.config().task_heads
    assert SkillNetConfig(router="dense").skills == []  # a baseline names no skills


def test_multitask_generation_is_the_encoder_decoders():
    """A generation head of the multi-task model generates through `GenerationMixin` exactly as the
    encoder-decoder holding the same weights, greedy and with beams."""
    multitask = _model(SkillNetForMultiTask)
    seq2seq = SkillNetForConditionalGeneration(tester.config()).eval()
    missing, _ = seq2seq.load_state_dict(multitask.state_dict(), strict=False)
    assert not missing
    ids = tester.inputs(SkillNetModel)["input_ids"]
    for beams in (1, 2):
        ours = multitask.generate(ids, task="paraphrase", max_new_tokens=6, num_beams=beams)
        torch.testing.assert_close(ours, seq2seq.generate(ids, task="paraphrase", max_new_tokens=6, num_beams=beams))
        assert ours.shape[0] == tester.batch and ours.shape[1] > 1


def test_a_decoder_warm_starts_from_an_encoder_checkpoint(tmp_path):
    """Weights the checkpoint lacks are initialised and listed; skills that disagree are still refused."""
    encoder = _model(SkillNetForPreTraining, num_decoder_layers=0, task_heads={})
    encoder.save_pretrained(tmp_path)
    model, info = SkillNetForConditionalGeneration.from_pretrained(
        tmp_path, num_decoder_layers=2, decoder_start_token_id=1, output_loading_info=True)
    assert any(k.startswith("decoder.layers.1.ffn.skills.") for k in info["missing_keys"])
    assert not any(k.startswith("skillnet.") for k in info["missing_keys"])
    torch.testing.assert_close(model.skillnet.encoder.layers[1].ffn.skills["token"].fc1.weight,
                               encoder.skillnet.encoder.layers[1].ffn.skills["token"].fc1.weight)
    assert model.decoder.layers[0].ffn.skills["token"].fc1.weight.std() > 0  # initialised, not left empty
    assert model.generate(tester.inputs(SkillNetModel)["input_ids"], task="paraphrase", max_new_tokens=3).shape[1] > 1
    fewer = tester.config(num_decoder_layers=0, skills=[{"name": n} for n in ("sequence", "token", "generic")],
                          tasks={"paraphrase": ["sequence"]}, task_heads={})
    with pytest.raises(ValueError, match=r"missing keys for skills|unexpected keys for skills"):
        SkillNetForPreTraining.from_pretrained(tmp_path, config=fewer)


@pytest.fixture(scope="module")
def text_model_folder(tmp_path_factory):
    """A pretraining checkpoint with a tokenizer trained on the fly, as an export holds them."""
    from skillnet.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("export")
    words = "the cat sat on a mat while dogs ran in parks and birds sang over old trees".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    tokenizer = train_tokenizer(texts, 160, folder)
    tokenizer.model_max_length = 40
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    SkillNetForPreTraining(tester.config(vocab_size=len(tokenizer), num_decoder_layers=0,
                                         task_heads={})).save_pretrained(folder)
    return folder, tokenizer


def test_fill_mask_and_feature_extraction_pipelines(text_model_folder):
    folder, tokenizer = text_model_folder
    fill = pipeline("fill-mask", model=str(folder), top_k=3)
    assert isinstance(fill.model, SkillNetForMaskedLM)
    text = "the cat [MASK] on a mat"
    answers = fill(text)
    encoded = tokenizer(text, return_tensors="pt")
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    position = int((encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])
    probabilities = model(**encoded).logits[0, position].softmax(-1)
    top = probabilities.topk(3)
    assert [a["token"] for a in answers] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([a["score"] for a in answers]), top.values.detach())

    features = pipeline("feature-extraction", model=str(folder))
    assert isinstance(features.model, SkillNetModel)
    got = torch.tensor(features("the cat sat"))
    base = AutoModel.from_pretrained(folder).eval()
    torch.testing.assert_close(got, base(**tokenizer("the cat sat", return_tensors="pt")).last_hidden_state.detach())
    long = tokenizer(" ".join(["cat"] * 100), truncation=True, return_tensors="pt")
    assert long["input_ids"].shape[1] == 40 and base(**long).last_hidden_state.shape[1] == 40


@pytest.mark.parametrize("model_class", ALL)
def test_lora_on_skill_ffns_and_projections_trains_saves_and_reloads(model_class, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    inputs = tester.inputs(model_class)
    base = _model(model_class)
    before = tester.main_output(model_class, base(**inputs)).detach()
    targets = r".*\.ffn\.skills\.\w+\.fc[12]|.*attn\.[qkvo]\.skills\.\w+"
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    out = tester.main_output(model_class, lora(**inputs))
    assert not torch.allclose(out, before)
    out.float().pow(2).mean().backward()
    adapters = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    active = {"generic", "sequence", "sentiment"} if model_class is SkillNetForMultiTask else {"generic", "token"}
    for name, p in adapters.items():
        skill = name.split(".skills.")[1].split(".")[0]
        # a classifier, masked-token prediction: the decoder has no part in them
        used = skill in active and not (model_class in (SkillNetForMultiTask, SkillNetForPreTraining)
                                        and ".decoder." in name)
        assert (p.grad is not None and p.grad.abs().sum() > 0) == used, name
    lora.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_model(model_class), tmp_path).eval()
    torch.testing.assert_close(tester.main_output(model_class, reloaded(**inputs)), out.detach())


@pytest.mark.parametrize("model_class", [SkillNetModel, SkillNetForPreTraining, SkillNetForConditionalGeneration])
def test_device_map_with_cpu_and_disk_offload(model_class, tmp_path):
    """`device_map="auto"` with too little CPU memory for the model: accelerate keeps the layers on disk and
    loads each on its call (the skill layer calls its modules, so the hooks see them); the outputs are the
    model's in memory."""
    model = _model(model_class)
    inputs = tester.inputs(model_class)
    expected = tester.main_output(model_class, model(**inputs))
    model.save_pretrained(tmp_path / "model")
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) * 6 // 10
    offloaded = model_class.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": budget},
                                            offload_folder=tmp_path / "offload").eval()
    placed = offloaded.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    torch.testing.assert_close(tester.main_output(model_class, offloaded(**inputs)), expected)
