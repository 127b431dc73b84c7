"""Data pipeline throughput against a bare decode loop, side by side in one run (CPU).

    python benchmarks/data_pipeline.py [--data DIR] [--samples 600]

For each modality and for the mixed stream (all five tasks, alpha = 1) it prints samples per second of
  - a bare loop: `tarfile` over the same shards, the same decoder, the same collation, no pipeline;
  - the pipeline with one DataLoader worker (per-worker rate) and with two workers;
and the targets: pipeline overhead per worker at most 15% (1 - pipeline / bare), and two workers at
least 1.8x one worker. Without --data it writes the sample corpus into a temporary folder first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from data_pipeline.loader import Collator, DataConfig, MultiTaskLoader  # noqa: E402
from data_pipeline.media import BadSample, MediaConfig, decode_sample  # noqa: E402
from data_pipeline.sample_corpus import write_corpus  # noqa: E402
from data_pipeline.shards import ShardIndex  # noqa: E402
from skillnet import load_config  # noqa: E402
from skillnet.tokenizer import train_tokenizer  # noqa: E402

TASK = {"image": "image", "audio": "audio", "video": "video", "code": "code", "text": "masked_lm"}
BATCH = 16


def bare_loop(urls: list[str], modality: str, media: MediaConfig, collate: Collator, samples: int) -> float:
    """Samples per second of the plainest loop: tarfile, group members by key, decode, collate; on one
    thread, as a DataLoader worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bare_loop(urls, modality, media, collate, samples)
    finally:
        torch.set_num_threads(threads)


def _bare_loop(urls: list[str], modality: str, media: MediaConfig, collate: Collator, samples: int) -> float:
    start, done, batch = time.perf_counter(), 0, []
    while done < samples:
        for url in urls:
            with tarfile.open(url, "r|") as tar:
                current = None
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    if current is not None and current["__key__"] != key:
                        batch.append(current)
                        current = None
                    current = current or {"__key__": key, "__url__": url}
                    current[ext] = tar.extractfile(info).read()
                batch.append(current)
            decoded = []
            for sample in batch:
                try:
                    decoded.append(decode_sample(sample, modality, media))
                except BadSample:
                    pass
            for i in range(0, len(decoded) - BATCH + 1, BATCH):
                collate(decoded[i : i + BATCH], modality)
                done += BATCH
            batch = []
            if done >= samples:
                break
    return done / (time.perf_counter() - start)


def pipeline_rate(tasks: list[dict], workers: int, tokenizer, media, skills, samples: int) -> float:
    config = DataConfig(tasks=tasks, batch_size=BATCH, num_workers=workers, shards_per_round=2, shuffle_buffer=64)
    loader = MultiTaskLoader(config, tokenizer, media, skills)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(samples // BATCH):
        next(batches)
    return (samples // BATCH) * BATCH / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a sample corpus folder (default: write one to a temporary folder)")
    parser.add_argument("--samples", type=int, default=600, help="samples timed per measurement")
    args = parser.parse_args(argv)
    model = load_config("multimodal-base")
    media = MediaConfig.from_model(model)
    skills = {t: model.registry.skill_names(t) for t in model.tasks}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or tmp)
        if not args.data:
            write_corpus(data, seed=0, images_n=400, audio_n=200, video_n=96, code_n=400, text_n=400, max_samples=16)
        tokenizer = train_tokenizer(["a red circle on the left of a blue square"] * 50, 400, Path(tmp) / "tokenizer")
        collate = Collator(tokenizer, 128)
        tasks = {}
        for modality in TASK:
            index = ShardIndex.load(data / modality / f"{modality}.index.json")
            urls = [str(data / modality / name) for name in index.shards]
            tasks[modality] = {"name": TASK[modality], "modality": modality, "sources": [{"shards": "::".join(urls)}]}

        rows, checks = [], []
        for name in [*TASK, "mixed"]:
            chosen = list(tasks.values()) if name == "mixed" else [tasks[name]]
            one = pipeline_rate(chosen, 1, tokenizer, media, skills, args.samples)
            two = pipeline_rate(chosen, 2, tokenizer, media, skills, args.samples)
            if name == "mixed":
                weights = {t["modality"]: ShardIndex.load(data / t["modality"] / f"{t['modality']}.index.json").samples for t in chosen}
                rates = {m: bare_loop(tasks[m]["sources"][0]["shards"].split("::"), m, media, collate, args.samples // 2) for m in TASK}
                # the mixed bare rate: samples drawn in proportion to size (alpha = 1) at each modality's bare rate
                bare = sum(weights.values()) / sum(weights[m] / rates[m] for m in TASK)
            else:
                bare = bare_loop(tasks[name]["sources"][0]["shards"].split("::"), name, media, collate, args.samples)
            rows.append((name, bare, one, two))
            checks.append((f"{name}: overhead per worker", 1 - one / bare, "<= 0.15", 1 - one / bare <= 0.15))
            checks.append((f"{name}: 2 workers / 1 worker", two / one, ">= 1.80", two / one >= 1.8))

    print(f"samples per second, batches of {BATCH}, {os.cpu_count()} CPUs (image {media.image_size}px, "
          f"video {media.num_frames} frames, audio {media.num_mel_bins} mel bins)")
    print(f"  {'stream':<8}{'bare loop':>11}{'1 worker':>10}{'2 workers':>11}")
    for name, bare, one, two in rows:
        print(f"  {name:<8}{bare:>11.1f}{one:>10.1f}{two:>11.1f}")
    print(f"\n  {'ratio':<30}{'value':>7}  {'target':<9}met")
    for name, value, target, met in checks:
        print(f"  {name:<30}{value:>7.3f}  {target:<9}{'yes' if met else 'NO'}")
    return 0 if all(met for *_, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
