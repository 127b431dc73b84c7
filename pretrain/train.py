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
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from skillnet.tokenizer import fingerprint
from training import checkpoint, distributed, zero
from training.distributed import Topology, check_accelerator, detect
from training.loop import train_loop
from training.metrics import Metrics, Window, memory_scalars, skill_grad_norms, summed_over_ranks
from training.parallelize import parallelize
from training.run import Prepared, exit_status, refuse, run
from training.signals import Stop
from training.step import optimizer_step
from training.zero.offload import SkillOffload
from training.zero.offload import check as offload_check
from training.zero.traces import TraceSwitch

from .config import PretrainConfig, dump, load_pretrain_config
from .objectives import Objectives


@dataclass
class Inputs(Prepared):
    """What pretraining checked before any process group: besides the shared parts, the model's config, the
    data loader and the skill placement (None without skill parallelism)."""
    model_config: object
    loader: object
    placement: object


def prepare(config: PretrainConfig, topology: Topology) -> Inputs:
    """Everything that can fail on bad input, before any process group or heavy work."""
    from data_pipeline.loader import MultiTaskLoader
    from data_pipeline.media import MediaConfig
    from skillnet.instructions import add_location_tokens
    from skillnet.tokenizer import load_tokenizer

    check_accelerator(topology)
    model_config = model_at_resume(config, config.model_config(), Path(config.run_dir) / "checkpoints")
    registry = model_config.registry
    for t in config.data.tasks:
        registry.task_skills(t.name)
    contrastive = any(config.objective(t.name) == "contrastive" for t in config.data.tasks)
    if contrastive and config.train.caption_task not in model_config.tasks:  # the text side of every pair
        raise ValueError(f"train.caption_task {config.train.caption_task!r} is not in the model's task table")
    if config.data.batch_mode != "task":
        raise ValueError("pretraining needs data.batch_mode 'task': one objective per step on every rank")
    tokenizer = load_tokenizer(config.tokenizer)
    instructions = [t.name for t in config.data.tasks if t.template]
    if instructions and not model_config.num_decoder_layers:
        raise ValueError(f"instruction tasks {instructions} train the decoder: the model needs "
                         f"model.num_decoder_layers >= 1")
    located = [t.name for t in config.data.tasks if t.template and t.instruction().boxes]
    if located:  # boxes are written as location tokens
        add_location_tokens(tokenizer)
    if len(tokenizer) > model_config.vocab_size:
        added = f" (with the location tokens of {located}'s boxes)" if located else ""
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens{added}, the model's vocab_size is "
                         f"{model_config.vocab_size}: set model.vocab_size={len(tokenizer)}")
    if instructions:  # the decoder's start, end and padding tokens, as generation reads them
        for name, value in (("decoder_start_token_id", tokenizer.bos_token_id),
                            ("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
            if getattr(model_config, name) is None:
                setattr(model_config, name, value)
    loader = MultiTaskLoader(config.data, tokenizer, MediaConfig.from_model(model_config),
                             {t: registry.skill_names(t) for t in model_config.tasks}, topology.rank,
                             topology.world_size)
    placement = _placement(config, model_config, loader, topology)
    ds = engine_config(config)
    if config.distributed.offload.skills == "inactive":
        offload_check(ds, registry.names if model_config.router == "skill" else [])
    resume = checkpoint.find_resume(config.checkpoint.resume, Path(config.run_dir) / "checkpoints", model_config,
                                    topology, placement and placement.to_dict(),
                                    check=functools.partial(_check_data, loader=loader))
    return Inputs(config, tokenizer, ds, resume, model_config, loader, placement)


def _check_data(resume: checkpoint.Resume, loader) -> checkpoint.Resume:
    """Refuse a checkpoint of another tokenizer, data seed or shards, in one line, before any heavy work; say
    whether the loader must deal out the saved run's leftovers (another data layout)."""
    folder = resume.folder
    saved, here = resume.meta.get("tokenizer"), fingerprint(loader.tokenizer)
    if saved is not None and saved != here:
        raise ValueError(f"checkpoint {folder} was trained with another tokenizer ({saved['size']} tokens, vocabulary "
                         f"hash {saved['sha'][:12]}) than this run's ({here['size']}, {here['sha'][:12]})")
    try:
        saved = torch.load(folder / "train_state_rank0.pt", weights_only=False)["loader"]
        loader.check_state(saved)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {folder}: train_state_rank0.pt: {e}") from None
    return dataclasses.replace(resume, reshard=loader.needs_reshard(saved))


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
    tasks = {t: sorted(skills) for t, skills in task_skills(config, model_config.registry).items()}
    weights = dict(zip(tasks, loader.probabilities))
    placement = skill_parallel.data_local(names, tasks, weights, p)
    loader.split_tasks(placement.task_slots, topology.rank % p)
    return placement


def task_skills(config: PretrainConfig, registry) -> dict[str, set[str]]:
    """The skills each task's steps run: its own, and for a contrastive task the caption task's too (its
    captions go through them)."""
    def skills(task: str) -> set[str]:
        own = set(registry.skill_names(task))
        if config.objective(task) == "contrastive":
            own |= set(registry.skill_names(config.train.caption_task))
        return own

    return {t.name: skills(t.name) for t in config.data.tasks}


def engine_config(config: PretrainConfig) -> dict:
    """The DeepSpeed config of the run. Under skill parallelism the ranks' backward graphs differ, so a
    step's gradients are reduced once, at its end (`optimizer_step(coalesce=True)`), which DeepSpeed
    counts as one micro-step."""
    accumulation = 1 if config.distributed.skill_parallel_size > 1 else config.train.gradient_accumulation
    return zero.engine_config(config.distributed.ds_config, config.train.micro_batch_size, accumulation,
                              config.train.grad_clip, zero.bf16_enabled(config.train.bf16),
                              config.distributed.ds_overrides, config.train.profile_comm)


def build_engine(config: PretrainConfig, model_config, ds: dict, placement):
    """The model built, split and wrapped (`training.parallelize`, which says in what order): (engine, skill
    layers of this rank, group at its position)."""
    from .build import build_model, split_skills

    engine, split = parallelize(functools.partial(build_model, model_config, config.train.seed), ds, config.optim,
                                config.train.steps, activation_checkpointing=config.train.activation_checkpointing,
                                split_skills=placement and functools.partial(split_skills, placement=placement),
                                rewarmup=config.pseudo_to_real.rewarmup(),
                                group_by_skill=config.distributed.offload.skills == "inactive")
    return (engine, *(split or ([], None)))


@dataclass
class Engine:
    """What is built around a model: the engine, this rank's skill layers (skill parallelism), ZeRO-3's trace
    switch, the objectives that call the model and the skill offloader (None unless skills are offloaded)."""
    engine: object
    skill_layers: list
    traces: TraceSwitch
    objectives: Objectives
    offload: SkillOffload | None = None


def model_at_resume(config: PretrainConfig, model_config, root: Path):
    """The model a run continues with: the real one (`skillnet.delink`) where the run delinks and the
    checkpoint it resumes from was written after delinking."""
    from skillnet.delink import delinked_config

    delink_at = config.pseudo_to_real.delink_at
    if delink_at is None:
        return model_config
    if not model_config.shares_layers:
        raise ValueError("pseudo_to_real.delink_at needs a model that shares layers (model.layer_sharing)")
    folder = checkpoint.resolve_resume(config.checkpoint.resume, root)
    meta = checkpoint.check_readable(folder) if folder is not None else None
    if meta is not None and (meta["step"] > delink_at or "delinked" in meta):
        return delinked_config(model_config)
    return model_config


class Pretraining:
    """The pretraining step, its logs and its train state (`state`, the loader's position, `window`).
    `build(model_config)` builds the `Engine` (again, for the real model, when the run delinks)."""

    def __init__(self, config: PretrainConfig, topology: Topology, model_config, loader, placement, build):
        self.config, self.topology, self.loader, self.placement, self.build = config, topology, loader, placement, build
        self.attach(build(model_config))
        self.device = distributed.device(topology)
        self.data_local = placement is not None and placement.task_slots is not None
        self.state = {"step": 0, "tokens_seen": 0, "samples_seen": 0}
        self.window = Window()
        self.comm = zero.internals.CommClock() if config.train.profile_comm else None
        self.batches = None
        self.samples = None
        if config.train.log_samples:
            (Path(config.run_dir) / "samples").mkdir(parents=True, exist_ok=True)
            self.samples = (Path(config.run_dir) / "samples" / f"rank{topology.rank}.jsonl").open("a", buffering=1)
        self.task_skills = task_skills(config, model_config.registry)
        self.counters = {"skill_norms": {}}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Since the last log: seconds waiting for data and computing, skill-exchange bytes, ZeRO-3 model calls
        and those along a complete trace; the last skill gradient norms stay."""
        self.counters = {"data_wait_s": 0.0, "compute_s": 0.0, "skill_bytes": 0, "calls": 0, "traced": 0,
                         "skill_norms": self.counters["skill_norms"], "since": time.perf_counter(), "steps": 0,
                         "tokens": 0, "samples": 0, "offload_peak": 0, "offload_copied_in": 0, "offload_misses": 0}

    @property
    def steps_done(self) -> int:
        return self.state["step"]

    def train_step(self, stop: Stop) -> tuple[dict, int]:
        """One optimizer step over `gradient_accumulation` micro-batches."""
        n, step = self.config.train.gradient_accumulation, self.state["step"]
        record, tokens, samples = {"loss": 0.0, "tasks": [], "data_wait_s": 0.0}, 0, 0
        self.batches = self.batches or iter(self.loader)

        def before_step():  # after the last backward, before the optimizer step
            if (step + 1) % self.config.train.log_every == 0:
                self.counters["skill_norms"] = skill_grad_norms(self.engine.module)
            if self.offload is not None:
                self.offload.before_optimizer_step()

        if self.offload is not None:  # the route of this step and the next is known: their skills come in
            first = self.loader.consumed
            self.offload.begin_step(self.skills_of_batches(first, n), self.skills_of_batches(first + n, n))

        with optimizer_step(self.engine, n, self.placement is not None, before_step) as backward:
            for micro in range(n):
                t0 = time.perf_counter()
                batch = next(self.batches)
                t1 = time.perf_counter()
                if not self.engine.module.training:  # set once: it walks every module
                    self.engine.train()
                # data-local: every position's task runs on every rank (a blank sample where not its own)
                group = (batch["group_tasks"], self.loader.group) if self.data_local else ()
                loss, stats = self.objectives.loss(self.engine, batch, step * n + micro, self.topology.rank,
                                                   self.device, *group)
                backward(loss)
                self.counters["data_wait_s"] += t1 - t0
                record["data_wait_s"] += t1 - t0  # the loader keeps up while this stays near zero
                self.counters["compute_s"] += time.perf_counter() - t1
                record["loss"] = record["loss"] + loss.detach() / n  # on the device: read when flushed
                record["tasks"].append(batch["group_tasks"] if self.data_local else batch["task"])
                self.window.add(batch["task"], loss, batch["skills"])
                tokens, samples = tokens + stats["tokens"], samples + len(batch["keys"])
                if self.samples is not None:
                    self.samples.write(json.dumps({"step": step + 1, "micro": micro, "task": batch["task"],
                                                   "keys": batch["keys"], "epochs": batch["epochs"]}) + "\n")
        sent = sum(layer.take_bytes_sent() for layer in self.skill_layers)
        (tokens, samples, sent), stopping = stop.sum_and_agree([tokens, samples, sent], self.device)
        self.state.update(step=step + 1, tokens_seen=self.state["tokens_seen"] + tokens,
                          samples_seen=self.state["samples_seen"] + samples)
        calls, traced = self.traces.take()
        for key, value in (("skill_bytes", sent), ("calls", calls), ("traced", traced), ("steps", 1),
                           ("tokens", tokens), ("samples", samples)):
            self.counters[key] += value
        record.update(grad_norm=self.grad_norm(), tokens=tokens, skill_bytes=sent,
                      zero3_calls=calls, zero3_traced=traced)
        if self.comm is not None:
            record["gathered_bytes"] = self.comm.read()  # this rank's
        if self.offload is not None:
            held = self.offload.take()
            record.update(offload_peak_bytes=held["peak"], offload_model_bytes=held["model"],
                          offload_copied_in_bytes=held["copied_in"], offload_misses=held["misses"])
            self.counters["offload_peak"] = max(self.counters["offload_peak"], held["peak"])
            self.counters["offload_copied_in"] += held["copied_in"]
            self.counters["offload_misses"] += held["misses"]
        if self.fresh_engine:  # what this rank's engine holds once its optimizer has stepped, by device
            record["state_bytes"], self.fresh_engine = zero.internals.state_bytes(self.engine), False
        return record, stopping

    def skills_of_batches(self, first: int, n: int) -> set[str]:
        """The skills the `n` batches from `first` on run (their tasks are drawn from the index alone)."""
        return set().union(*(self.task_skills[self.loader.task_for_batch(i)] for i in range(first, first + n)))

    def grad_norm(self) -> torch.Tensor | float:
        """The last step's gradient norm, left on the device (reading it would stop the host every step)."""
        norm = self.engine.get_global_grad_norm()
        return 0.0 if norm is None else norm.detach() if torch.is_tensor(norm) else float(norm)

    def scalars(self) -> dict:
        """The logging window's scalars, every rank's (under data-local placement they train different tasks)."""
        counts, elapsed = self.counters, time.perf_counter() - self.counters["since"]
        scalars, extra = self.window.scalars(skipped=self.loader.skipped)
        scalars.update({f"data/skipped/{r}": n for r, n in extra["skipped"].items()})
        scalars.update({"lr": self.engine.get_lr()[0], "grad_norm": float(self.grad_norm()),
                        "throughput/tokens_per_s": counts["tokens"] / elapsed,
                        "throughput/samples_per_s": counts["samples"] / elapsed,
                        "time/data_wait_s": counts["data_wait_s"], "time/compute_s": counts["compute_s"],
                        **memory_scalars()})
        if self.comm is not None:
            scalars["time/communication_s"] = self.comm.take_seconds()
            scalars["time/compute_s"] -= scalars["time/communication_s"]
        if self.placement is not None:
            scalars["skills/bytes_exchanged_per_step"] = counts["skill_bytes"] / max(1, counts["steps"])
        if self.offload is not None:  # skill offloading: the peak on the compute device, against the whole model
            scalars.update({"offload/peak_share": counts["offload_peak"] / self.offload.model_bytes,
                            "offload/copied_in_bytes_per_step": counts["offload_copied_in"] / max(1, counts["steps"]),
                            "offload/misses": counts["offload_misses"]})
        if counts["calls"]:  # model calls along a complete ZeRO-3 trace, which prefetch
            scalars["zero3/traced_call_share"] = counts["traced"] / counts["calls"]
        scalars.update({f"skills/grad_norm/{s}": v for s, v in counts["skill_norms"].items()})
        self.reset_counters()
        return scalars

    def after_step(self, step: int, last: bool) -> dict:
        return {}

    def close_loader(self) -> None:
        if self.batches is not None:
            self.batches.close()  # the DataLoader iterator it runs shuts its workers down
            self.batches = None

    def close(self) -> None:
        """Stop the loader's workers and close the sample log (on every way out of training)."""
        self.close_loader()
        if self.samples is not None:
            self.samples.close()

    def attach(self, built: Engine) -> None:
        self.engine, self.skill_layers = built.engine, built.skill_layers
        self.traces, self.objectives, self.offload = built.traces, built.objectives, built.offload
        self.fresh_engine = True

    def save(self) -> Path:
        state = {**self.state, "loader": self.loader.state_dict(), "window": self.window.state_dict()}
        folder = checkpoint.save(self.engine, Path(self.config.run_dir) / "checkpoints", self.state["step"], state,
                                 checkpoint.fingerprint(self.engine.module.config), self.config.checkpoint.keep_last,
                                 self.placement and self.placement.to_dict(),
                                 {"tokenizer": fingerprint(self.loader.tokenizer)})
        return self.delink(folder) if self.delinks_now() else folder

    def delinks_now(self) -> bool:
        return self.state["step"] == self.config.pseudo_to_real.delink_at and self.engine.module.config.shares_layers

    def delink(self, folder: Path) -> Path:
        """Pseudo-to-Real: the shared model's checkpoint `folder` (this step's) rewritten for the real model
        (`training.delink`) beside it, `<folder>-delinked`, and training goes on from there, as a run resumed
        from it would."""
        import torch.distributed as dist

        from skillnet.delink import delinked_config
        from training.delink import delink

        out = folder.with_name(folder.name + "-delinked")
        real = delinked_config(self.engine.module.config)
        if not (out / checkpoint.COMPLETE).exists():
            checkpoint.ensure_universal(folder)  # a collective: every rank converts a share
        if self.topology.is_main:
            if not (out / checkpoint.COMPLETE).exists():
                delink(folder, out, self.config.pseudo_to_real.moments, progress=True)
            real.save_pretrained(self.config.run_dir)
        dist.barrier()
        self.close_loader()
        zero.release(self.engine)
        self.attach(self.build(real))
        resume = checkpoint.Resume(out, checkpoint.check_readable(out), universal=True)
        self.resume(resume)
        if self.topology.is_main:
            print(f"delinked {folder.name} into the real model ({self.config.pseudo_to_real.moments} moments): "
                  f"{out}", file=sys.stderr)
        return out

    def resume(self, resume: checkpoint.Resume) -> None:
        """Continue from a checkpoint; one of another layout is mapped: the loader deals out what every saving
        rank had left of its epochs, and rank 0 carries every rank's log window."""
        states = checkpoint.load(self.engine, resume.folder, resume.universal, every_rank=resume.reshard)
        rank = self.topology.rank
        if resume.reshard:
            self.loader.reshard([states[r]["loader"] for r in sorted(states)])
        else:
            self.loader.load_state_dict(states[rank]["loader"])
        windows = [s["window"] for s in states.values() if "window" in s]  # absent before the window was kept
        if resume.universal or resume.reshard:
            windows = [Window.summed(windows)] if rank == 0 else []
        if windows:
            self.window.load_state_dict(windows[0])
        first = states[min(states)]
        self.state.update({k: first[k] for k in self.state})


def train(prepared: Inputs, topology: Topology) -> dict:
    config, model_config, tokenizer = prepared.config, prepared.model_config, prepared.tokenizer
    loader, resume, placement = prepared.loader, prepared.resume, prepared.placement
    distributed.init(topology)  # joined already by `main`, which reports a device error in one line
    checkpoint.agree_on_resume(resume and resume.folder)
    run_dir = Path(config.run_dir)
    if topology.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(config, run_dir / "config.yaml")
        model_config.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir / "tokenizer")
        if placement is not None:
            (run_dir / "skill_placement.json").write_text(json.dumps(placement.to_dict(), indent=1))

    def build(model_config) -> Engine:
        engine, skill_layers, data_group = build_engine(config, model_config, prepared.ds, placement)
        torch.manual_seed(config.train.seed + topology.rank)  # dropout differs per rank; the weights do not
        traces = TraceSwitch(engine, config.distributed.trace_per_call)
        data_local = placement is not None and placement.task_slots is not None
        # data-local: the ranks at one position share a task, so contrastive negatives come from them
        objectives = Objectives(config, tokenizer, model_config, data_group if data_local else None, traces.select)
        offload = (SkillOffload(engine, distributed.device(topology))
                   if config.distributed.offload.skills == "inactive" else None)
        return Engine(engine, skill_layers, traces, objectives, offload)

    run = Pretraining(config, topology, model_config, loader, placement, build)
    if resume is not None:
        start = time.perf_counter()
        run.resume(resume)
        if topology.is_main:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            print(f"resumed {resume.folder.name} in {time.perf_counter() - start:.2f} s (rank 0's peak resident "
                  f"memory so far {peak:.2f} GiB)", file=sys.stderr)
        if run.delinks_now():  # stopped after saving the shared model, before delinking it
            run.delink(resume.folder)
    metrics = Metrics(run_dir, topology.is_main, config.train.steps, run.steps_done, "pretraining")
    try:
        delink_at = config.pseudo_to_real.delink_at
        result = train_loop(run, config.train.steps, config.train.log_every, config.checkpoint.every, metrics,
                            topology.is_main, checkpoint_at=() if delink_at is None else (delink_at,))
    finally:
        run.close()
        zero.release(run.engine)
    skipped = summed_over_ranks(skipped=loader.skipped)["skipped"]
    return {**result, "run_dir": run_dir, "skipped": {k: int(v) for k, v in skipped.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a pretraining YAML (pretrain/configs/*.yaml) or its name")
    parser.add_argument("overrides", nargs="*", help="key=value settings, dotted (optim.lr=1e-4)")
    args = parser.parse_args(argv)
    topology = detect()
    return run(lambda: prepare(load_pretrain_config(args.config, args.overrides), topology),
               lambda inputs: _train(inputs, topology))


def _train(inputs: Inputs, topology: Topology) -> int:
    from data_pipeline.stream import DataError

    config = inputs.config
    try:
        result = train(inputs, topology)
    except DataError as e:  # raised in a loader worker: its message, without the worker's traceback
        return refuse(DataError.one_line(e))
    if topology.is_main:
        stopped = " (stopped by signal, checkpointed" + (", requeued)" if result["requeued"] else ")")
        print(f"trained to step {result['step']}" + (stopped if result["stopped"] else ""))
        if result["skipped"]:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(result["skipped"].items(), key=lambda kv: -kv[1]))
            print(f"skipped {sum(result['skipped'].values())} unusable samples: {reasons} (the log names each)")
        print(f"checkpoint:  {result['checkpoint']}")
        print(f"tensorboard: {result['run_dir'] / 'tensorboard'}")
    return exit_status(result, config.train.steps)
