"""Finetune a SkillNet model on one or several downstream tasks, each running only its own skills.

    python -m finetune --config finetune/configs/<task>.yaml --init <exported folder> [key=value ...]
    torchrun --nproc_per_node 2 -m finetune --config ... --init ...          # local ranks
    accelerate launch --use_deepspeed --zero_stage 3 -m finetune --config ... --init ...
    sbatch slurm/finetune.sh                                                  # under Slurm

Every step trains one task (drawn by the alpha rule from the shared seed and the step, so every process
agrees and a resumed run draws the same), with that task's skills and head, on a DeepSpeed engine (the
config's `distributed.ds_config`, or accelerate's DeepSpeed settings under `accelerate launch`).
Checkpoints go to `output_dir/checkpoints` every `checkpoint.every` steps, on SIGUSR1/SIGTERM and at the
end; `checkpoint.resume: auto` continues from the newest. At the end the model, its heads and task table
are saved as a Hugging Face folder; each task's metric goes to TensorBoard and `results.json`, its
evaluation predictions to `predictions/<task>.jsonl`. Exit status 2 on bad input, before any training;
3 when a signal stopped it early.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from skillnet.heads import head_for
from skillnet.hub import save_model_code, write_model_card
from training import checkpoint, distributed, zero
from training.distributed import Topology, detect
from training.loop import train_loop
from training.metrics import Metrics, Window
from training.parallelize import parallelize
from training.run import Prepared, exit_status, run
from training.sampling import TaskSampler, seeded
from training.signals import Stop
from training.step import optimizer_step

from .config import FinetuneConfig, dump, load_finetune_config
from .data import TaskData, collate
from .predict import gold, predict, score

MODEL_KEYS = (*checkpoint.MODEL_KEYS, "tasks", "task_heads")
"""What a resumed finetuning model shares with its checkpoint: the pretraining keys, tasks and heads."""


def _check_init(folder: Path) -> None:
    config = folder / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("model_type") != "skillnet" or \
            not any(folder.glob("*.safetensors")):
        raise ValueError(f"--init {folder} is not an exported SkillNet model (a folder with a skillnet config.json "
                         "and safetensors weights, as `python -m pretrain.export` writes)")


def build_model(config: FinetuneConfig):
    """The model from `init` with the new skills, tasks and heads of `config`; with `freeze_old`, only new
    skills and heads train. Returns (model, names of trainable parameters)."""
    from skillnet import SkillNetForMultiTask

    init = Path(config.init)
    _check_init(init)
    model = SkillNetForMultiTask.from_pretrained(init)
    old = {name for name, _ in model.named_parameters()}
    for skill in config.new_skills:
        model.add_skill(skill.name, skill.description, skill.init_from)
    for task in config.tasks:
        if task.skills is not None:
            model.add_task(task.name, task.skills)
        elif task.name not in model.config.tasks:
            raise ValueError(f"task {task.name!r} is not in the model's task table: give its skills "
                             f"(tasks[].skills, from {model.registry.names})")
        head = {**task.head, **({"prompts": task.prompts} if task.prompts else {})}
        existing = model.config.task_heads.get(task.name)
        if existing is None:
            model.add_head(task.name, head)
        elif {**existing, **head} != existing:
            raise ValueError(f"task {task.name!r}: the model's head {existing} does not fit the config's {head}")
    trainable = {name for name, _ in model.named_parameters()}
    if config.freeze_old:
        own = tuple(f"{kind}.{t.name}." for t in config.tasks for kind in ("heads", "prompts"))
        trainable = {n for n in trainable if n not in old or n.startswith(own)}
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    return model, trainable


@dataclass
class Inputs(Prepared):
    """What finetuning checked before any process group: besides the shared parts, the model (loaded, with
    this run's skills, tasks and heads) and every task's training and evaluation data."""
    model: object
    train: dict
    evaluation: dict


def prepare(config: FinetuneConfig) -> Inputs:
    """Everything that can fail on bad input: the model, tokenizer and every task's data, checked."""
    from data_pipeline.media import MediaConfig
    from skillnet.tokenizer import load_tokenizer

    if not config.init:
        raise ValueError("no model to start from: pass --init <exported folder> (or set init: in the config)")
    distributed.check_accelerator(detect())
    torch.manual_seed(config.train.seed)  # new heads, prompts and skills start the same on every rank and run
    model, _ = build_model(config)
    tokenizer = load_tokenizer(config.tokenizer or config.init)
    heads = [head_for(task.name, model.config.task_heads[task.name]) for task in config.tasks]
    new_tokens = [t for head in heads for t in head.new_tokens() if t not in tokenizer.get_vocab()]
    if new_tokens:  # e.g. the location tokens of box templates
        if config.freeze_old:
            raise ValueError(f"freeze_old keeps the token embeddings as they were: the {len(set(new_tokens))} tokens "
                             f"this run's heads add ({new_tokens[0]}, ...) would never train")
        tokenizer.add_tokens(list(dict.fromkeys(new_tokens)))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    media = MediaConfig.from_model(model.config)
    train, evaluation = {}, {}
    for task in config.tasks:
        spec = model.config.task_heads[task.name]
        train[task.name] = TaskData(task.name, spec, task.data, tokenizer, "train", media=media)
        if task.data.validation:
            evaluation[task.name] = TaskData(task.name, spec, task.data, tokenizer, "validation", media=media)
    ds = zero.engine_config(config.distributed.ds_config, config.train.batch_size, config.train.gradient_accumulation,
                            config.optim.grad_clip, zero.bf16_enabled(config.train.bf16),
                            config.distributed.ds_overrides)
    resume = checkpoint.find_resume(config.checkpoint.resume, Path(config.output_dir) / "checkpoints", model.config,
                                    detect(), model_keys=MODEL_KEYS)
    return Inputs(config, tokenizer, ds, resume, model, train, evaluation)


class TaskBatches:
    """Endless batches of one task: pass e visits the examples in an order drawn from (seed, task, e); each
    step takes the next `batch_size x processes` of them, this process its own `batch_size`. Its position
    (pass, examples taken) is part of the train state, so a resumed run continues with the batch the
    uninterrupted one would, and one with another number of processes with the examples after it."""

    def __init__(self, data: TaskData, batch_size: int, seed: int, rank: int, world: int):
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world
        self.position = {"epoch": 0, "offset": 0}
        self.order: tuple[int, list[int]] | None = None

    def load_position(self, position: dict, saved_world: int) -> None:
        """A saved position (one written before offsets were kept counts batches of the saving run's size)."""
        offset = position.get("offset", position.get("batch", 0) * self.batch_size * saved_world)
        self.position = {"epoch": position["epoch"], "offset": offset}

    def __next__(self) -> dict:
        n, per_step = len(self.data.examples), self.batch_size * self.world
        if self.position["offset"] and self.position["offset"] + per_step > n:  # a pass ends before a batch
            self.position = {"epoch": self.position["epoch"] + 1, "offset": 0}  # would repeat examples
        epoch = self.position["epoch"]
        if self.order is None or self.order[0] != epoch:
            order = list(range(n))
            seeded(self.seed, self.data.task, "epoch", epoch).shuffle(order)
            self.order = (epoch, order)
        start = self.position["offset"] + self.rank * self.batch_size
        self.position["offset"] += per_step
        examples = [self.data.examples[self.order[1][(start + i) % n]] for i in range(self.batch_size)]
        batch = collate(examples, self.data.tokenizer.pad_token_id)
        batch.pop("meta", None)
        return batch


class Finetuning:
    """The finetuning step, evaluation and train state (step, each task's batch position, log window)."""

    def __init__(self, config: FinetuneConfig, topology: Topology, engine, train_data: dict, evaluation: dict,
                 zero3: bool):
        self.config, self.topology, self.engine = config, topology, engine
        self.evaluation, self.zero3 = evaluation, zero3
        self.device = distributed.device(topology)
        names = list(train_data)
        self.sampler = TaskSampler(names, [len(train_data[t].examples) for t in names], config.train.alpha,
                                   config.train.seed)
        self.batches = {t: TaskBatches(d, config.train.batch_size, config.train.seed, topology.rank,
                                       topology.world_size) for t, d in train_data.items()}
        self.skills = {t: engine.module.registry.skill_names(t) for t in names}
        self.state = {"step": 0}
        self.window = Window()
        self.results: dict = {}

    @property
    def steps_done(self) -> int:
        return self.state["step"]

    def train_step(self, stop: Stop) -> tuple[dict, int]:
        step, n = self.state["step"], self.config.train.gradient_accumulation
        task = self.sampler.task(step)
        record = {"loss": 0.0, "task": task}
        with optimizer_step(self.engine, n) as backward:
            for _ in range(n):
                batch = distributed.to_device(next(self.batches[task]), self.device)
                if not self.engine.module.training:  # set once: it walks every module
                    self.engine.train()
                loss = self.engine(task=task, **batch).loss
                backward(loss)
                record["loss"] = record["loss"] + loss.detach() / n
                self.window.add(task, loss, self.skills[task])
        _, stopping = stop.sum_and_agree([], self.device)
        self.state["step"] = step + 1
        return record, stopping

    def scalars(self) -> dict:
        scalars, _ = self.window.scalars()
        return {**scalars, "lr": self.engine.get_lr()[0]}

    def after_step(self, step: int, last: bool) -> dict:
        every = self.config.train.eval_every
        if not self.evaluation or not (last or (every and step % every == 0)):
            return {}
        out = Path(self.config.output_dir) if last and self.topology.is_main else None
        with zero.full_parameters(self.engine.module, self.zero3):  # every process evaluates all of it
            self.results = evaluate(self.engine.module, self.evaluation, self.config.train.eval_batch_size, out)
        return {f"eval/{t}/{name}": value for t, metrics in self.results.items() for name, value in metrics.items()}

    def save(self) -> Path:
        state = {**self.state, "window": self.window.state_dict(),
                 "batches": {t: dict(b.position) for t, b in self.batches.items()}}
        return checkpoint.save(self.engine, Path(self.config.output_dir) / "checkpoints", self.state["step"], state,
                               checkpoint.fingerprint(self.engine.module.config), self.config.checkpoint.keep_last)

    def resume(self, resume: checkpoint.Resume) -> None:
        """Continue from a checkpoint, written by this number of processes or another (then rank 0 carries
        every saving rank's log window)."""
        resize, saved_world = resume.universal, resume.meta["world_size"]
        states = checkpoint.load(self.engine, resume.folder, resize)
        state = states[min(states)]
        windows = [s["window"] for s in states.values()]
        if not resize or self.topology.rank == 0:
            self.window.load_state_dict(Window.summed(windows))
        for task, position in state["batches"].items():
            self.batches[task].load_position(position, saved_world)
        self.state["step"] = state["step"]


def evaluate(model, evaluation: dict, batch_size: int, out_dir: Path | None = None) -> dict:
    results = {}
    for task, data in evaluation.items():
        predictions = predict(model, data, batch_size)
        results[task] = score(data.spec["type"], predictions, gold(data))
        if out_dir is not None:
            (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"prediction": p}) for p in predictions]
            (out_dir / "predictions" / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return results


def train(prepared: Inputs) -> dict:
    """Train to `train.steps` (or a stop signal); returns {step, stopped, requeued, results}."""
    config, train_data, evaluation, resume, ds = (prepared.config, prepared.train, prepared.evaluation,
                                                  prepared.resume, prepared.ds)
    topology = detect()
    distributed.init(topology)  # joined already by `main`, which reports a device error in one line
    checkpoint.agree_on_resume(resume and resume.folder)
    out = Path(config.output_dir)
    if topology.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump(config, out / "finetune_config.yaml")
    # loaded whole from its folder; ZeRO-3 partitions it when the engine starts
    engine, _ = parallelize(lambda _: prepared.model, ds, config.optim, config.train.steps)
    torch.manual_seed(config.train.seed + topology.rank)  # dropout differs per rank; the weights do not
    run = Finetuning(config, topology, engine, train_data, evaluation, zero.zero_stage(ds) == 3)
    if resume is not None:
        run.resume(resume)
    metrics = Metrics(out, topology.is_main, config.train.steps, run.steps_done, "finetuning")
    try:
        result = train_loop(run, config.train.steps, config.train.log_every, config.checkpoint.every, metrics,
                            topology.is_main)
        if result["step"] >= config.train.steps:
            if evaluation and not run.results:  # resumed from the last step's checkpoint
                run.after_step(result["step"], last=True)
            _save_model(config, run, prepared.tokenizer, train_data, evaluation)
    finally:
        zero.release(engine)
    return {**result, "results": run.results}


def _save_model(config: FinetuneConfig, run: Finetuning, tokenizer, train_data: dict, evaluation: dict) -> None:
    """The finetuned model as a Hugging Face folder, with its tokenizer, data fields and results, its code
    (`trust_remote_code=True` loads it without `skillnet`) and a model card."""
    out, model = Path(config.output_dir), run.engine.module
    with zero.full_parameters(model, run.zero3):  # every process joins the gathering of ZeRO-3's partitions
        state = {k: v.detach().clone() for k, v in model.state_dict().items()} if run.topology.is_main else None
    if not run.topology.is_main:
        return
    model.save_pretrained(out, state_dict=state)
    tokenizer.model_max_length = model.config.max_position_embeddings  # `truncation=True` fits the model
    tokenizer.save_pretrained(out)
    fields = {t.name: dataclasses.asdict(t.data) for t in config.tasks}
    (out / "task_data.json").write_text(json.dumps(fields, indent=1))
    # examples left out: cut off by max_length (tagging, spans) or corrupt media, per task and split
    dropped = {f"{t}/{split}": d.dropped for split, datas in (("train", train_data), ("validation", evaluation))
               for t, d in datas.items() if d.dropped}
    for name, n in dropped.items():
        print(f"warning: {name}: {n} examples left out (cut off by data.max_length, or undecodable)", file=sys.stderr)
    (out / "results.json").write_text(json.dumps({"step": run.steps_done, "results": run.results, "dropped": dropped},
                                                 indent=1))
    save_model_code(out)
    data = {t.name: [f"{split}: {path}" for split, path in (("train", t.data.train), ("validation", t.data.validation))
                     if path] for t in config.tasks}
    write_model_card(out, (out / "finetune_config.yaml").read_text(), data, run.results,
                     f"Validation metrics after step {run.steps_done} (`results.json`).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a finetuning YAML (finetune/configs/*.yaml) or its name")
    parser.add_argument("--init",
                        help="the model folder to start from (an export of pretraining, or a finetuned model)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, dotted (train.steps=200)")
    args = parser.parse_args(argv)

    def prepared() -> Inputs:
        config = load_finetune_config(args.config, args.overrides)
        config.init = args.init or config.init
        return prepare(config)

    return run(prepared, _train)


def _train(inputs: Inputs) -> int:
    config = inputs.config
    result = train(inputs)
    if detect().is_main:
        if result["step"] >= config.train.steps:
            print(f"finetuned model: {config.output_dir}")
            for task, metrics in result["results"].items():
                print(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        else:
            print(f"finetuned to step {result['step']} (stopped by signal, checkpointed"
                  + (", requeued)" if result["requeued"] else ")"))
        print(f"checkpoint:  {result['checkpoint']}")
    return exit_status(result, config.train.steps)
