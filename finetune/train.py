"""Finetune a SkillNet model on one or several downstream tasks, each running only its own skills.

    python -m finetune --config finetune/configs/<task>.yaml --init <exported folder> [key=value ...]
    accelerate launch -m finetune --config ... --init ...      # several processes; DeepSpeed via accelerate

Every step trains one task (drawn by the alpha rule from a shared seed, so every process agrees), with
that task's skills and head. The model, its heads and task table are saved as a Hugging Face folder;
each task's metric goes to TensorBoard and to `results.json`, its evaluation predictions to
`predictions/<task>.jsonl`. Exit status 2 on bad input, before any training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import torch

from pretrain.train import clear_gradient_partitions

from .config import FinetuneConfig, dump, load_finetune_config
from .data import TaskData, collate
from .predict import gold, predict, score


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


def prepare(config: FinetuneConfig):
    """Everything that can fail on bad input: the model, tokenizer and every task's data, checked."""
    from data_pipeline.media import MediaConfig
    from skillnet.tokenizer import load_tokenizer

    if not config.init:
        raise ValueError("no model to start from: pass --init <exported folder> (or set init: in the config)")
    model, trainable = build_model(config)
    tokenizer = load_tokenizer(config.tokenizer or config.init)
    media = MediaConfig.from_model(model.config)
    train, evaluation = {}, {}
    for task in config.tasks:
        spec = model.config.task_heads[task.name]
        train[task.name] = TaskData(task.name, spec, task.data, tokenizer, "train", media=media)
        if task.data.validation:
            evaluation[task.name] = TaskData(task.name, spec, task.data, tokenizer, "validation", media=media)
    return model, trainable, tokenizer, train, evaluation


class TaskBatches:
    """Endless shuffled batches of one task; a new order every pass, from the shared seed."""

    def __init__(self, data: TaskData, batch_size: int, seed: int, accelerator):
        from torch.utils.data import DataLoader

        self.loader = accelerator.prepare(DataLoader(
            data.examples, batch_size=batch_size, shuffle=True, drop_last=len(data.examples) > batch_size,
            collate_fn=lambda examples: collate(examples, data.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(seed)))
        self.iterator = iter(self.loader)

    def __next__(self) -> dict:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)


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


def _full_parameters(model, zero3: bool):
    """Under ZeRO-3 the whole model gathered on every process (heads read their weights outside forward)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def train(config: FinetuneConfig, prepared) -> dict:
    from accelerate import Accelerator, InitProcessGroupKwargs
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    model, trainable, tokenizer, train_data, evaluation = prepared
    # several processes without a GPU: accelerate's DeepSpeed mode must be told to join them over gloo
    on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu else [])
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:  # `accelerate launch --use_deepspeed`: the batch and clipping go to its config
        deepspeed.deepspeed_config.update(train_micro_batch_size_per_gpu=config.train.batch_size,
                                          gradient_accumulation_steps=1, gradient_clipping=config.optim.grad_clip,
                                          train_batch_size=config.train.batch_size * accelerator.num_processes)
    zero3 = deepspeed is not None and deepspeed.zero_stage == 3
    torch.manual_seed(config.train.seed)
    out = Path(config.output_dir)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump(config, out / "finetune_config.yaml")
    params = [p for n, p in model.named_parameters() if n in trainable]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    steps, warmup = config.train.steps, config.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = {t: TaskBatches(d, config.train.batch_size, config.train.seed, accelerator) for t, d in train_data.items()}
    names = list(train_data)
    weights = [len(train_data[t].examples) ** config.train.alpha for t in names]
    draw = random.Random(config.train.seed)  # the same task on every process
    writer = SummaryWriter(str(out / "tensorboard")) if main else None
    results, losses = {}, {t: [] for t in names}
    bar = tqdm(range(1, steps + 1), desc="finetuning", disable=not main, dynamic_ncols=True)
    for step in bar:
        task = draw.choices(names, weights)[0]
        batch = next(batches[task])
        batch.pop("meta", None)
        model.train()
        loss = model(task=task, **batch).loss
        accelerator.backward(loss)
        if config.optim.grad_clip and deepspeed is None:
            accelerator.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if deepspeed is not None:  # the other tasks' heads and skills must not replay old gradients
            clear_gradient_partitions(model)
        losses[task].append(loss.item())
        if main and step % config.train.log_every == 0:
            for t, values in losses.items():
                if values:
                    writer.add_scalar(f"loss/{t}", sum(values) / len(values), step)
            writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
            losses = {t: [] for t in names}
        if evaluation and (step == steps or (config.train.eval_every and step % config.train.eval_every == 0)):
            with _full_parameters(accelerator.unwrap_model(model), zero3):  # every process evaluates all of it
                results = evaluate(accelerator.unwrap_model(model), evaluation, config.train.eval_batch_size,
                                   out if main and step == steps else None)
            if main:
                for t, metrics in results.items():
                    for name, value in metrics.items():
                        writer.add_scalar(f"eval/{t}/{name}", value, step)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    with _full_parameters(model, zero3):  # every process joins the gathering of ZeRO-3's partitions
        state = {k: v.detach().clone() for k, v in model.state_dict().items()} if main else None
    if main:
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        fields = {t.name: dataclasses.asdict(t.data) for t in config.tasks}
        (out / "task_data.json").write_text(json.dumps(fields, indent=1))
        # examples left out: cut off by max_length (tagging, spans) or corrupt media, per task and split
        dropped = {f"{t}/{split}": d.dropped for split, datas in (("train", train_data), ("validation", evaluation))
                   for t, d in datas.items() if d.dropped}
        for name, n in dropped.items():
            print(f"warning: {name}: {n} examples left out (cut off by data.max_length, or undecodable)", file=sys.stderr)
        (out / "results.json").write_text(json.dumps({"step": steps, "results": results, "dropped": dropped}, indent=1))
        writer.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a finetuning YAML (finetune/configs/*.yaml) or its name")
    parser.add_argument("--init", help="the model folder to start from (an export of pretraining, or a finetuned model)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, dotted (train.steps=200)")
    args = parser.parse_args(argv)
    try:
        config = load_finetune_config(args.config, args.overrides)
        if args.init:
            config.init = args.init
        prepared = prepare(config)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = train(config, prepared)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finetuned model: {config.output_dir}")
        for task, metrics in results.items():
            print(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
