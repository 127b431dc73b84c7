"""Pretraining step cost: the DeepSpeed engine against a plain PyTorch loop, and 1 against 2 ranks.

    python benchmarks/pretrain_step.py [--hidden 256 --layers 4 --batch 16 --tokens 256 --steps 20]

Prints, in one run:
  - step time (forward, backward, optimizer step) at world size 1: the ZeRO-3 engine as the trainer builds
    it against a plain PyTorch loop (AdamW) on the same model and batch; target overhead at most 15%;
  - tokens per second with 1 and with 2 ranks (ZeRO-3, gloo on CPU, NCCL on GPUs), same per-rank batch;
  - at 2 ranks with every parameter partitioned (persistence threshold 0): ZeRO-3 step time against ZeRO-2's,
    and the bytes ZeRO-3 all-gathers per step (DeepSpeed's comms logger) over the bytes of the parameters
    the step calls (forward hooks on a plain model), target at most 1.1 per pass: masked-token prediction,
    and image-caption pairs, whose two sides run in one model call (ZeRO-3 cannot reduce an FFN leaf's
    gradients twice in one backward, so one call per side no longer trains);
  - MFU (6 x activated parameters x tokens per second over the accelerator's peak) when a GPU is present;
  - ZeRO-3 prefetch: the share of model calls that ran along a complete ZeRO-3 trace (so DeepSpeed
    prefetched), one trace per kind of call against DeepSpeed's single trace, tiny config, every objective;
  - peak resident memory per rank while building `multimodal-base` at world size 2, over the full fp32
    model's bytes: built whole on every rank, and partitioned (`deepspeed.zero.Init`), target at most 0.6;
  - skill parallelism (P=2 on 2 ranks): bytes the skill exchanges send per step and per token, with the
    balanced and the data-local placement, from real training runs (`python -m pretrain`, tiny config, every
    objective of the multimodal set on the sample corpus);
  - the host-work proxy (`--only proxy`): the trainer's step on its ZeRO-2 and ZeRO-3 engines over a plain
    PyTorch step of the same model where compute is tiny (12 layers of `multimodal-base`'s structure at
    hidden 64, 4 x 32 tokens, masked-token prediction, one rank, every parameter partitioned under ZeRO-3):
    what is left is host work, which on a GPU decides the step time; target at most 1.5 for both. Measured
    by `benchmarks/gpu_step.py --device cpu`, the GPU benchmark's own rows.
The first three (gathers excepted) use masked-token prediction with the `masked_lm` skills of the multimodal set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from skillnet import SkillNetConfig, SkillNetForPreTraining  # noqa: E402
from skillnet.params import activated_parameters  # noqa: E402

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _config(args) -> SkillNetConfig:
    pair = args.objective != "mlm"
    return SkillNetConfig(skill_set="multimodal", vocab_size=8000, hidden_size=args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          intermediate_size=4 * args.hidden,
                          max_position_embeddings=max(512, args.tokens), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, modalities=["text", "image"] if pair else ["text"],
                          image_size=128, patch_size=16, projection_dim=64 if pair else 0)


def _batch(args, rank: int, device) -> dict:
    """Masked-token prediction, or (contrastive) images and their 64-token captions in one call."""
    g = torch.Generator().manual_seed(rank)
    if args.objective != "mlm":
        ids = torch.randint(7, 8000, (args.batch, 64), generator=g)
        return {"pixel_values": torch.randint(0, 256, (args.batch, 3, 128, 128), dtype=torch.uint8,
                                              generator=g).to(device),
                "task": "image", "pair": {"input_ids": ids.to(device), "task": "text"}}
    ids = torch.randint(7, 8000, (args.batch, args.tokens), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.15, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "task": "masked_lm"}


def _loss(model, batch: dict) -> torch.Tensor:
    """The step's loss: masked-token prediction, or a pair's contrastive loss (both sides in one call)."""
    if "pair" not in batch:
        return model(**batch).loss
    out = model(**batch)
    a, b, scale = out.embeddings, out.pair_embeddings, out.logit_scale
    logits = scale * a @ b.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def _timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_step_time(args, device) -> float:
    torch.manual_seed(0)
    model = SkillNetForPreTraining(_config(args)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    batch = _batch(args, 0, device)

    def step():
        loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, args.steps)


def called_parameter_bytes(args) -> int:
    """Bytes of the parameters whose modules a step calls (what ZeRO-3 must gather once per pass)."""
    model = SkillNetForPreTraining(_config(args))
    used = {}
    for module in model.modules():
        module.register_forward_hook(lambda m, i, o: used.update({id(p): p for p in m.parameters(recurse=False)}))
    _loss(model, _batch(args, 0, "cpu"))
    return sum(p.numel() * p.element_size() for p in used.values())


def engine_step_time(args) -> dict:
    """Runs in each rank: the engine exactly as pretrain.train builds it."""
    from pretrain.config import PretrainConfig
    from pretrain.train import engine_config
    from training import distributed, zero
    from training.optim import build_optimizer, parameter_groups

    topology = distributed.detect()
    distributed.init(topology)
    device = torch.device("cuda", topology.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    config = PretrainConfig()
    config.train.micro_batch_size, config.train.steps, config.optim.warmup_steps = args.batch, 10**6, 1
    config.distributed.ds_config = f"ds_configs/{args.ds}.json"
    if args.partition_all:
        config.distributed.ds_overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    config.train.profile_comm = args.partition_all
    torch.manual_seed(0)
    model = SkillNetForPreTraining(_config(args))
    optimizer, scheduler = build_optimizer(parameter_groups(model, config.optim.weight_decay), config.optim,
                                           config.train.steps)
    engine = zero.initialize(model, optimizer, scheduler, engine_config(config))
    batch = _batch(args, topology.rank, device)

    def step():
        loss = _loss(engine, batch)
        engine.backward(loss)
        engine.step()

    gathered = 0
    if args.partition_all:
        from deepspeed import comm

        for _ in range(3):  # past the first steps' set-up gathers
            step()
        comm.comms_logger.comms_dict.clear()
        step()
        # the logger records each rank's contribution: the gathered tensor is world_size times that
        gathered = topology.world_size * sum(size * entry[0] for name, sizes in comm.comms_logger.comms_dict.items()
                                             if name.startswith("all_gather") for size, entry in sizes.items())
        comm.comms_logger.comms_dict.clear()
    seconds = _timed(step, args.steps)
    return {"rank": topology.rank, "world": topology.world_size, "seconds": seconds, "gathered": gathered}


def build_worker(mode: str) -> dict:
    """Runs in each rank: build multimodal-base as the trainer does; memory above the process before."""
    import resource

    import deepspeed  # noqa: F401  (libraries loaded before: their code is not the model's memory)
    import psutil
    import transformers.integrations.deepspeed  # noqa: F401

    from pretrain.build import build_model
    from pretrain.config import PretrainConfig
    from pretrain.train import engine_config
    from skillnet import load_config
    from training import distributed

    topology = distributed.detect()
    distributed.init(topology)
    config = PretrainConfig()
    before = psutil.Process().memory_info().rss
    model = build_model(load_config("multimodal-base"), 0, engine_config(config) if mode == "partitioned" else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) * 4
    return {"rank": topology.rank, "peak_above": peak - before, "model_bytes": full}


def build_memory() -> dict[str, float]:
    result = {}
    for mode in ("whole", "partitioned"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), __file__, "--build-worker", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
        ranks = [json.loads(m) for m in re.findall(r"RESULT (\{[^}]*\})", out.stdout)]
        result[mode] = max(r["peak_above"] / r["model_bytes"] for r in ranks)
        result["model_bytes"] = ranks[0]["model_bytes"]
    return result


def traced_calls(args) -> dict[str, float]:
    """Share of model calls along a complete ZeRO-3 trace, per-call traces against DeepSpeed's single one."""
    partition_all = "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"
    runs = _pretrain_runs(args, {per_call: [f"distributed.trace_per_call={per_call}", partition_all]
                                 for per_call in ("true", "false")})
    return {name: sum(r["zero3_traced"] for r in records) / sum(r["zero3_calls"] for r in records)
            for name, records in runs.items()}


def _pretrain_runs(args, variants: dict[str, list[str]]) -> dict[str, list[dict]]:
    """`steps.jsonl` records of a 2-rank `python -m pretrain` run of the tiny config on the sample corpus per
    variant (its overrides)."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(sample)], cwd=root, check=True,
                       capture_output=True)
        result = {}
        for name, overrides in variants.items():
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(_free_port()), "-m", "pretrain", "--config", "tiny", f"data_root={sample}", f"run_dir={run}",
                   f"train.steps={args.placement_steps}", f"checkpoint.every={args.placement_steps}", *overrides]
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
            result[name] = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args, n: int, ds: str = "zero3", partition_all: bool = False) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(_free_port()), __file__, "--worker", "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps), "--ds", ds,
           "--objective", args.objective,
           ] + ["--partition-all"] * partition_all
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // n))})
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^}]*\})", out.stdout)]  # ranks print concurrently
    return {"seconds": max(r["seconds"] for r in results), "gathered": max(r["gathered"] for r in results)}


PROXY_MODEL = {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 256}


def proxy(args) -> dict[str, float]:
    """Engine step / plain step of the host-work proxy, per engine (see the module docstring)."""
    import yaml

    from skillnet.configuration import resolve_config_path

    root = Path(__file__).resolve().parents[1]
    shipped = yaml.safe_load((root / "pretrain" / "configs" / "multimodal-base.yaml").read_text())
    model = yaml.safe_load(resolve_config_path("multimodal-base").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "proxy.yaml"
        config.write_text(yaml.safe_dump({**shipped, "model": {**model, **PROXY_MODEL}}))
        cmd = [sys.executable, str(root / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--config", str(config),
               "--batch", "4", "--tokens", "32", "--objectives", "mlm", "--rounds", str(args.proxy_rounds),
               "distributed.ds_overrides.zero_optimization.stage3_param_persistence_threshold=0"]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                        "MASTER_PORT": str(_free_port())})
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    ms = {row.split(" | ")[1]: float(row.split(" | ")[2]) for row in out.stdout.splitlines()
          if row.startswith("| MLM")}
    plain = ms.pop("plain PyTorch")
    return {"plain_ms": plain, **{step.split(", ")[1]: value / plain for step, value in ms.items()}}


def placements(args) -> dict[str, tuple[float, float]]:
    """Mean skill-exchange bytes per step and per token (all ranks, forward and backward) of each placement."""
    runs = _pretrain_runs(args, {p: ["distributed.skill_parallel_size=2", f"distributed.skill_placement={p}"]
                                 for p in ("balanced", "data_local")})
    result = {}
    for placement, records in runs.items():
        sent = sum(r["skill_bytes"] for r in records)
        result[placement] = (sent / len(records), sent / sum(r["tokens"] for r in records))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence (16 x 256 = 4096 per rank)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--placement-steps", type=int, default=40, help="training steps per skill placement")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ds", default="zero3", help=argparse.SUPPRESS)
    parser.add_argument("--partition-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-worker", help=argparse.SUPPRESS)
    parser.add_argument("--objective", choices=["mlm", "contrastive"], default="mlm",
                        help=argparse.SUPPRESS)
    parser.add_argument("--proxy-rounds", type=int, default=15,
                        help="timing rounds of the proxy (3 steps per row each)")
    parser.add_argument("--only", choices=["build", "traces", "gather", "proxy"], help="run one part only")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(engine_step_time(args)), flush=True)
        return 0
    if args.build_worker:
        print("RESULT " + json.dumps(build_worker(args.build_worker)), flush=True)
        return 0
    if args.only in (None, "build"):
        memory = build_memory()
        print(f"building multimodal-base ({memory['model_bytes'] / 2**30:.2f} GiB in fp32) at world size 2, peak "
              f"resident memory per rank over the fp32 model: whole {memory['whole']:.2f}, partitioned "
              f"{memory['partitioned']:.2f} (target <= 0.6)")
    if args.only in (None, "traces"):
        share = traced_calls(args)
        print(f"model calls along a complete ZeRO-3 trace (prefetching), tiny config, every objective, "
              f"{args.placement_steps} steps: one trace per kind of call {share['true']:.0%}, DeepSpeed's single "
              f"trace {share['false']:.0%}")
    if args.only in (None, "gather"):
        print("bytes all-gathered per step over (passes x bytes of the parameters the step calls), 2 ranks, every "
              "parameter partitioned (target <= 1.1 per pass):")
        for objective, what in (("mlm", "masked-token prediction"), ("contrastive", "image-caption pairs, one call")):
            args.objective = objective
            gathered, needed = _ranks(args, 2, "zero3", partition_all=True)["gathered"], called_parameter_bytes(args)
            passes = max(1, round(gathered / needed))
            print(f"  {what}: {gathered / 2**20:.2f} MiB gathered, {needed / 2**20:.2f} MiB called, {passes} pass(es), "
                  f"{gathered / (passes * needed):.3f} per pass")
        args.objective = "mlm"
    if args.only in (None, "proxy"):
        ratios = proxy(args)
        print(f"host-work proxy (12 layers, hidden 64, 4 x 32 tokens, one rank, CPU): plain step "
              f"{ratios['plain_ms']:.1f} ms; "
              f"trainer step / plain step: ZeRO-2 {ratios['zero2']:.2f}, ZeRO-3 {ratios['zero3']:.2f} (target <= 1.5)")
    if args.only:
        return 0

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens = args.batch * args.tokens
    plain = plain_step_time(args, device)
    one = _ranks(args, 1)["seconds"]
    two = _ranks(args, 2)["seconds"]
    z3 = _ranks(args, 2, "zero3", partition_all=True)
    z2 = _ranks(args, 2, "zero2")["seconds"]
    print(f"masked-token prediction, hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.tokens} tokens "
          f"per rank, median of {args.steps} steps, "
          f"{'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"  plain PyTorch step        {plain * 1e3:9.1f} ms")
    print(f"  DeepSpeed ZeRO-3, 1 rank  {one * 1e3:9.1f} ms   engine / plain = {one / plain:.3f}  (target <= 1.15: "
          f"{'met' if one / plain <= 1.15 else 'NOT met'})")
    print(f"  DeepSpeed ZeRO-3, 2 ranks {two * 1e3:9.1f} ms")
    print(f"  tokens/s: 1 rank {tokens / one:,.0f}, 2 ranks {2 * tokens / two:,.0f} ({2 * one / two:.2f}x)")
    print("  2 ranks, every parameter partitioned:")
    print(f"    ZeRO-3 {z3['seconds'] * 1e3:9.1f} ms, ZeRO-2 {z2 * 1e3:9.1f} ms: "
          f"ZeRO-3 / ZeRO-2 = {z3['seconds'] / z2:.3f}, "
          f"ZeRO-3 / plain 1 rank = {z3['seconds'] / plain:.3f}")
    if device.type == "cuda":
        model = SkillNetForPreTraining(_config(args))
        active = activated_parameters(model.skillnet, set(model.registry.skill_names("masked_lm")))
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
        if peak:
            print(f"  MFU (1 rank): {6 * active * tokens / one / (peak * 1e12):.1%} of {peak:.0f} TFLOPS")
    sent = placements(args)
    print(f"skill parallelism, P=2 on 2 ranks, tiny config, every multimodal objective, {args.placement_steps} steps:")
    for name, (per_step, per_token) in sent.items():
        print(f"  {name:10s} {per_step / 2**20:8.2f} MiB exchanged per step, {per_token / 1024:6.2f} KiB per token")
    ratio = sent["data_local"][1] / sent["balanced"][1]
    print(f"  data-local / balanced bytes per token = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
