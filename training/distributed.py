"""Rank and world size from whichever launcher started the process: torchrun or the deepspeed launcher
(RANK / WORLD_SIZE / LOCAL_RANK), srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) or mpirun
(OMPI_COMM_WORLD_*), and the process group on top of them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> Topology:
    """The first launcher whose variables are set; a single process when none is."""
    for rank, world, local in _LAUNCHERS:
        if rank in os.environ and world in os.environ:
            return Topology(int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, 0)))
    return Topology(0, 1, 0)


_SLURM_GPUS = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def check_accelerator() -> None:
    """A job Slurm gave GPUs must be able to use them: an error, not a silent run on the CPU."""
    given = next(((v, os.environ[v]) for v in _SLURM_GPUS if os.environ.get(v, "0") not in ("", "0")), None)
    if given is not None and not torch.cuda.is_available():
        raise ValueError(f"Slurm gave this job GPUs ({given[0]}={given[1]}) but torch {torch.__version__} cannot use "
                         f"them (CUDA build: {torch.version.cuda or 'none'}); install a CUDA build of torch, or submit "
                         f"without GPUs")


def device(topology: Topology) -> torch.device:
    """This rank's device: the GPU of its local rank when it sees all of the node's (--gpus-per-node), the one
    it sees when bound to one (--gpus-per-task, --gpu-bind), the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if topology.local_rank >= visible:
        raise ValueError(f"local rank {topology.local_rank} sees only {visible} GPUs "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", topology.local_rank)


def init(topology: Topology) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) with the rendezvous in MASTER_ADDR/MASTER_PORT."""
    import deepspeed

    os.environ.update(RANK=str(topology.rank), WORLD_SIZE=str(topology.world_size), LOCAL_RANK=str(topology.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process: any free port; several: the launchers' default
        os.environ["MASTER_PORT"] = str(free_port()) if topology.world_size == 1 else "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(device(topology))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False,
                               verbose=False)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
