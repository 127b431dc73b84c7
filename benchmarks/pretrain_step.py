"""Pretraining step cost: the DeepSpeed engine against a plain PyTorch loop, and 1 against 2 ranks.

    python benchmarks/pretrain_step.py [--hidden 256 --layers 4 --batch 16 --tokens 256 --steps 20]

Prints, in one run:
  - step time (forward, backward, optimizer step) at world size 1: the ZeRO-3 engine as the trainer builds
    it against a plain PyTorch loop (AdamW) on the same model and batch; target overhead at most 15%;
  - tokens per second with 1 and with 2 ranks (ZeRO-3, gloo on CPU, NCCL on GPUs), same per-rank batch;
  - MFU (6 x activated parameters x tokens per second over the accelerator's peak) when a GPU is present;
  - skill parallelism (P=2 on 2 ranks): bytes the skill exchanges send per step and per token, with the
    balanced and the data-local placement, from real training runs (`python -m pretrain`, tiny config, every
    objective of the multimodal set on the sample corpus).
The first three use masked-token prediction with the `masked_lm` skills of the multimodal set.
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
    return SkillNetConfig(skill_set="multimodal", vocab_size=8000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                          max_position_embeddings=max(512, args.tokens), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, modalities=["text"])


def _batch(args, rank: int, device) -> dict:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(7, 8000, (args.batch, args.tokens), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.15, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "task": "masked_lm"}


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
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, args.steps)


def engine_step_time(args) -> dict:
    """Runs in each rank: the engine exactly as pretrain.train builds it."""
    import deepspeed

    from pretrain import distributed
    from pretrain.config import PretrainConfig
    from pretrain.parallelize import parallelize
    from pretrain.train import _ds_config, _optimizer

    topology = distributed.detect()
    distributed.init(topology)
    device = torch.device("cuda", topology.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    config = PretrainConfig()
    config.train.micro_batch_size, config.train.steps, config.optim.warmup_steps = args.batch, 10**6, 1
    torch.manual_seed(0)
    model = parallelize(SkillNetForPreTraining(_config(args)), activation_checkpointing=False)
    optimizer, scheduler = _optimizer(model, config, offload=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=_ds_config(config, topology.world_size))
    batch = _batch(args, topology.rank, device)

    def step():
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    seconds = _timed(step, args.steps)
    return {"rank": topology.rank, "world": topology.world_size, "seconds": seconds}


def _ranks(args, n: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(29700 + n),
           __file__, "--worker", "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
           "--tokens", str(args.tokens), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // n))})
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^}]*\})", out.stdout)]  # ranks print concurrently
    return max(r["seconds"] for r in results)


def placements(args) -> dict[str, tuple[float, float]]:
    """Mean skill-exchange bytes per step and per token (all ranks, forward and backward) of each placement."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(sample)], cwd=root, check=True,
                       capture_output=True)
        result = {}
        for placement in ("balanced", "data_local"):
            run = Path(tmp) / placement
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29709",
                   "-m", "pretrain", "--config", "tiny", f"data_root={sample}", f"run_dir={run}",
                   f"train.steps={args.placement_steps}", f"checkpoint.every={args.placement_steps}",
                   "distributed.skill_parallel_size=2", f"distributed.skill_placement={placement}"]
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
            records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
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
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(engine_step_time(args)), flush=True)
        return 0

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens = args.batch * args.tokens
    plain = plain_step_time(args, device)
    one = _ranks(args, 1)
    two = _ranks(args, 2)
    print(f"masked-token prediction, hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.tokens} tokens "
          f"per rank, median of {args.steps} steps, {'GPU ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    print(f"  plain PyTorch step        {plain * 1e3:9.1f} ms")
    print(f"  DeepSpeed ZeRO-3, 1 rank  {one * 1e3:9.1f} ms   engine / plain = {one / plain:.3f}  (target <= 1.15: "
          f"{'met' if one / plain <= 1.15 else 'NOT met'})")
    print(f"  DeepSpeed ZeRO-3, 2 ranks {two * 1e3:9.1f} ms")
    print(f"  tokens/s: 1 rank {tokens / one:,.0f}, 2 ranks {2 * tokens / two:,.0f} ({2 * one / two:.2f}x)")
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
