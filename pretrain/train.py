"""Sparse multimodal pretraining on DeepSpeed (ZeRO-3 by default).

    python -m pretrain --config pretrain/configs/tiny.yaml [key=value ...]          # one process
    torchrun --nproc_per_node 2 -m pretrain --config pretrain/configs/tiny.yaml     # local ranks
    srun python -m pretrain --config ...                                            # under Slurm

Rank and world size come from torchrun, the deepspeed launcher, srun or mpirun. SIGUSR1 (Slurm's
`--signal`, sent before preemption or the time limit) makes every rank checkpoint at the next step and,
under Slurm, requeue the job; SIGTERM (a plain `scancel`) checkpoints and stops without requeueing. The
process then exits with status 3 (stopped early), 0 when training finished, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import checkpoint
from .config import PretrainConfig, dump, load_pretrain_config
from .distributed import Topology, detect
from .zero_traces import TraceSwitch


class Stop:
    """Set by SIGUSR1 (stop and requeue: Slurm's `--signal`) or SIGTERM (stop: `scancel`); the ranks agree
    on it at step boundaries (see `step_totals`)."""

    def __init__(self):
        self.requested = 0  # 0: go on, 1: stop, 2: stop and requeue
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = max(self.requested, 2 if signum == signal.SIGUSR1 else 1)


def step_totals(tokens: int, samples: int, sent: int, stop: Stop, device) -> tuple[int, int, int, int]:
    """Tokens, samples and skill-exchange bytes of the step summed over ranks, and the strongest stop any
    rank was asked for (see `Stop`): one small all-reduce per step."""
    import torch.distributed as dist

    totals = torch.tensor([tokens, samples, sent, stop.requested == 1, stop.requested == 2], dtype=torch.float64,
                          device=device)
    dist.all_reduce(totals)
    return int(totals[0]), int(totals[1]), int(totals[2]), 2 if totals[4] else 1 if totals[3] else 0


def _model_config(config: PretrainConfig):
    from skillnet import SkillNetConfig, load_config

    if isinstance(config.model, dict):
        return SkillNetConfig(**config.model)
    return load_config(config.model)


def prepare(config: PretrainConfig, topology: Topology):
    """Everything that can fail on bad input, before any process group or heavy work."""
    from data_pipeline.loader import MultiTaskLoader
    from data_pipeline.media import MediaConfig
    from skillnet.tokenizer import load_tokenizer

    from .distributed import check_accelerator

    check_accelerator()
    model_config = _model_config(config)
    registry = model_config.registry
    for t in config.data.tasks:
        registry.task_skills(t.name)
    if config.train.caption_task not in model_config.tasks:
        raise ValueError(f"train.caption_task {config.train.caption_task!r} is not in the model's task table")
    if config.data.batch_mode != "task":
        raise ValueError("pretraining needs data.batch_mode 'task': one objective per step on every rank")
    tokenizer = load_tokenizer(config.tokenizer)
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {model_config.vocab_size}")
    loader = MultiTaskLoader(config.data, tokenizer, MediaConfig.from_model(model_config),
                             {t: registry.skill_names(t) for t in model_config.tasks}, topology.rank, topology.world_size)
    if not Path(config.distributed.ds_config).exists():
        raise FileNotFoundError(f"distributed.ds_config: no file {config.distributed.ds_config}")
    placement = _placement(config, model_config, loader, topology)
    resume = checkpoint.resolve_resume(config.checkpoint.resume, Path(config.run_dir) / "checkpoints")
    if resume is not None:
        checkpoint.check_compatible(resume, _comparable(model_config), topology.world_size,
                                    placement and placement.to_dict())
    return model_config, tokenizer, loader, resume, placement


def _placement(config: PretrainConfig, model_config, loader, topology: Topology):
    """The skill placement when skills are split over ranks (None otherwise); a data-local placement
    also tells the loader which tasks this rank trains on."""
    from . import skill_parallel

    p = config.distributed.skill_parallel_size
    if p == 1:
        return None
    if p < 1 or topology.world_size % p:
        raise ValueError(f"distributed.skill_parallel_size={p} must divide the world size {topology.world_size}")
    if model_config.router != "skill":
        raise ValueError(f"skill parallelism splits skills; the model's router is {model_config.router!r}")
    names = model_config.registry.names
    if config.distributed.skill_placement == "balanced":
        return skill_parallel.balanced(names, p)
    registry = model_config.registry
    caption = registry.skill_names(config.train.caption_task)
    # a contrastive task also runs its captions with the caption task's skills
    tasks = {t.name: sorted(set(registry.skill_names(t.name)) | (set(caption) if config.objective(t.name) == "contrastive"
                                                                 else set())) for t in config.data.tasks}
    weights = dict(zip(tasks, loader.probabilities))
    placement = skill_parallel.data_local(names, tasks, weights, p)
    loader.split_tasks(placement.task_slots, topology.rank % p)
    return placement


def _comparable(model_config) -> dict:
    return json.loads(model_config.to_json_string(use_diff=False))


def _ds_config(config: PretrainConfig, world_size: int) -> dict:
    ds = json.loads(Path(config.distributed.ds_config).read_text())
    bf16 = config.train.bf16 == "true" or (config.train.bf16 == "auto" and torch.cuda.is_available()
                                           and torch.cuda.is_bf16_supported())
    # Under skill parallelism the ranks' backward graphs differ (each computes its own skills), so autograd
    # may reach ZeRO's gradient reductions and the skill exchanges in a different order on each rank; the
    # loop then holds every gradient of an optimizer step (all its micro-batches, accumulated by autograd)
    # and reduces them once at its end, in parameter order, which DeepSpeed counts as one micro-step.
    accumulation = 1 if config.distributed.skill_parallel_size > 1 else config.train.gradient_accumulation
    ds.update(train_micro_batch_size_per_gpu=config.train.micro_batch_size,
              gradient_accumulation_steps=accumulation,
              gradient_clipping=config.train.grad_clip,
              bf16={"enabled": bf16})
    ds.pop("train_batch_size", None)
    _merge(ds, config.distributed.ds_overrides)
    if config.train.profile_comm:
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    return ds


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


class CommClock:
    """Seconds spent in collectives, and bytes all-gathered, between calls, from DeepSpeed's comms logger.
    Its timer per collective is cumulative (each record holds the running total), so the newest record of
    each collective is kept; message counts are per record. The records are cleared on every read,
    bounding their memory."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.last = 0.0
        self.seconds = 0.0

    def read(self) -> int:
        """Bytes all-gathered since the last read (ZeRO-3's parameter gathers); seconds accumulate in
        `seconds` until `take_seconds`."""
        from deepspeed import comm

        records, gathered = comm.comms_logger.comms_dict, 0
        for name, sizes in records.items():
            self.totals[name] = max([self.totals.get(name, 0.0)] + [max(entry[1]) for entry in sizes.values()])
            if name.startswith("all_gather"):
                gathered += sum(size * entry[0] for size, entry in sizes.items())
        records.clear()
        total = sum(self.totals.values()) / 1000.0
        self.seconds, self.last = self.seconds + total - self.last, total
        return gathered

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _optimizer(model, config: PretrainConfig, offload: bool):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": config.optim.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    # skills split over ranks go in groups of their own: ZeRO partitions them over other ranks
    groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    kwargs = dict(lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps)
    if offload:  # the optimizer steps on the CPU: DeepSpeed's vectorised Adam (AdamW with adamw_mode)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    warmup, total = config.optim.warmup_steps, config.train.steps

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0 (the papers' schedule)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class Metrics:
    """TensorBoard scalars, a tqdm bar and `steps.jsonl` (each step's loss, tasks, gradient norm and
    skill-exchange bytes) on rank 0. Step records may hold device tensors: they are read (one host sync)
    and written when `flush` is called, at logging steps and before every checkpoint, so `steps.jsonl`
    always covers the newest checkpoint."""

    def __init__(self, run_dir: Path, main: bool, total: int, start: int):
        self.main = main
        self.writer = self.bar = self.steps = None
        self.pending: list[dict] = []
        if main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.bar = tqdm(total=total, initial=start, desc="pretraining", unit=" steps", dynamic_ncols=True)
            self.steps = (run_dir / "steps.jsonl").open("a")

    def log(self, step: int, scalars: dict) -> None:
        if not self.main:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.3f}")

    def advance(self, step: int, record: dict) -> None:
        if self.main:
            self.bar.update(1)
            self.pending.append({"step": step, **record})

    def flush(self) -> None:
        if self.main and self.pending:
            for record in self.pending:
                self.steps.write(json.dumps({k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}) + "\n")
            self.steps.flush()
            self.pending.clear()

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        if self.main:
            self.writer.close()
            self.bar.close()
            self.steps.close()


def train(config: PretrainConfig, topology: Topology, prepared: tuple) -> dict:
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed calls torch collectives that torch deprecates: say so once, not at every step
    warnings.filterwarnings("once", message=r".* is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    from . import distributed
    from .objectives import Objectives
    from .parallelize import parallelize

    model_config, tokenizer, loader, resume, placement = prepared
    distributed.init(topology)
    agree_on_resume(resume)
    run_dir = Path(config.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if topology.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(config, run_dir / "config.yaml")
        model_config.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir / "tokenizer")
    device = distributed.device(topology)

    ds_config = _ds_config(config, topology.world_size)
    model = build_model(model_config, config.train.seed, ds_config if placement is None else None)
    torch.manual_seed(config.train.seed + topology.rank)  # dropout differs per rank; the weights do not
    skill_layers, data_group = [], None
    if placement is not None:
        skill_layers, data_group = split_skills(model, placement)
        if topology.is_main:
            (run_dir / "skill_placement.json").write_text(json.dumps(placement.to_dict(), indent=1))
    model = parallelize(model, config.train.activation_checkpointing)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    optimizer, scheduler = _optimizer(model, config, offload)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    state = {"step": 0, "tokens_seen": 0, "samples_seen": 0, "loader": None}
    if resume is not None:
        state = checkpoint.load(engine, resume)
        loader.load_state_dict(state["loader"])
    data_local = placement is not None and placement.task_slots is not None
    # data-local: the ranks at one position share a task, so contrastive negatives come from them
    traces = TraceSwitch(engine, config.distributed.trace_per_call)
    objectives = Objectives(config, tokenizer, model_config, data_group if data_local else None, traces.select)
    stop = Stop()
    metrics = Metrics(run_dir, topology.is_main, config.train.steps, state["step"])
    accumulation = config.train.gradient_accumulation
    task_losses, task_counts, skill_counts = {}, Counter(), Counter()
    micro, wait, compute, last_log, step_loss, step_tasks = 0, 0.0, 0.0, time.perf_counter(), 0.0, []
    step_tokens = step_samples = 0
    signalled = 0
    skill_norms: dict[str, float] = {}
    comm_clock = CommClock()
    tokens_at_log, samples_at_log, saved = state["tokens_seen"], state["samples_seen"], None
    exchanged, logged_step = 0, state["step"]  # skill-exchange bytes (all ranks) since the last log
    traced_calls = [0, 0]

    def save() -> Path:
        state["loader"] = loader.state_dict()
        return checkpoint.save(engine, ckpt_root, state["step"], state, _comparable(model_config),
                               config.checkpoint.keep_last, placement and placement.to_dict())

    try:
        batches = iter(loader)
        while state["step"] < config.train.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            engine.train()
            index = state["step"] * accumulation + micro
            if placement is not None and micro == 0:
                reduction = engine.coalesce_grad_reduction()  # see _ds_config: one reduction per optimizer step
                reduction.__enter__()
            # data-local: every position's task runs on every rank, in position order, on a blank sample elsewhere
            loss, stats = objectives.loss(engine, batch, index, topology.rank, device,
                                          *((batch["group_tasks"], loader.group) if data_local else ()))
            engine.backward(loss / accumulation if placement is not None else loss)
            if placement is not None and micro + 1 == accumulation:
                reduction.__exit__(None, None, None)
            if micro + 1 == accumulation and (state["step"] + 1) % config.train.log_every == 0:
                skill_norms = skill_grad_norms(engine.module)  # after the last backward, before the step
            if placement is None or micro + 1 == accumulation:
                engine.step()
            if micro + 1 == accumulation:
                clear_gradient_partitions(engine)
            t2 = time.perf_counter()
            wait, compute = wait + t1 - t0, compute + t2 - t1
            micro += 1
            step_loss = step_loss + loss.detach()  # on the device: read at logging steps
            step_tasks.append(batch["task"] if not data_local else batch["group_tasks"])
            task_losses[batch["task"]] = task_losses.get(batch["task"], 0.0) + loss.detach()
            task_counts[batch["task"]] += 1
            for skill in batch["skills"]:
                skill_counts[skill] += 1
            step_tokens += stats["tokens"]
            step_samples += len(batch["keys"])
            if micro < accumulation:
                continue
            sent = sum(layer.bytes_sent for layer in skill_layers)
            for layer in skill_layers:
                layer.bytes_sent = 0
            tokens, samples, sent, signalled = step_totals(step_tokens, step_samples, sent, stop, device)
            exchanged += sent
            state["tokens_seen"] += tokens
            state["samples_seen"] += samples
            micro, step_tokens, step_samples = 0, 0, 0
            state["step"] += 1
            step = state["step"]
            record = {"loss": step_loss / accumulation, "tasks": step_tasks,
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens": tokens, "skill_bytes": sent}
            if config.train.profile_comm:
                record["gathered_bytes"] = comm_clock.read()  # this rank's
            record["zero3_calls"], record["zero3_traced"] = traces.take()
            traced_calls = [traced_calls[0] + record["zero3_calls"], traced_calls[1] + record["zero3_traced"]]
            metrics.advance(step, record)
            step_loss, step_tasks = 0.0, []
            if step % config.train.log_every == 0 or step == config.train.steps:
                elapsed = time.perf_counter() - last_log
                # every rank's window (under data-local placement the ranks train different tasks)
                window = _summed_over_ranks(losses={t: float(v) for t, v in task_losses.items()}, counts=task_counts,
                                            skills=skill_counts, skipped=loader.skipped)
                scalars = {f"loss/{t}": window["losses"][t] / n for t, n in window["counts"].items()}
                scalars["loss"] = sum(window["losses"].values()) / max(1, sum(window["counts"].values()))
                scalars.update({"lr": scheduler.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                                "throughput/tokens_per_s": (state["tokens_seen"] - tokens_at_log) / elapsed,
                                "throughput/samples_per_s": (state["samples_seen"] - samples_at_log) / elapsed,
                                "time/data_wait_s": wait, "time/compute_s": compute})
                if config.train.profile_comm:
                    scalars["time/communication_s"] = comm_clock.take_seconds()
                    scalars["time/compute_s"] = compute - scalars["time/communication_s"]
                scalars.update({f"skills/activations/{s}": n for s, n in window["skills"].items()})
                if placement is not None:
                    scalars["skills/bytes_exchanged_per_step"] = exchanged / (step - logged_step)
                exchanged, logged_step = 0, step
                scalars.update({f"skills/grad_norm/{s}": n for s, n in skill_norms.items()})
                scalars.update({f"data/skipped/{r}": n for r, n in window["skipped"].items()})
                scalars["memory/rss_gb"] = _rss_gb()
                if traced_calls[0]:  # model calls along a complete ZeRO-3 trace, which prefetch
                    scalars["zero3/traced_call_share"] = traced_calls[1] / traced_calls[0]
                traced_calls = [0, 0]
                if torch.cuda.is_available():
                    scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
                metrics.log(step, scalars)
                metrics.flush()
                task_losses.clear(), task_counts.clear(), skill_counts.clear()
                wait, compute, last_log = 0.0, 0.0, time.perf_counter()
                tokens_at_log, samples_at_log = state["tokens_seen"], state["samples_seen"]
            if step % config.checkpoint.every == 0 or step == config.train.steps or signalled:
                metrics.flush()
                saved = save()
            if signalled:
                if signalled == 2 and topology.is_main and "SLURM_JOB_ID" in os.environ:
                    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
                break
    except BaseException:  # the bar ends before the error is printed; unflushed steps stay unwritten,
        metrics.close(flush=False)  # as the checkpoint they follow does not hold them
        raise
    metrics.close()
    skipped = Counter(_summed_over_ranks(skipped=loader.skipped)["skipped"])
    dist.barrier()
    return {"step": state["step"], "checkpoint": saved, "run_dir": run_dir, "stopped": bool(signalled),
            "requeued": signalled == 2 and "SLURM_JOB_ID" in os.environ, "skipped": skipped}


def _summed_over_ranks(**tables: dict) -> dict[str, dict]:
    """Each named table of numbers summed key by key over every rank (a collective: every rank calls it)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {name: dict(table) for name, table in tables.items()})
    totals = {name: {} for name in tables}
    for rank_tables in gathered:
        for name, table in rank_tables.items():
            for key, value in table.items():
                totals[name][key] = totals[name].get(key, 0) + value
    return totals


def build_model(model_config, seed: int, ds_config: dict | None = None):
    """The pretraining model as every rank builds it: the modules' own default initialisation skipped, then
    each module's parameters initialised from `seed`, children first, on rank 0 and broadcast, so every
    rank starts from the same weights. Under ZeRO-3 (`ds_config` given) the model is built partitioned
    (`deepspeed.zero.Init`): each module's parameters are split over the ranks as soon as it exists and
    gathered on rank 0 only while they are initialised, so no rank ever holds the whole model. Both ways give the
    same weights. (Skill parallelism moves skills after building, so it builds whole.)"""
    import contextlib

    import deepspeed
    import torch.distributed as dist
    from transformers import initialization as init
    from transformers.integrations.deepspeed import initialize_weights_zero3

    from skillnet import SkillNetForPreTraining

    partitioned = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    zero_init = deepspeed.zero.Init(config_dict_or_path=ds_config) if partitioned else contextlib.nullcontext()
    _mmap_threshold(1 << 20)  # the full tensors gathered one module at a time go back to the OS when freed
    with init.no_init_weights(), zero_init:
        model = SkillNetForPreTraining(model_config)
    torch.manual_seed(seed)
    # module by module, initialised on rank 0 (as `initialize_weights_zero3` does, without its all-gathers)
    (_initialise_partitioned if partitioned else initialize_weights_zero3)(model)
    _mmap_threshold(32 << 20)  # glibc's own upper bound for the threshold it adapts by default
    if not partitioned:  # the other ranks hold what no_init_weights left: rank 0's weights replace it
        with torch.no_grad():
            for param in model.parameters():
                dist.broadcast(param.data, 0)
    model.tie_weights()
    return model


def _initialise_partitioned(model) -> None:
    """Hugging Face's `initialize_weights_zero3` (the same modules in the same order, so the same weights as
    a whole build), except that each module's parameters (with its direct children's, which `_init_weights`
    may touch) are gathered on rank 0 alone, initialised there on the CPU and scattered back as partitions:
    the other ranks never hold a whole tensor, rank 0 one module's. Reads DeepSpeed's partition layout: the
    flattened tensor, padded to a multiple of the ranks, split in rank order (`ds_tensor`)."""
    import contextlib

    import torch.distributed as dist
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    rank, world, remote = dist.get_rank(), dist.get_world_size(), model.is_remote_code()

    def pieces(p, flat):  # (this rank's slice of its partition, every rank's in `flat`), 1M elements at a time
        size = p.ds_tensor.numel()
        for start in range(0, size, 1 << 20):
            end = min(size, start + (1 << 20))  # gloo stages a collective's whole buffer: keep it small
            yield p.ds_tensor[start:end], [flat[r * size + start:r * size + end] for r in range(world)] if rank == 0 else None

    @contextlib.contextmanager
    def whole_on_rank0(params):
        flats = []
        for p in params:
            flat = p.ds_tensor.new_empty(p.ds_tensor.numel() * world) if rank == 0 else None
            for mine, every in pieces(p, flat):
                dist.gather(mine, every, dst=0)
            if rank == 0:
                p.data = flat[:p.ds_numel].view(p.ds_shape).cpu()
            flats.append(flat)
        yield
        for p, flat in zip(params, flats):
            if rank == 0:
                flat[:p.ds_numel].copy_(p.data.flatten())
                p.data = torch.empty(0, dtype=p.dtype, device=p.ds_tensor.device)
            for mine, every in pieces(p, flat):
                dist.scatter(mine, every, src=0)

    def visit(module, fn):
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        params = [*module.parameters(recurse=False), *(p for c in module.children() if not isinstance(c, PreTrainedModel)
                                                       for p in c.parameters(recurse=False))]
        if not params:
            fn(module, remote)
            return
        with whole_on_rank0(list({id(p): p for p in params}.values())):
            if rank == 0:
                fn(module, remote)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)


def _mmap_threshold(size: int) -> None:
    """Serve allocations of at least `size` bytes from their own mappings (glibc), which are returned to the
    OS when freed; by default glibc raises its threshold as large blocks are freed and then keeps the
    gathered-and-freed tensors of a partitioned build in its heap."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def split_skills(model, placement) -> tuple[list, object]:
    """Keep this rank's skills in every skill layer; returns the layers and the group of ranks at this rank's
    position. The skill-parallel groups are DeepSpeed's expert-parallel groups (P consecutive ranks), so
    ZeRO-3 partitions each skill over the ranks at the same position (the expert-data-parallel group)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from .skill_parallel import shard_skills

    name = f"ep_size_{placement.size}"
    groups._create_expert_and_data_parallel(placement.size)
    group, data_group = groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
    return shard_skills(model, placement, dist.get_rank(group), group, data_group, name), data_group


def agree_on_resume(resume: Path | None) -> None:
    """Every rank must resume from the same checkpoint (each found it on its own before the process group
    existed); refuse rather than hang if another writer changed the folder meanwhile."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, str(resume))
    if len(set(everyone)) > 1:
        raise RuntimeError(f"ranks found different checkpoints to resume from: {sorted(set(everyone))}")


def clear_gradient_partitions(engine) -> None:
    """Zero ZeRO-3's reduced gradient partitions after an optimizer step. A backward writes the slot of
    each parameter it reached and leaves the others alone, so a parameter the step's task does not use
    (another task's skills, heads, frontend) would bring its last gradient into every later step's norm,
    clipping and Adam update, and a resumed run, whose slots start at zero, would train differently."""
    optimizer = engine.optimizer
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
    for flat in getattr(optimizer, "fp32_partitioned_groups_flat", ()):  # an offloaded optimizer's fp32 gradients
        if flat.grad is not None:
            flat.grad.zero_()


def skill_grad_norms(model) -> dict[str, float]:
    """L2 norm of each skill's gradient over all its layers. Under ZeRO-3 every rank gathers each skill
    parameter's gradient, so it runs on the logging steps only."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    squares: Counter = Counter()
    for name, param in model.named_parameters():
        if ".skills." in name:
            grad = safe_get_full_grad(param)
            if grad is not None:
                squares[name.split(".skills.")[1].split(".")[0]] += float(grad.float().pow(2).sum())
    everyone = [None] * dist.get_world_size()  # under skill parallelism each rank holds some of the skills
    dist.all_gather_object(everyone, dict(squares))
    return {skill: math.sqrt(total) for held in everyone for skill, total in held.items()}


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a pretraining YAML (pretrain/configs/*.yaml) or its name")
    parser.add_argument("overrides", nargs="*", help="key=value settings, dotted (optim.lr=1e-4)")
    args = parser.parse_args(argv)
    topology = detect()
    try:
        config = load_pretrain_config(args.config, args.overrides)
        prepared = prepare(config, topology)
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from data_pipeline.loader import DataError

    try:
        result = train(config, topology, prepared)
    except DataError as e:  # raised in a loader worker: its message, without the worker's traceback
        print(f"error: {DataError.one_line(e)}", file=sys.stderr)
        return 2
    if topology.is_main:
        stopped = " (stopped by signal, checkpointed" + (", requeued)" if result["requeued"] else ")")
        print(f"trained to step {result['step']}" + (stopped if result["stopped"] else ""))
        if result["skipped"]:
            reasons = ", ".join(f"{r} {n}" for r, n in result["skipped"].most_common())
            print(f"skipped {sum(result['skipped'].values())} unusable samples: {reasons} (the log names each)")
        print(f"checkpoint:  {result['checkpoint']}")
        print(f"tensorboard: {result['run_dir'] / 'tensorboard'}")
    return 3 if result["stopped"] and result["step"] < config.train.steps else 0
