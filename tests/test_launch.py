"""Launching on GPU clusters: which device each rank takes, refusing a GPU job whose torch has no CUDA or
whose ranks would share or lack a GPU, every collective's tensors on the rank's device, and config values
as YAML writes them."""

import subprocess
import sys

import pytest
import torch
from conftest import free_port, rank_env

from pretrain.config import load_pretrain_config
from pretrain.train import main
from training.distributed import Topology, device, shared_gpus


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


def test_more_processes_than_gpus_stop_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """torchrun started 4 processes on a node whose CUDA_VISIBLE_DEVICES shows 2 GPUs: every rank stops with
    one line naming both, before reading data or building (rank 0 too, which would have found a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert main(["--config", "tiny", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "the launcher started 4 processes on this node but they see 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_ranks_sharing_a_gpu_are_named():
    """srun without GPU binding: two tasks of a node see the same single GPU (NCCL would fail at the first
    collective); tasks on other nodes may hold GPUs of the same index."""
    assert shared_gpus([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-1"), ("b", "GPU-2")]) is None
    message = shared_gpus([("a", "GPU-1"), ("b", "GPU-7"), ("a", "GPU-1")])
    assert message.startswith("ranks [0, 2] on a share one GPU")


CHECKED = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))  # on the rank's device: passes
dist.broadcast(torch.ones(1, device="meta"), 0)
"""


def test_collectives_off_the_rank_device_fail_the_run(tmp_path):
    """The ranks the distributed tests launch check every collective's tensors against the device the
    group's backend takes (this rank's GPU under NCCL, the CPU under gloo), DeepSpeed's collectives too:
    a tensor elsewhere ends the run, naming the collective."""
    script = tmp_path / "checked.py"
    script.write_text(CHECKED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=rank_env())
    assert done.returncode != 0
    assert "torch.distributed.broadcast was given a tensor on meta; this rank's collectives take cpu" in done.stderr


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
