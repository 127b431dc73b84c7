"""Launching on GPU clusters: which device each rank takes, refusing a GPU job whose torch has no CUDA, and
config values as YAML writes them."""

import pytest
import torch

from pretrain.config import load_pretrain_config
from pretrain.train import main
from training.distributed import Topology, device


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0), (2, 1, 1)])
def test_each_rank_takes_its_gpu(monkeypatch, visible, local_rank, expected):
    """--gpus-per-node: every rank sees the node's GPUs and takes its local rank's; --gpus-per-task or
    --gpu-bind: each sees one, and takes it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert device(Topology(rank=8 + local_rank, world_size=16, local_rank=local_rank)) == torch.device("cuda", expected)


def test_a_rank_without_its_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="local rank 5 sees only 4 GPUs"):
        device(Topology(rank=5, world_size=8, local_rank=5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's torch can use its GPUs")
def test_gpu_job_without_cuda_torch_stops_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    assert main(["--config", "tiny", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "Slurm gave this job GPUs (SLURM_GPUS_ON_NODE=8)" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_yaml_booleans_for_bf16(tmp_path):
    config = tmp_path / "run.yaml"
    tasks = "data:\n  tasks: [{name: masked_lm, modality: text, sources: [{shards: text.tar}]}]\n"
    config.write_text(tasks + "train:\n  bf16: true\n")
    assert load_pretrain_config(config).train.bf16 == "true"
    assert load_pretrain_config(config, ["train.bf16=false"]).train.bf16 == "false"
    with pytest.raises(ValueError, match="train.bf16 must be auto, true or false"):
        load_pretrain_config(config, ["train.bf16=maybe"])
