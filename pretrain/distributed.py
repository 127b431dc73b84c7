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


def init(topology: Topology) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) with the rendezvous in MASTER_ADDR/MASTER_PORT."""
    import deepspeed

    os.environ.update(RANK=str(topology.rank), WORLD_SIZE=str(topology.world_size), LOCAL_RANK=str(topology.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False,
                               verbose=False)
