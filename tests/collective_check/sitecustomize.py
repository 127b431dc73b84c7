"""Put on PYTHONPATH of every process of the distributed tests: each torch.distributed collective checks
its tensors against the device the group's backend takes (under NCCL this rank's GPU: a CPU tensor there
is refused, where gloo would have taken it) and raises, naming the collective and where it came from.
DeepSpeed looks these functions up through `torch.distributed`, so its collectives are checked too."""

import functools
import inspect
import traceback

import torch
import torch.distributed as dist

COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single",
               "gather", "scatter", "send", "recv", "isend", "irecv", "all_reduce_coalesced")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checked(name, collective):
    signature = inspect.signature(collective)

    @functools.wraps(collective)
    def call(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        expected = _device(arguments.get("group"))
        for tensor in _tensors(list(arguments.values())):
            if tensor.device != expected:
                where = "".join(traceback.format_stack(limit=6)[:-1])
                raise RuntimeError(f"torch.distributed.{name} was given a tensor on {tensor.device}; this rank's "
                                   f"collectives take {expected}\n{where}")
        return collective(*args, **kwargs)

    return call


for _name in COLLECTIVES:
    if hasattr(dist, _name):
        setattr(dist, _name, _checked(_name, getattr(dist, _name)))
