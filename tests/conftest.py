import inspect
import json
import socket

import pytest
import torch

import skillnet
from skillnet import SkillNetConfig, load_config
from skillnet.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
