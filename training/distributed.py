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


def check_accelerator(topology: Topology) -> None:
    """A job given GPUs must be able to use them, each rank its own: an error before any work, not a silent
    run on the CPU (a torch without CUDA) or ranks without a GPU."""
    given = next(((v, os.environ[v]) for v in _SLURM_GPUS if os.environ.get(v, "0") not in ("", "0")), None)
    if given is not None and not torch.cuda.is_available():
        raise ValueError(f"Slurm gave this job GPUs ({given[0]}={given[1]}) but torch {torch.__version__} cannot use "
                         f"them (CUDA build: {torch.version.cuda or 'none'}); install a CUDA build of torch, or submit "
                         f"without GPUs")
    device(topology)


def device(topology: Topology) -> torch.device:
    """This rank's device: the GPU of its local rank when it sees all of the node's (--gpus-per-node,
    torchrun), the one it sees when bound to one (--gpus-per-task, --gpu-bind), the CPU without CUDA. A
    launcher that starts more processes on the node than they see GPUs is an error."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible, shown = torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's and the deepspeed launcher's
    if local_world > visible:  # their processes share one CUDA_VISIBLE_DEVICES: two would share a GPU
        raise ValueError(f"the launcher started {local_world} processes on this node but they see {visible} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={shown}); start one process per GPU")
    if visible == 1:
        return torch.device("cuda", 0)
    if topology.local_rank >= visible:
        raise ValueError(f"local rank {topology.local_rank} sees only {visible} GPUs (CUDA_VISIBLE_DEVICES={shown})")
    return torch.device("cuda", topology.local_rank)


def init(topology: Topology) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) with the rendezvous in MASTER_ADDR/MASTER_PORT; on
    GPUs, refuse ranks of one node that would share a GPU (NCCL would fail at the first collective). Joined
    once: later calls return at once."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return

    os.environ.update(RANK=str(topology.rank), WORLD_SIZE=str(topology.world_size), LOCAL_RANK=str(topology.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process: any free port; several: the launchers' default
        os.environ["MASTER_PORT"] = str(free_port()) if topology.world_size == 1 else "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(device(topology))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    if torch.cuda.is_available() and topology.world_size > 1:
        _check_one_gpu_per_rank()


def _check_one_gpu_per_rank() -> None:
    import socket

    import torch.distributed as dist

    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid))
    everyone = [None] * dist.get_world_size()
    group = dist.new_group(backend="gloo")  # over NCCL, ranks sharing a GPU would fail in this very gather
    dist.all_gather_object(everyone, mine, group=group)
    dist.destroy_process_group(group)
    message = shared_gpus(everyone)
    if message:
        raise ValueError(message)


def shared_gpus(placements: list[tuple[str, str]]) -> str | None:
    """A message naming the ranks that share a GPU, from each rank's (host, GPU uuid); None when none do."""
    holders: dict[tuple[str, str], list[int]] = {}
    for rank, placement in enumerate(placements):
        holders.setdefault(placement, []).append(rank)
    shared = [(host, ranks) for (host, _), ranks in holders.items() if len(ranks) > 1]
    if not shared:
        return None
    host, ranks = shared[0]
    return (f"ranks {ranks} on {host} share one GPU"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
            f" here); give each rank its own GPU (--gpus-per-task=1 or --gpus-per-node=<tasks per node>)")


def shutdown() -> None:
    """Leave the process group, if joined: its communication threads stop with it (a process that exits while
    they run may abort), and so do DeepSpeed's references to its groups (a later `init` starts afresh)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import gc

        from deepspeed import comm

        comm.destroy_process_group()
        gc.collect()


def to_device(tree, device: torch.device):
    """`tree` (a tensor, or dicts and lists of them) on `device`. From the host to a GPU through pinned memory
    and without waiting: a copy from pageable memory stops the host until the device has caught up."""
    if torch.is_tensor(tree):
        if tree.device.type == "cpu" and device.type == "cuda":
            return tree.pin_memory().to(device, non_blocking=True)
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


def collective_device() -> torch.device:
    """The device whose tensors the default process group's collectives take: this rank's GPU under NCCL
    (which refuses CPU tensors), the CPU under gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
