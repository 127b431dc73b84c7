"""The training step on one GPU: the trainer's DeepSpeed engines (ZeRO-2, ZeRO-3) against a plain PyTorch
loop of the same model, at `multimodal-base`'s shipped per-GPU batch.

    python benchmarks/gpu_step.py                      # about 3 minutes on one GPU
    python benchmarks/gpu_step.py --objectives mlm --rounds 2 --batch 64

For masked-token prediction (32 x 256 tokens), image-caption pairs (32 images of 224px, 32-token
captions) and video-caption pairs (32 clips of 8 frames) it prints, per way of stepping: ms per step (every
way built first, then timed in rounds of 3 steps each in turn, the host free to run ahead within them;
the median over rounds), TFLOP/s (model FLOPs of one forward
and backward, counted by `torch.utils.flop_counter`, no recompute), MFU (against the GPU's dense bf16
peak), peak memory, host synchronisations per step (`torch.cuda.set_sync_debug_mode`) and the attention
kernel the profiler saw. The engine rows run the trainer's own step (`Pretraining.train_step`: the
objectives, the engine, the ranks' stop agreement, the logs' window) on synthetic batches in the loader's
format; the plain rows run the same objectives on the model under autocast bf16 with fused AdamW
(`--compile` adds one with `torch.compile`). Then the skill layer (k=2 of 7 skills) against one dense
FFN and against DeepSpeed's MoE (top-2 of 7 experts), forward and backward in bf16; and serving the
default task from the full encoder against the encoder extracted for it (`model.extract`): tokens per second
and the weights' memory.

Without a GPU it says so in one line; `--device cpu` measures the same rows on the CPU (where compute is
tiny, what is left is host work: see `benchmarks/pretrain_step.py --proxy`).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peaks from the datasheets (SXM parts)."""

OBJECTIVES = {"mlm": "masked_lm", "image": "image", "video": "video"}


def synthetic_batch(kind: str, size: int, tokens: int, model_config, registry) -> dict:
    """One batch as the loader yields it (`data_pipeline.loader`: the collated inputs, then the task's
    fields), of random content."""
    g = torch.Generator().manual_seed(0)
    task = OBJECTIVES[kind]
    batch = {"keys": [f"k{i}" for i in range(size)], "epochs": [0] * size, "task": task,
             "modality": "text" if kind == "mlm" else kind, "skills": registry.skill_names(task)}
    vocab = model_config.vocab_size
    if kind == "mlm":
        batch["input_ids"] = torch.randint(7, vocab, (size, tokens), generator=g)
        batch["attention_mask"] = torch.ones(size, tokens, dtype=torch.long)
        return batch
    batch["caption_input_ids"] = torch.randint(7, vocab, (size, 32), generator=g)
    batch["caption_attention_mask"] = torch.ones(size, 32, dtype=torch.long)
    pixels = (size, model_config.num_channels, model_config.image_size, model_config.image_size)
    if kind == "video":
        pixels = (size, model_config.num_frames, *pixels[1:])
    batch["pixel_values" if kind == "image" else "pixel_values_videos"] = torch.randint(0, 256, pixels,
                                                                                         dtype=torch.uint8, generator=g)
    return batch


class Batches:
    """The loader's stand-in: the same batch again and again."""

    def __init__(self, batch: dict):
        self.batch, self.skipped = batch, Counter()

    def __iter__(self):
        while True:
            yield self.batch


def _tokenizer(folder: Path):
    from skillnet.tokenizer import train_tokenizer

    return train_tokenizer(["a red circle on the left of a blue square"] * 50, vocab_size=300, out_dir=folder)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device) -> float:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0.0


def _timed(step, steps: int, device) -> float:
    """Mean seconds per step over `steps` steps after three warm-up steps, the host free to run ahead."""
    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _interleaved(steps: dict, rounds: int, block: int, device) -> dict:
    """Seconds per step of each step function: rounds in which every one runs `block` steps in turn (the
    host free to run ahead inside a block); the median over rounds, so that drifts in the machine's speed
    hit all alike."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / block)
    return {name: statistics.median(t) for name, t in times.items()}


def _host_syncs(step, device) -> float | None:
    """Host synchronisations per step, as CUDA's sync debug mode reports them (mean of two steps)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                step()
            _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen) / 2


def _attention_kernel(step, device) -> str:
    """The most frequent attention kernel a step launches."""
    if device.type != "cuda":
        return "-"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    names = Counter(e.name for e in prof.events() if e.device_type.name == "CUDA" and any(
        k in e.name.lower() for k in ("flash", "fmha", "attention", "attn", "sdpa")))
    return names.most_common(1)[0][0][:70] if names else "none seen"


def _model_flops(model_config, objectives, batch, device) -> float:
    """FLOPs of one forward and backward of the model on `batch` (the objective's call)."""
    from torch.utils.flop_counter import FlopCounterMode

    from skillnet import SkillNetForPreTraining

    torch.manual_seed(0)
    model = SkillNetForPreTraining(model_config).to(device)
    with FlopCounterMode(display=False) as counter:
        with _autocast(device):
            loss, _ = objectives.loss(model, batch, 0, 0, device)
        loss.backward()
    del model
    return float(counter.get_total_flops())


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _row(name, seconds, flops, peak, memory, syncs, kernel) -> dict:
    tflops = flops / seconds / 1e12
    return {"step": name, "ms": seconds * 1e3, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "memory": memory, "syncs": syncs, "kernel": kernel}


def _warm(step, device, before: float) -> float | None:
    """Three warm-up steps; the peak memory they reached above `before` (what was allocated before the
    step's model was built), in GiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None


def engine_steps(mode: str, config, model_config, tokenizer, batches: dict, device) -> tuple[dict, list]:
    """The trainer's step on its engine (`mode`: a shipped DeepSpeed config), one per objective, warmed up:
    ({objective: (step, peak memory)}, what to release at the end)."""
    from pretrain.objectives import Objectives
    from pretrain.train import Engine, Pretraining, build_engine, engine_config
    from training.distributed import Topology
    from training.signals import Stop
    from training.zero.traces import TraceSwitch

    before = _allocated(device)
    config.distributed.ds_config = f"ds_configs/{mode}.json"
    engine, _, _ = build_engine(config, model_config, engine_config(config), None)
    traces = TraceSwitch(engine, config.distributed.trace_per_call)
    objectives = Objectives(config, tokenizer, model_config, None, traces.select)
    built = Engine(engine, [], traces, objectives)
    stop, steps, runs = Stop(), {}, []
    for kind, batch in batches.items():
        run = Pretraining(config, Topology(0, 1, 0), model_config, Batches(batch), None, lambda _: built)
        step = functools.partial(run.train_step, stop)
        steps[kind] = (step, _warm(step, device, before))
        runs.append(run)
    return steps, [engine, *runs]


def plain_steps(compiled: bool, config, model_config, tokenizer, batches: dict, device) -> dict:
    """The same objectives on the bare model: autocast bf16, fused AdamW, gradient clipping; one
    step per objective, warmed up: {objective: (step, peak memory)}."""
    from pretrain.objectives import Objectives
    from skillnet import SkillNetForPreTraining

    before = _allocated(device)
    torch.manual_seed(0)
    model = SkillNetForPreTraining(model_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    call = torch.compile(model) if compiled else model
    objectives, steps = Objectives(config, tokenizer, model_config), {}
    for kind, batch in batches.items():
        def step(batch=batch):
            with _autocast(device):
                loss, _ = objectives.loss(call, batch, 0, 0, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[kind] = (step, _warm(step, device, before))
    return steps


def skill_layer_rows(device, repeats: int = 10) -> list[tuple]:
    """Forward and backward in bf16 of k=2 of 7 skills, one dense FFN and DeepSpeed's MoE (top-2 of 7)."""
    from deepspeed.moe.layer import MoE

    from skillnet.layers import FFN, SkillFFN
    from skillnet.skills import Route

    h, f = 768, 3072
    dense = FFN(h, f, "gelu").to(device, torch.bfloat16)
    skills = SkillFFN([f"s{i}" for i in range(7)], h, f, "gelu").to(device, torch.bfloat16)
    moe = MoE(h, FFN(h, f, "gelu"), num_experts=7, ep_size=1, k=2).to(device, torch.bfloat16)
    route = Route([(None, (0, 6))])
    variants = {"dense": dense, "skills": lambda x: skills(x, route), "moe": lambda x: moe(x)[0]}
    rows = []
    for tokens in (4096, 16384, 65536):
        x = torch.randn(8, tokens // 8, h, device=device, dtype=torch.bfloat16, requires_grad=True)
        best = {}
        for name, fn in variants.items():
            def step(fn=fn):
                fn(x).float().sum().backward()
            best[name] = _timed(step, repeats, device)
        rows.append((tokens, best["dense"], best["skills"], best["moe"]))
    return rows


def serving_row(model_config, device, batch: int, tokens: int, repeats: int = 5) -> tuple:
    """Serving one task (the config's default one), forward only in bf16 on `batch` x `tokens`: (task, tokens per
    second and weights' memory in GiB of the full encoder, the same of the encoder extracted for the task)."""
    from skillnet import SkillNetModel

    task = model_config.default_task
    dtype = torch.bfloat16
    full = SkillNetModel(model_config).to(device, dtype).eval()
    extracted = full.extract([task])
    ids = torch.randint(7, model_config.vocab_size, (batch, tokens), device=device)
    row = [task]
    for model in (full, extracted):
        def step(model=model):
            with torch.no_grad():
                model(input_ids=ids, task=task)
        seconds = _timed(step, repeats, device)
        row += [ids.numel() / seconds, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30]
    return tuple(row)


def _print_table(results: dict[str, list[dict]], kinds: dict[str, str]) -> None:
    print("| objective | step | ms / step | TFLOP/s | MFU | peak GiB | host syncs / step | attention kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, rows in results.items():
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            memory = f"{r['memory']:.1f}" if r["memory"] is not None else "-"
            syncs = f"{r['syncs']:.1f}" if r["syncs"] is not None else "-"
            print(f"| {kinds[kind]} | {r['step']} | {r['ms']:.1f} | {r['tflops']:.3g} | {mfu} | {memory} | {syncs} | "
                  f"{r['kernel']} |")
    print()
    for kind, rows in results.items():
        plain = next(r for r in rows if r["step"] == "plain PyTorch")
        ratios = ", ".join(f"{r['step']} {r['ms'] / plain['ms']:.2f}" for r in rows if r["step"].startswith("trainer"))
        print(f"{kinds[kind]}: engine step / plain step: {ratios} (targets: zero2 <= 1.10, zero3 <= 1.25)")


def measure(config, model_config, kinds: list[str], device, rounds: int, modes: list[str], compiled: bool = False,
            tokens: int = 256, peak: float | None = None, block: int = 3) -> dict[str, list[dict]]:
    """The rows of the table: per objective, the plain loop (and compiled), then the trainer on each engine,
    all built first and timed in interleaved rounds. Needs a process group (one rank)."""
    from pretrain.objectives import Objectives
    from training import zero

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
    size = config.train.micro_batch_size
    batches = {k: synthetic_batch(k, size, min(tokens, model_config.max_position_embeddings), model_config,
                                  model_config.registry) for k in kinds}
    objectives = Objectives(config, tokenizer, model_config)
    flops = {k: _model_flops(model_config, objectives, b, device) for k, b in batches.items()}
    variants, keep = {}, []
    for plain in [False, True] if compiled else [False]:
        variants["plain PyTorch" + (" + compile" if plain else "")] = plain_steps(plain, config, model_config,
                                                                                   tokenizer, batches, device)
    for mode in modes:
        variants[f"trainer, {mode}"], held = engine_steps(mode, config, model_config, tokenizer, batches, device)
        keep.append(held)
    results = {}
    for kind in kinds:
        steps = {name: per_kind[kind][0] for name, per_kind in variants.items()}
        seconds = _interleaved(steps, rounds, block, device)
        results[kind] = [_row(name, seconds[name], flops[kind], peak, variants[name][kind][1],
                              _host_syncs(steps[name], device), _attention_kernel(steps[name], device))
                         for name in steps]
    for engine, *runs in keep:
        for run in runs:
            run.close()
        zero.release(engine)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="mlm,image,video", help="any of mlm, image, video")
    parser.add_argument("--rounds", type=int, default=4, help="timing rounds (each row runs 3 steps a round)")
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: the shipped config's)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per text sample")
    parser.add_argument("--modes", default="zero2,zero3", help="the trainer's DeepSpeed configs to run")
    parser.add_argument("--compile", action="store_true", help="also the plain loop under torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where the table lacks it")
    parser.add_argument("--config", default="multimodal-base", help="a shipped pretraining config or its YAML")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same rows on the CPU")
    parser.add_argument("overrides", nargs="*", help="key=value settings of the pretraining config, e.g. "
                        "distributed.ds_overrides.zero_optimization.overlap_comm=false")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu_step.py measures a GPU, and this machine's torch {torch.__version__} sees none "
              f"(CUDA build: {torch.version.cuda or 'none'}); run it on a GPU node (or pass --device cpu)")
        return 0

    from pretrain.config import load_pretrain_config
    from training import distributed
    from training.distributed import Topology
    from training.metrics import quiet_third_party

    quiet_third_party()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    config = load_pretrain_config(args.config, ["train.log_every=1000000", "train.profile_comm=false", *args.overrides]
                                  + ([f"train.micro_batch_size={args.batch}"] if args.batch else []))
    model_config = config.model_config()
    kinds = [k.strip() for k in args.objectives.split(",")]
    distributed.init(Topology(0, 1, 0))
    try:
        print(f"{name}, torch {torch.__version__}, {args.config}, {config.train.micro_batch_size} samples per step, "
              f"bf16 peak {peak or 'unknown'} TFLOP/s")
        results = measure(config, model_config, kinds, device, args.rounds, [m.strip() for m in args.modes.split(",")],
                          args.compile, args.tokens, peak)
        size = config.train.micro_batch_size
        labels = {"mlm": f"MLM {size} x {args.tokens}", "image": f"image pairs, {size} x {model_config.image_size}px",
                  "video": f"video pairs, {size} x {model_config.num_frames} frames"}
        _print_table(results, labels)
        length = min(args.tokens, model_config.max_position_embeddings)
        task, full, full_gib, extracted, extracted_gib = serving_row(model_config, device, size, length)
        print(f"\nserving {task} (forward, bf16, {size} x {length} tokens): full model {full:,.0f} tokens/s with "
              f"{full_gib:.2f} GiB of weights, extracted for the task {extracted:,.0f} tokens/s with "
              f"{extracted_gib:.2f} GiB ({extracted / full:.2f}x the throughput, {extracted_gib / full_gib:.2f}x the "
              f"weights)")
        if device.type == "cuda":
            print("\nskill layer, forward + backward, bf16, hidden 768, FFN 3072 (ms):")
            print("| tokens | dense FFN | k=2 of 7 skills | DeepSpeed MoE top-2 of 7 | skills / dense | skills / MoE |")
            print("|---|---|---|---|---|---|")
            for tokens, dense, skills, moe in skill_layer_rows(device):
                print(f"| {tokens} | {dense * 1e3:.2f} | {skills * 1e3:.2f} | {moe * 1e3:.2f} | {skills / dense:.2f} | "
                      f"{skills / moe:.2f} |")
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
