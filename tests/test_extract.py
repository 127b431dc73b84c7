"""Per-task extraction (`model.extract`, `python -m pretrain.export --tasks`, `python -m finetune.export`): the
extracted model holds only what its tasks run, gives the full model's outputs for them bit for bit, is
as large as the activated-parameter accounting says, loads and exports like any model, and bad input is
refused in one line before anything is written."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import nlu_config
from test_transformers_surface import SkillNetModelTester
from transformers import AutoModel, pipeline

from skillnet import (
    SkillNetConfig,
    SkillNetForConditionalGeneration,
    SkillNetForMaskedLM,
    SkillNetForMultiTask,
    SkillNetForPreTraining,
    SkillNetModel,
    load_config,
)
from skillnet.hub import save_model_code
from skillnet.params import activated_parameters

tester = SkillNetModelTester()
HIDE = textwrap.dedent("""
    import importlib.abc
    import sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("skillnet", "pretrain", "finetune", "training", "data_pipeline"):
                raise ImportError(f"{name} is hidden from this process")

    sys.meta_path.insert(0, Hide())
""")
ROOT = Path(__file__).resolve().parents[1]


def _model(cls, **overrides):
    torch.manual_seed(0)
    return cls(tester.config(**overrides)).eval()


def _main(model, task: str, inputs: dict):
    """The output a class's callers read, for one task."""
    return model(**inputs, task=task).to_tuple()[0]


@pytest.mark.parametrize("cls", [SkillNetModel, SkillNetForMaskedLM, SkillNetForPreTraining, SkillNetForMultiTask])
def test_extracted_model_gives_the_full_models_outputs_and_holds_only_its_skills(cls):
    full = _model(cls)
    inputs = tester.inputs(SkillNetModel)
    extracted = full.extract(["sentiment_analysis"])
    assert type(extracted) is cls and not extracted.training
    assert [s["name"] for s in extracted.config.skills] == ["sequence", "sentiment", "generic"]
    assert extracted.config.tasks == {"sentiment_analysis": ["sequence", "sentiment"]}
    assert extracted.config.extracted_tasks == ["sentiment_analysis"]
    names = {n for n, _ in extracted.named_parameters()}
    assert not [n for n in names if ".skills.token." in n or ".skills.finance." in n]
    assert names <= {n for n, _ in full.named_parameters()}
    assert torch.equal(_main(extracted, "sentiment_analysis", inputs), _main(full, "sentiment_analysis", inputs))
    if cls in (SkillNetForMaskedLM, SkillNetForPreTraining):  # the vocabulary projection stays tied
        assert extracted.mlm_output.weight is extracted.get_input_embeddings().weight
    with pytest.raises(ValueError, match=r"the model holds tasks \['sentiment_analysis'\]|tasks with heads: "
                                         r"\['sentiment_analysis'\]"):
        extracted(**inputs, task="named_entity_recognition")


def test_extracted_encoder_decoder_generates_as_the_full_one():
    full = _model(SkillNetForConditionalGeneration)
    extracted = full.extract(["paraphrase"])
    assert [s["name"] for s in extracted.config.skills] == ["sequence", "generic"]
    ids = tester.inputs(SkillNetModel)["input_ids"]
    for beams in (1, 2):
        kwargs = {"task": "paraphrase", "max_new_tokens": 5, "num_beams": beams, "do_sample": False}
        assert torch.equal(extracted.generate(ids, **kwargs), full.generate(ids, **kwargs))


def test_sizes_are_the_activated_parameters_of_the_nlu_table():
    """SkillNet-NLU base (its Tables 4 and 5): a task with 2 skills activates 158.9M parameters, with 3 215.6M,
    with 4 272.3M; the extracted model, built on the meta device, holds exactly those."""
    with torch.device("meta"):
        full = SkillNetModel(load_config("skillnet-nlu-base"))
    for task, millions in (("text_classification", 158.9), ("named_entity_recognition", 158.9),
                           ("sentiment_analysis", 215.6), ("semantic_similarity", 272.3),
                           ("reading_comprehension", 272.3)):
        extracted = full.extract([task])
        size = sum(p.numel() for p in extracted.parameters())
        assert size == activated_parameters(full, set(full.registry.skill_names(task)))
        assert round(size / 1e6, 1) == millions, task
    both = full.extract(["sentiment_analysis", "named_entity_recognition"])  # the union of the two routes
    assert [s["name"] for s in both.config.skills] == ["sequence", "token", "sentiment", "generic"]


def test_other_modalities_and_the_task_routers_rows_go_with_their_tasks():
    """A media task keeps its front-end and its modality's row of the modality-type embedding; the other
    front-ends go. The task-level router's embedding keeps the rows of the kept tasks."""
    config = load_config("tiny")
    torch.manual_seed(0)
    full = SkillNetModel(config).eval()
    extracted = full.extract(["image"])
    assert extracted.config.modalities == ["text", "image"] and set(extracted.frontends) == {"text", "image"}
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    assert torch.equal(extracted(pixel_values=pixels, task="image").last_hidden_state,
                       full(pixel_values=pixels, task="image").last_hidden_state)
    # the text front-end stays (the vocabulary projections are tied to it) beside the image's, and its row
    assert sum(p.numel() for p in extracted.parameters()) == activated_parameters(
        full, set(full.registry.skill_names("image")), "image") + sum(
        p.numel() for p in full.frontends["text"].parameters()) + config.hidden_size
    routed = SkillNetModel(nlu_config(router="task_router", num_experts=3)).eval()
    ids = torch.randint(7, 128, (2, 6))
    small = routed.extract(["next_sentence"])
    assert small.task_embedding.weight.shape[0] == 1
    assert torch.equal(small(input_ids=ids, task="next_sentence").last_hidden_state,
                       routed(input_ids=ids, task="next_sentence").last_hidden_state)


def test_bad_task_lists_are_refused_in_one_line():
    full = _model(SkillNetModel)
    with pytest.raises(ValueError, match="name at least one task"):
        full.extract([])
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]; the model holds tasks \[.*'sentiment_analysis'"):
        full.extract(["sentiment_analysis", "nope"])


def test_saved_extraction_loads_with_and_without_the_package_and_in_a_pipeline(tmp_path):
    """Saved with its code, the extracted masked-LM loads through transformers alone (`trust_remote_code`) and
    through the package, and the fill-mask pipeline gives the full model's scores."""
    from skillnet.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, 280, tmp_path / "tok")
    full = _model(SkillNetForMaskedLM, default_task="masked_lm", vocab_size=len(tokenizer))
    extracted = full.extract(["masked_lm"])
    folder = tmp_path / "extracted"
    extracted.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_model_code(folder)
    inputs = tester.inputs(SkillNetModel)
    expected = full(**inputs).logits
    assert torch.equal(SkillNetForMaskedLM.from_pretrained(folder).eval()(**inputs).logits, expected)
    assert AutoModel.from_pretrained(folder, trust_remote_code=True).config.extracted_tasks == ["masked_lm"]
    # without the package: the folder's own code (the project's modules hidden from the process)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = HIDE + textwrap.dedent("""
        import torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        torch.save(model(**torch.load(sys.argv[2])).logits, sys.argv[3])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    text = f"the cat {tokenizer.mask_token} on the mat"
    fill = pipeline("fill-mask", model=extracted, tokenizer=tokenizer)(text, top_k=3)
    assert fill == pipeline("fill-mask", model=full, tokenizer=tokenizer)(text, top_k=3)


def test_extracted_model_exports_with_dynamic_batch_and_length():
    """One task's route is fixed, so `torch.export` traces the extracted model with symbolic batch and
    sequence sizes, and the program's outputs equal the model's at other sizes than the traced ones."""
    extracted = _model(SkillNetModel).extract(["named_entity_recognition"])
    ids = torch.randint(7, tester.vocab, (3, 7))
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=40)
    program = torch.export.export(extracted, (ids,), {"attention_mask": torch.ones_like(ids)},
                                  dynamic_shapes={"input_ids": {0: batch, 1: length},
                                                  "attention_mask": {0: batch, 1: length}})
    for shape in ((1, 5), (5, 12)):
        other = torch.randint(7, tester.vocab, shape)
        mask = torch.ones_like(other)
        mask[0, -2:] = 0
        got = program.module()(other, attention_mask=mask).last_hidden_state
        assert torch.equal(got, extracted(input_ids=other, attention_mask=mask).last_hidden_state)


def test_finetune_export_streams_the_tasks_and_refuses_bad_input(tmp_path, capsys):
    """`python -m finetune.export` on a saved multi-task model: the folder holds the kept tasks' heads and
    skills and predicts as the full model; unknown tasks, an empty list, a task whose skill the weights lack
    and a non-empty output folder are refused in one line, nothing written."""
    from safetensors.torch import load_file, save_file

    from finetune.export import main as export_main
    from skillnet.tokenizer import train_tokenizer

    full = _model(SkillNetForMultiTask, num_decoder_layers=0,
                  task_heads={"sentiment_analysis": {"type": "classification", "labels": ["neg", "pos"]},
                              "named_entity_recognition": {"type": "tagging", "labels": ["O", "B-X", "I-X"]}})
    folder = tmp_path / "finetuned"
    full.save_pretrained(folder)
    train_tokenizer(["some words to learn"] * 5, 60, folder)
    (folder / "task_data.json").write_text(json.dumps({"sentiment_analysis": {"text": "t"},
                                                       "named_entity_recognition": {"tokens": "w"}}))
    out = tmp_path / "sentiment"
    assert export_main([str(folder), str(out), "--tasks", "sentiment_analysis"]) == 0
    extracted = SkillNetForMultiTask.from_pretrained(out).eval()
    inputs = tester.inputs(SkillNetModel)
    assert torch.equal(extracted(**inputs, task="sentiment_analysis").logits,
                       full(**inputs, task="sentiment_analysis").logits)
    assert set(extracted.config.task_heads) == {"sentiment_analysis"} and "heads.named_entity_recognition" not in str(
        load_file(out / "model.safetensors").keys())
    assert json.loads((out / "task_data.json").read_text()) == {"sentiment_analysis": {"text": "t"}}
    card = (out / "README.md").read_text()
    assert "Extracted for `sentiment_analysis`" in card and "| sentiment |" in card and "| token |" not in card
    assert (out / "tokenizer.json").exists() and (out / "modeling_skillnet.py").exists()

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if ".skills.sentiment." not in k}
    save_file(weights, lacking / "model.safetensors")
    (lacking / "config.json").write_text((folder / "config.json").read_text())
    capsys.readouterr()
    for args, message in (([str(folder), str(tmp_path / "a"), "--tasks", "nope"], "unknown tasks ['nope']"),
                          ([str(folder), str(tmp_path / "b"), "--tasks", ","], "name at least one task"),
                          ([str(lacking), str(tmp_path / "c"), "--tasks", "sentiment_analysis"],
                           "lacks skills ['sentiment'] that the tasks run"),
                          ([str(folder), str(out), "--tasks", "sentiment_analysis"], "exists and is not empty")):
        assert export_main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.slow
def test_pretrain_export_of_tasks_from_a_zero3_checkpoint(tmp_path):
    """A two-step ZeRO-3 run of the tiny model, exported whole and for `masked_lm` only: the extraction holds
    the full export's tensors for the kept skills (the modality-type rows of its modalities), its file is
    smaller, and it predicts masked tokens as the full export does."""
    from conftest import free_port

    from pretrain.export import main as export_main
    from pretrain.prepare_sample import main as prepare_sample

    sample, run = tmp_path / "sample", tmp_path / "run"
    assert prepare_sample(["--out", str(sample), "--vocab-size", "512"]) == 0
    args = [f"data_root={sample}", f"run_dir={run}", "train.steps=2", "checkpoint.every=2",
            "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"]
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", "tiny", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    assert export_main([str(run), str(tmp_path / "full")]) == 0
    assert export_main([str(run), str(tmp_path / "mlm"), "--tasks", "masked_lm"]) == 0
    full = SkillNetForMaskedLM.from_pretrained(tmp_path / "full").eval()
    mlm = SkillNetForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert mlm.config.modalities == ["text"] and [s["name"] for s in mlm.config.skills] == ["text", "generic"]
    whole, kept = full.state_dict(), mlm.state_dict()
    for name, tensor in kept.items():
        expected = whole[name][:1] if name.endswith("modality_embeddings.weight") else whole[name]
        assert torch.equal(tensor, expected), name
    assert (tmp_path / "mlm" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "full" /
                                                                           "model.safetensors").stat().st_size
    assert sum(p.numel() for n, p in mlm.named_parameters() if not n.startswith("mlm_")) == activated_parameters(
        full, {"text", "generic"})  # as accounted: the masked_lm route's skills, the text front-end and its row
    ids = torch.randint(7, 500, (2, 9))
    assert torch.equal(mlm(input_ids=ids, task="masked_lm").logits, full(input_ids=ids, task="masked_lm").logits)
    assert SkillNetConfig.from_pretrained(tmp_path / "mlm").extracted_tasks == ["masked_lm"]
