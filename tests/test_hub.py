"""Exports carry their code and a model card (`skillnet.hub`): transformers alone loads them
(`trust_remote_code=True`) in a process that cannot import the project, and gives the package's outputs."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import nlu_config
from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

from skillnet import SkillNetForMultiTask, SkillNetForPreTraining, SkillNetModel, load_config
from skillnet.heads import HEADS
from skillnet.hub import flat_name, save_model_code, set_model_max_length, write_model_card
from skillnet.params import count_parameters

PROJECT = ("skillnet", "pretrain", "finetune", "training", "data_pipeline")
TASK_HEADS = {"sentiment_analysis": {"type": "classification", "labels": ["negative", "positive"]},
              "named_entity_recognition": {"type": "tagging", "labels": ["O", "B-LOC", "I-LOC"]}}
IDS = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
INPUTS = {"input_ids": IDS, "attention_mask": (IDS != 0).long(),
          "labels": torch.tensor([[-100, 10, -100, 12, -100, -100], [-100, -100, 21, -100, -100, -100]]),
          "word_mask": torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)}
POSITIONS = 32
SHIPPED = sorted(name for name, cls in HEADS.items() if cls.__module__.startswith("skillnet.heads."))

# Run in a fresh interpreter, outside the repository, with every project package unimportable (the project is
# installed editable, so leaving the repository is not enough).
REMOTE = textwrap.dedent("""
    import importlib.abc
    import json
    import sys

    HIDDEN = {hidden!r}

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ImportError(f"{{name}} is hidden from this process")

    sys.meta_path.insert(0, Hide())
    try:
        import skillnet  # noqa: F401
        sys.exit("skillnet is importable")
    except ImportError:
        pass

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    pretrained, multitask, inputs, out = sys.argv[1:]
    x = torch.load(inputs)
    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=True)
    model = AutoModelForPreTraining.from_pretrained(pretrained, trust_remote_code=True).eval()
    encoder = AutoModel.from_pretrained(pretrained, trust_remote_code=True).eval()
    tasks = get_class_from_dynamic_module("modeling_skillnet.SkillNetForMultiTask", multitask)
    tasks = tasks.from_pretrained(multitask).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=True)
    text = {{k: x[k] for k in ("input_ids", "attention_mask")}}
    with torch.no_grad():
        pre = model(**text, labels=x["labels"], task="masked_lm")
        outputs = {{"prediction_logits": pre.prediction_logits, "seq_relationship_logits": pre.seq_relationship_logits,
                   "embeddings": pre.embeddings, "encoder": encoder(**text, task="masked_lm").last_hidden_state,
                   "classification": tasks(**text, task="sentiment_analysis").logits,
                   "tagging": tasks(**text, word_mask=x["word_mask"], task="named_entity_recognition").logits[0]}}
    torch.save(outputs, out + ".pt")
    heads = sys.modules[type(tasks).__module__.rpartition(".")[0] + ".heads"]
    json.dump({{"classes": [type(m).__module__ + "." + type(m).__name__ for m in (config, model, encoder, tasks)],
               "heads": sorted(heads.HEADS), "project": sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN),
               "max_length": tokenizer.model_max_length,
               "truncated": len(tokenizer("a red circle " * 50, truncation=True)["input_ids"])}},
              open(out + ".json", "w"))
""").format(hidden=set(PROJECT))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """A pretraining model with a tokenizer and a multi-task model (classification and tagging heads), each
    saved and given its code and card as the exporters do."""
    root = tmp_path_factory.mktemp("hub")
    pretrained, multitask = root / "pretrained", root / "multitask"
    config = load_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=POSITIONS)
    SkillNetForPreTraining(config).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    set_model_max_length(pretrained, config.max_position_embeddings)
    SkillNetForMultiTask(nlu_config(task_heads=TASK_HEADS)).save_pretrained(multitask)
    for folder in (pretrained, multitask):
        save_model_code(folder)
    write_model_card(pretrained, "train:\n  steps: 2\n", {"masked_lm": ["text/text.index.json"]},
                     {"masked_lm": {"step": 2, "loss": 6.25}}, "The last training loss.")
    write_model_card(multitask)
    return pretrained, multitask


def _reference(pretrained, multitask) -> dict:
    model = SkillNetForPreTraining.from_pretrained(pretrained).eval()
    encoder = SkillNetModel.from_pretrained(pretrained).eval()
    tasks = SkillNetForMultiTask.from_pretrained(multitask).eval()
    text = {k: INPUTS[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        pre = model(**text, labels=INPUTS["labels"], task="masked_lm")
        return {"prediction_logits": pre.prediction_logits, "seq_relationship_logits": pre.seq_relationship_logits,
                "embeddings": pre.embeddings, "encoder": encoder(**text, task="masked_lm").last_hidden_state,
                "classification": tasks(**text, task="sentiment_analysis").logits,
                "tagging": tasks(**text, word_mask=INPUTS["word_mask"], task="named_entity_recognition").logits[0]}


def test_an_export_loads_with_transformers_alone_and_gives_the_package_outputs(exports, tmp_path):
    pretrained, multitask = exports
    torch.save(INPUTS, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", REMOTE, str(pretrained), str(multitask), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["project"] == [] and all(c.startswith("transformers_modules.") for c in meta["classes"])
    assert [c.rpartition(".")[2] for c in meta["classes"]] == ["SkillNetConfig", "SkillNetForPreTraining",
                                                                "SkillNetModel", "SkillNetForMultiTask"]
    assert meta["heads"] == SHIPPED
    assert meta["max_length"] == meta["truncated"] == POSITIONS
    remote, reference = torch.load(tmp_path / "out.pt"), _reference(pretrained, multitask)
    assert set(remote) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(remote[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_with_the_package_imported_the_auto_classes_load_with_and_without_remote_code(exports):
    """transformers prefers a registered class to a folder's code: both give the package's."""
    pretrained, _ = exports
    trusted = AutoModel.from_pretrained(pretrained, trust_remote_code=True).eval()
    local = AutoModel.from_pretrained(pretrained).eval()
    assert type(trusted) is type(local) is SkillNetModel
    assert type(AutoModelForPreTraining.from_pretrained(pretrained)) is SkillNetForPreTraining
    with torch.no_grad():
        for model in (trusted, local):
            out = model(input_ids=IDS, attention_mask=INPUTS["attention_mask"], task="masked_lm").last_hidden_state
            torch.testing.assert_close(out, _reference(*exports)["encoder"], rtol=1e-6, atol=1e-6)


def test_the_flat_code_imports_nothing_of_the_project_and_its_heads_module_every_head_type(exports):
    pretrained, _ = exports
    files = sorted(pretrained.glob("*.py"))
    flat = {f.stem for f in files}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in flat, (file.name, ast.unparse(node))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not {n.split(".")[0] for n in names} & set(PROJECT), (file.name, ast.unparse(node))
    heads = [n for n in ast.parse((pretrained / "heads.py").read_text()).body if isinstance(n, ast.ImportFrom)]
    assert {flat_name(HEADS[name].__module__) for name in SHIPPED} <= {n.module for n in heads}
    reexported = {a.name for n in heads if n.module == "heads_base" for a in n.names}
    assert reexported == {"HEADS", "Head", "check_head", "head_for", "head_type"}
    auto_map = json.loads((pretrained / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_skillnet.SkillNetConfig"
    assert auto_map["AutoModelForPreTraining"] == "modeling_skillnet.SkillNetForPreTraining"
    assert {"AutoModel", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM"} <= set(auto_map)
    assert all(f"{ref.partition('.')[0]}.py" in {f.name for f in files} for ref in auto_map.values())


def test_the_model_card_lists_the_skills_tasks_and_parameter_counts(exports):
    for folder, cls in zip(exports, (SkillNetForPreTraining, SkillNetForMultiTask)):
        _, front, body = (folder / "README.md").read_text().split("---\n", 2)
        model = cls.from_pretrained(folder)
        config, counts = model.config, count_parameters(model)
        front = yaml.safe_load(front)
        assert front["library_name"] == "transformers" and front["tags"][0] == "skillnet"
        assert front.get("pipeline_tag") == ("fill-mask" if cls is SkillNetForPreTraining else None)
        assert f"**Total parameters: {counts.total:,}**" in body
        skills, tasks = _rows(body, "Skills"), _rows(body, "Tasks")
        for skill in config.skills:
            name = skill["name"]
            assert skills[name] == f"| {name} | {skill['description']} | {counts.per_skill[name]:,} |"
        assert set(tasks) == set(config.tasks)
        for task in config.tasks:
            assert tasks[task].endswith(f" | {counts.per_task[task]:,} |"), tasks[task]
        for task, spec in config.task_heads.items():
            assert f" | {spec['type']} | " in tasks[task]
    pretrained, multitask = exports
    card = (pretrained / "README.md").read_text()
    assert "```yaml\ntrain:\n  steps: 2\n```" in card and "| masked_lm | text/text.index.json |" in card
    assert "| masked_lm | 2 | 6.25 |" in card
    assert "AutoModelForPreTraining.from_pretrained(" in card and "trust_remote_code=True" in card
    assert ('get_class_from_dynamic_module("modeling_skillnet.SkillNetForMultiTask"'
            in (multitask / "README.md").read_text())


def _rows(card: str, section: str) -> dict[str, str]:
    """The rows of the table in a section of the card (not its header), by their first cell."""
    text = card.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in text.splitlines() if line.startswith("|")][2:]
    return {line.split(" | ")[0][2:]: line for line in table}


def test_the_exported_tokenizer_truncates_to_the_model_positions(exports):
    tokenizer = AutoTokenizer.from_pretrained(exports[0])
    assert tokenizer.model_max_length == POSITIONS
    assert len(tokenizer("a red circle " * 50, truncation=True)["input_ids"]) == POSITIONS
