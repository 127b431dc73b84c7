"""Head types are classes in a registry: every shipped type has all its parts and runs end to end (examples,
forward, loss, predictions, gold answers, metric), and a new type defined in a file of its own finetunes and
predicts through `python -m finetune` without any other file knowing of it."""

import importlib.util
import json
import pkgutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, write_rows

import skillnet.heads
from finetune.data import DataFiles, collate
from finetune.predict import gold, predict, score
from finetune.predict import main as predict_main
from finetune.train import main
from skillnet import SkillNetForMultiTask, SkillNetForPreTraining, load_config
from skillnet.heads import HEADS, Head, check_head, head_type
from skillnet.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

AUDIO = torch.randn(16, 64)
# per shipped head type: its spec, and three rows as its data file holds them (or shard samples as decoded)
CASES = {
    "classification": ({"labels": ["neg", "pos"]}, [{"text": "a red circle", "label": "pos"},
                                                    {"text": "a blue square", "label": "neg"},
                                                    {"text": "a green tone", "label": "pos"}]),
    "pair_classification": ({"labels": ["no", "yes"]},
                            [{"text": "a red circle", "text_pair": "a red square", "label": "yes"},
                             {"text": "a tone", "text_pair": "a chord", "label": "no"},
                             {"text": "left", "text_pair": "right", "label": "no"}]),
    "tagging": ({"labels": ["O", "B-C", "I-C"]}, [{"tokens": ["a", "red", "circle"], "tags": ["O", "B-C", "I-C"]},
                                                  {"tokens": ["blue", "square"], "tags": ["B-C", "O"]},
                                                  {"tokens": ["the", "tone"], "tags": ["O", "O"]}]),
    "span": ({}, [{"question": "which colour", "context": "a red circle",
                   "answers": {"text": ["red"], "answer_start": [2]}},
                  {"question": "which shape", "context": "a blue square",
                   "answers": {"text": ["square"], "answer_start": [7]}},
                  {"question": "what", "context": "a low tone",
                   "answers": {"text": ["low tone"], "answer_start": [2]}}]),
    "generation": ({}, [{"text": "a red circle", "target": "red"}, {"text": "a blue square", "target": "blue"},
                        {"text": "a low tone", "target": "low"}]),
    "instruction": ({"template": 'is the sentiment of text " [TEXT:text] " positive or negative? -> '
                                 '[TEXT:label, closed: positive|negative]'},
                    [{"text": "a red circle", "label": "positive"}, {"text": "a blue square", "label": "negative"},
                     {"text": "a low tone", "label": "positive"}]),
    "ctc": ({"labels": list("abc")}, [{"key": f"k{i}", "caption": c, "input_features": AUDIO[:, : 32 + 8 * i]}
                                      for i, c in enumerate(["ab", "cab", "c"])]),
    "retrieval": ({"candidate_modality": "image"},
                  [{"key": f"k{i}", "caption": c, "pixel_values": torch.randn(3, 32, 32)}
                   for i, c in enumerate(["a red circle", "a blue square", "a tone"])]),
}


def test_the_registry_holds_one_class_per_type_from_every_module_of_the_package():
    modules = ({f"skillnet.heads.{m.name}" for m in pkgutil.iter_modules(skillnet.heads.__path__)}
               - {"skillnet.heads.base"})
    shipped = {name: cls for name, cls in HEADS.items() if cls.__module__.startswith("skillnet.heads.")}
    assert set(shipped) == set(CASES)
    assert {cls.__module__ for cls in shipped.values()} == modules  # each module is discovered and registers
    for name, cls in shipped.items():
        assert cls.name == name and issubclass(cls, Head) and not cls.__abstractmethods__, name
        assert isinstance(cls.main_metric, str) and isinstance(cls.targets, tuple)
        assert cls.predict is not Head.predict or cls.decode is not Head.decode, f"{name} cannot predict"


def test_unknown_and_twice_defined_types_are_refused():
    config = load_config("tiny")
    config.tasks = {**config.tasks, "t": ["text"]}
    with pytest.raises(ValueError, match=r"task 't': head type 'nope' is not one of \['classification', "):
        check_head("t", {"type": "nope"}, config)
    with pytest.raises(ValueError, match="head type 'nope' is not one of"):
        score("nope", [1], [1])
    with pytest.raises(ValueError, match="head type 'span' is defined twice: by skillnet.heads.span and by test_heads"):
        class Span(Head):
            name = "span"
    assert HEADS["span"].__module__ == "skillnet.heads.span"


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_shipped_head_runs_end_to_end(kind, tokenizer):
    """Examples from rows, a training forward whose loss reaches the head's own weights, and predictions
    in the form of the gold answers, which score as perfect against themselves."""
    spec, rows = CASES[kind]
    spec = {"type": kind, **spec}
    config = load_config("tiny", num_decoder_layers=1, decoder_start_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer))
    model = SkillNetForMultiTask(config)
    model.add_task("t", ["text"])
    model.add_head("t", spec)
    head = model.head("t")
    assert type(head) is head_type(kind) and head.spec == spec
    files = DataFiles(max_length=24)
    examples = [head.example(row, files, tokenizer, True, f"row {i}") for i, row in enumerate(rows)]
    batch = collate(examples, tokenizer.pad_token_id)
    batch.pop("meta", None)
    out = model(task="t", **batch)
    assert out.loss.isfinite()
    out.loss.backward()
    own = [p for n, p in model.named_parameters() if n.startswith("heads.t.")]
    assert own or kind in ("retrieval", "generation", "instruction")  # the model's projections and decoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)

    data = types.SimpleNamespace(head=head, examples=examples, tokenizer=tokenizer, files=files, spec=spec)
    predictions, golds = predict(model, data, batch_size=2), gold(data)
    assert len(predictions) == len(golds) == len(rows)
    assert model.training  # predict puts the model back as it found it
    metrics = score(kind, predictions, golds)
    assert head.main_metric in metrics and all(isinstance(v, float) for v in metrics.values())
    perfect = {"retrieval": [[g] for g in golds], "span": [g[0] for g in golds]}.get(kind, golds)
    assert score(spec, perfect, golds)[head.main_metric] == (0.0 if head.lower_is_better else 1.0)
    assert all(type(p) is type(q) for p, q in zip(predictions, perfect))
    if kind == "retrieval":
        assert all(sorted(p) == sorted(golds) for p in predictions)  # three candidates, all ranked
    if kind == "instruction":  # a closed set: even a random model only says its answers
        assert set(predictions) <= {"positive", "negative"}


def test_skillnet_imports_no_application():
    code = "import sys, skillnet, skillnet.heads; sys.exit(sorted({m.split('.')[0] for m in sys.modules} & " \
           "{'finetune', 'pretrain', 'training', 'data_pipeline'}) != [])"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


REGRESSION = '''
"""Regression: one number per text, from the pooled [CLS] vector, by mean squared error."""

import torch
import torch.nn.functional as F
from torch import nn

from skillnet.heads import Head
from skillnet.heads.base import field, tensors


class Scorer(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.out = nn.Linear(hidden, 1)

    def forward(self, pooled, labels=None):
        value = self.out(pooled).squeeze(-1).float()
        return (F.mse_loss(value, labels) if labels is not None else None), value


class Regression(Head):
    name = "regression"
    main_metric = "mse"
    lower_is_better = True

    def build(self, config):
        return Scorer(config.hidden_size)

    def forward(self, model, labels=None, **inputs):
        encoded = model.encode(self.task, **inputs)
        loss, value = model.heads[self.task](encoded.pooler_output, labels)
        return loss, value, encoded.aux_loss

    def example(self, row, fields, tokenizer, labelled, where):
        example = tensors(tokenizer(field(row, fields.text, where), truncation=True, max_length=fields.max_length))
        if labelled:
            example["labels"] = torch.tensor(float(field(row, fields.label, where)))
        return example

    def decode(self, logits, meta, model):
        return logits.tolist()

    def gold(self, example):
        return float(example["labels"])

    @classmethod
    def score(cls, predictions, golds):
        return {"mse": sum((p - g) ** 2 for p, g in zip(predictions, golds)) / len(golds)}
'''


@pytest.fixture
def registry():
    """The registry as it was, back after the test."""
    saved = dict(HEADS)
    yield HEADS
    HEADS.clear()
    HEADS.update(saved)


def test_a_new_head_type_in_a_file_of_its_own_finetunes_and_predicts(registry, tmp_path):
    (tmp_path / "regression_head.py").write_text(textwrap.dedent(REGRESSION))
    spec = importlib.util.spec_from_file_location("regression_head", tmp_path / "regression_head.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert registry["regression"].__name__ == "Regression"

    rows = [{"text": " ".join([cue] + words), "label": 1.0 if cue == "good" else 0.0}
            for words, cue in ((WORDS[i % 7: i % 7 + 4], ("good", "bad")[i % 2]) for i in range(96))]
    train, dev = write_rows(tmp_path, "train", rows[:64]), write_rows(tmp_path, "dev", rows[64:])
    init = tmp_path / "init"
    tokenizer = train_tokenizer([r["text"] for r in rows] * 3, 300, init)
    SkillNetForPreTraining(load_config("tiny", vocab_size=len(tokenizer),
                                       max_position_embeddings=64)).save_pretrained(init)
    tree = {"tasks": [{"name": "rating", "skills": ["text"], "head": {"type": "regression"},
                       "data": {"train": train, "validation": dev, "max_length": 16}}],
            "train": {"steps": 100, "batch_size": 16, "eval_batch_size": 32}, "optim": {"lr": 3e-3, "warmup_steps": 10}}
    config = tmp_path / "rating.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "model"
    assert main(["--config", str(config), "--init", str(init), f"output_dir={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["results"]["rating"]["mse"] < 0.1  # the mean scores 0.25
    model = SkillNetForMultiTask.from_pretrained(out)
    assert model.config.task_heads["rating"] == {"type": "regression"}
    assert ({n for n in model.state_dict() if n.startswith("heads.")}
            == {"heads.rating.out.weight", "heads.rating.out.bias"})
    written = tmp_path / "predicted.jsonl"
    assert predict_main(["--model", str(out), "--task", "rating", "--input", dev, "--output", str(written)]) == 0
    assert written.read_text() == (out / "predictions" / "rating.jsonl").read_text()
