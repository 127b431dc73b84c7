import inspect
import json
import os
import random
import socket

import pytest
import torch
import yaml

import skillnet
from skillnet import SkillNetConfig, SkillNetForPreTraining, load_config
from skillnet.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")
_BEFORE = {k: os.environ.get(k) for k in _RENDEZVOUS}


@pytest.fixture(autouse=True)
def _rendezvous_stays_in_its_test():
    """A test that trains in this process joins a one-rank process group and exports its rendezvous
    (`MASTER_PORT` is a port this process then listens on); later tests' launchers must not inherit it.
    (DeepSpeed reads RANK and LOCAL_RANK again later, so those stay; Slurm jobs get none of them.)"""
    yield
    for key, value in _BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def tiny_config() -> SkillNetConfig:
    return load_config("tiny")


def nlu_config(**overrides) -> SkillNetConfig:
    """A tiny text model with the SkillNet-NLU skills and task table."""
    sizes = dict(skill_set="nlu", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    return SkillNetConfig(**{**sizes, **overrides})


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE trained here on captions and standard-library code."""
    texts = [
        "a red circle on the left of a blue square",
        "three green triangles move from top to bottom",
        "a low tone followed by a rising chord",
    ] * 20 + [inspect.getsource(json.decoder), inspect.getsource(skillnet.skills)]
    return train_tokenizer(texts, vocab_size=400, out_dir=tmp_path_factory.mktemp("tokenizer"))


COLLECTIVES_CHECKED = os.path.join(os.path.dirname(__file__), "collective_check")


def rank_env(**extra: str) -> dict[str, str]:
    """The environment of the ranks a test launches: one thread each, and every collective's tensors checked
    against the rank's device (`collective_check/sitecustomize.py`)."""
    path = os.pathsep.join(p for p in (COLLECTIVES_CHECKED, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The sample pretraining corpus (every modality) and its tokenizer, as `pretrain.prepare_sample` writes it."""
    from pretrain.prepare_sample import main as prepare_sample

    out = tmp_path_factory.mktemp("sample")
    assert prepare_sample(["--out", str(out), "--vocab-size", "512"]) == 0
    return out


@pytest.fixture(scope="session")
def small_shards(sample, tmp_path_factory):
    """The sample corpus's kinds of data with two samples per shard (at least 4 shards per modality, so 4
    ranks read every source without resampling, and an epoch ends within a few steps), and its tokenizer."""
    import shutil

    from data_pipeline.sample_corpus import write_corpus

    out = tmp_path_factory.mktemp("small_shards")
    write_corpus(out, seed=1, images_n=20, audio_n=10, video_n=10, code_n=12, text_n=20, max_samples=2, progress=False)
    shutil.copytree(sample / "tokenizer", out / "tokenizer")
    return out


CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi"]
WORDS = ["the", "a", "film", "day", "trip", "food", "was", "very", "to", "we", "went", "in", "it", "is"]


def finetune_rows(seed: int, n: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    rows = {"sentiment": [], "pairs": [], "ner": [], "qa": []}
    for _ in range(n):
        good = rng.random() < 0.5
        words = (rng.sample(WORDS, 4) + [rng.choice(["good", "great"] if good else ["bad", "awful"])]
                 + rng.sample(WORDS, 2))
        rows["sentiment"].append({"text": " ".join(words), "label": "positive" if good else "negative"})
        same = rng.random() < 0.5  # the second segment's cue word decides
        second = rng.sample(WORDS, 3) + ["indeed" if same else "never"] + rng.sample(WORDS, 2)
        rows["pairs"].append({"text": " ".join(rng.sample(WORDS, 5)), "text_pair": " ".join(second),
                              "label": "same" if same else "different"})
        city = rng.choice(CITIES)
        words = rng.sample(WORDS, 3) + [city] + rng.sample(WORDS, 2)
        rows["ner"].append({"tokens": words, "tags": ["B-LOC" if w == city else "O" for w in words]})
        country, capital = rng.choice(["france", "italy", "norway", "peru", "egypt", "india"]), rng.choice(CITIES)
        context = (f"{' '.join(rng.sample(WORDS, 3))} the capital of {country} is {capital} "
                   f"{' '.join(rng.sample(WORDS, 2))}")
        rows["qa"].append({"question": f"what is the capital of {country}", "context": context,
                           "answers": {"text": [capital], "answer_start": [context.index(f"is {capital}") + 3]}})
    return rows


def write_rows(folder, name: str, rows: list[dict]) -> str:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Finetuning data files (four text tasks), a tokenizer trained on them, and a small multimodal model
    saved like an export: (folder, {task: (train file, validation file)}, model folder)."""
    root = tmp_path_factory.mktemp("finetune")
    train, dev = finetune_rows(0, 160), finetune_rows(1, 40)
    files = {k: (write_rows(root, f"{k}_train", train[k]), write_rows(root, f"{k}_dev", dev[k])) for k in train}
    texts = [r["text"] for r in train["sentiment"]] + [r["context"] + " " + r["question"] for r in train["qa"]]
    texts += [r["text_pair"] for r in train["pairs"]]
    init = root / "init"
    tokenizer = train_tokenizer(texts * 3, 300, init)
    config = load_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=64)
    torch.manual_seed(0)
    SkillNetForPreTraining(config).save_pretrained(init)
    return root, files, init


def finetune_config(root, files, tasks: list[str], **extra) -> str:
    heads = {
        "sentiment": {"name": "sentiment_analysis",
                      "head": {"type": "classification", "labels": ["negative", "positive"]}, "skills": ["text"]},
        "pairs": {"name": "paraphrase", "head": {"type": "pair_classification", "labels": ["different", "same"]},
                  "skills": ["text"]},
        "ner": {"name": "named_entity_recognition", "head": {"type": "tagging", "labels": ["O", "B-LOC", "I-LOC"]},
                "skills": ["text"]},
        "qa": {"name": "reading_comprehension", "head": {"type": "span"}, "skills": ["text"]},
    }
    entries = []
    for key in tasks:
        entry = dict(heads[key])
        entry["data"] = {"train": files[key][0], "validation": files[key][1], "max_length": 48}
        entries.append(entry)
    tree = {"tasks": entries, "train": {"steps": 150, "batch_size": 16, "eval_batch_size": 16, "log_every": 10},
            "optim": {"lr": 3e-3, "warmup_steps": 10}, **extra}
    path = root / f"config_{'_'.join(tasks)}_{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)
