"""The shard writer: samples -> WebDataset tar shards and their index (`write_shards`), and the index of
shards written elsewhere (`index_existing`). Each sample is decoded as the loader will, so only usable
samples are written or counted. `python -m data_pipeline.write_shards` is its command line."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import webdataset as wds
from webdataset.shardlists import expand_urls

from .fields import check_modality
from .shards import ShardIndex, SkipCounter, index_path_for, read_raw_samples, shard_name


def safe_key(key: str) -> str:
    """A sample key every WebDataset reader splits back the same: folders kept as `/`, no `.` or `..`
    parts, and within a part only letters, digits, `_` and `-` (a dot would end the key early)."""
    parts = [p for p in re.split(r"[\\/]+", str(key)) if p not in ("", ".", "..")]
    return "/".join(re.sub(r"[^\w\-]", "_", p) for p in parts)


def _usable(sample: dict, modality: str, cfg) -> str | None:
    """None if the loader can use `sample`, else why not (the skip reason it would count)."""
    from .media import BadSample, decode_sample

    try:
        decode_sample({k: v.encode() if isinstance(v, str) else v for k, v in sample.items()}, modality, cfg)
    except BadSample as e:
        return e.reason
    return None


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str, modality: str,
                 max_samples: int = 10_000, max_bytes: float = 1e9, progress: bool = True,
                 check: bool = True) -> ShardIndex:
    """Write `samples` (dicts with `__key__` and member fields as bytes or str) into
    `out_dir/prefix-NNNNNN.tar` shards of at most `max_samples` samples and `max_bytes` bytes, then the
    index `out_dir/prefix.index.json`. Keys are made safe (`safe_key`) and unique (a repeated key gets
    `-2`, `-3`...). With `check`, each sample is decoded as the loader will: the unusable ones are left out,
    counted by reason in the index's `left_out`, and if none is usable nothing is written (ValueError)."""
    from tqdm import tqdm

    from .media import MediaConfig

    check_modality(modality)
    out_dir = Path(out_dir)
    counts: Counter = Counter()
    left_out: Counter = Counter()
    seen: Counter = Counter()
    fields: set[str] = set()
    cfg = MediaConfig()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    sink = None
    try:
        for sample in tqdm(samples, desc=f"writing {prefix}", unit=" samples", disable=not progress):
            key = safe_key(sample["__key__"])
            if not key:
                left_out["unusable_key"] += 1
                continue
            seen[key] += 1
            if seen[key] > 1:
                left_out["renamed_duplicate_key"] += 1  # written, under a new key
                key = f"{key}-{seen[key]}"
            if check and (reason := _usable(sample, modality, cfg)):
                left_out[reason] += 1
                continue
            if sink is None:  # on the first usable sample: nothing is created for an unusable input
                out_dir.mkdir(parents=True, exist_ok=True)
                # mtime=0: the same samples give byte-identical shards
                sink = wds.ShardWriter(pattern, maxcount=max_samples, maxsize=max_bytes, verbose=0, mtime=0)
            sink.write({**sample, "__key__": key})
            counts[os.path.basename(sink.fname)] += 1
            fields |= {k for k in sample if not k.startswith("__")}
    finally:
        if sink is not None:
            sink.close()
    if not counts:
        reasons = ", ".join(f"{n} {r}" for r, n in left_out.most_common()) or "no samples at all"
        raise ValueError(f"no usable {modality} sample to write ({reasons})")
    index = ShardIndex(modality, sorted(fields), dict(sorted(counts.items())), left_out=dict(left_out))
    index.save(out_dir / f"{prefix}.index.json")
    return index


def index_existing(shards: str, modality: str, out: str | Path | None = None, check: bool = True) -> ShardIndex:
    """Count the samples of shards written elsewhere (with `check`: those the loader can use, each decoded
    as it will be) and write their index; refused when no sample is usable."""
    from .media import MediaConfig

    check_modality(modality)
    urls = expand_urls(shards)
    missing = [u for u in urls if not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"--index-only: {missing[0]} is not a shard file"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    counts, fields, left_out, cfg = {}, set(), SkipCounter(), MediaConfig()
    for url in urls:
        n = 0
        for sample in read_raw_samples(url, left_out):
            if check and (reason := _usable(sample, modality, cfg)):
                left_out[reason] += 1
                continue
            n += 1
            fields |= {k for k in sample if not k.startswith("__")}
        counts[shard_name(url)] = n
    if not sum(counts.values()):
        reasons = ", ".join(f"{n} {r}" for r, n in left_out.most_common()) or "no samples at all"
        raise ValueError(f"--index-only: no usable {modality} sample in {len(urls)} shards ({reasons})")
    index = ShardIndex(modality, sorted(fields), counts, left_out=dict(left_out))
    out = Path(out or index_path_for(urls[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    index.save(out)
    return index
