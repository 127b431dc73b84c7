"""Shard writing, the shard index, and raw sample reading with corruption accounting.

A dataset is a set of WebDataset tar shards plus `<prefix>.index.json`: the modality, the member fields
every sample carries, and the number of samples in each shard. The loader needs the index for epoch
accounting and exact resume; `python -m data_pipeline.write_shards --index-only` writes one for shards
made elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

MODALITIES = ("text", "code", "image", "audio", "video")
# The member a sample of each modality must carry (besides its caption, `txt`, for the paired ones).
MEDIA_FIELDS = {"image": ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"),
                "audio": ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac"),
                "video": ("mp4", "webm", "mkv", "avi", "mov", "gif"),
                "code": ("py", "code", "js", "c", "cpp", "java", "go", "rs")}


KNOWN_EXTENSIONS = {ext for exts in MEDIA_FIELDS.values() for ext in exts} | {"txt", "json"}
"""Members a sample may carry: media, its caption or text, and metadata (img2dataset's `json`)."""


def check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")


@dataclass
class ShardIndex:
    """What the loader knows of a dataset without opening it."""

    modality: str
    fields: list[str]
    shards: dict[str, int]  # shard file name -> usable samples
    path: Path | None = None
    left_out: dict[str, int] = field(default_factory=dict)
    """When written or indexed here: samples left out (not counted), by reason."""

    @property
    def samples(self) -> int:
        return sum(self.shards.values())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"modality": self.modality, "fields": self.fields,
                                          "shards": [{"name": n, "samples": c} for n, c in self.shards.items()]}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ShardIndex":
        path = Path(path)
        data = json.loads(path.read_text())
        check_modality(data["modality"])
        return cls(data["modality"], data["fields"], {s["name"]: s["samples"] for s in data["shards"]}, path)


def index_path_for(first_url: str) -> Path:
    """Default index location: beside the shards, named after their prefix (`img-000003.tar` -> `img.index.json`)."""
    name = os.path.basename(first_url)
    prefix = re.sub(r"[-_.]?\d+\.tar$", "", name)
    folder = os.path.dirname(first_url)
    # img2dataset names shards 00000.tar: the index is named after their folder, not hidden as .index.json
    return Path(folder) / f"{prefix or os.path.basename(os.path.abspath(folder)) or 'shards'}.index.json"


def shard_name(url: str) -> str:
    """The index's name for a shard: its file name (for `pipe:` commands, the last word's)."""
    return os.path.basename(url.split()[-1] if url.startswith("pipe:") else url)


@dataclass
class Source:
    """One dataset of a task: its shard URLs (as given, e.g. local paths or `pipe:` commands) and index."""

    urls: list[str]
    index: ShardIndex
    weight: float = 1.0
    samples_per_url: list[int] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(self.samples_per_url)


def open_source(shards: str, index: str | None = None, weight: float = 1.0) -> Source:
    """Expand a shard pattern (braces, `::` lists) and match every shard to its index entry; an index
    file (`*.index.json`) stands for all the shards it lists, beside it.

    Errors (before any training): no shards, no index, a shard the index does not list.
    """
    if shards.endswith(".index.json"):
        if not os.path.exists(shards):
            raise FileNotFoundError(f"no shard index {shards}")
        index = index or shards
        folder = os.path.dirname(shards)
        shards = "::".join(os.path.join(folder, name) for name in ShardIndex.load(shards).shards)
    urls = expand_urls(shards)
    local = [u for u in urls if not u.startswith(("pipe:", "http:", "https:", "s3:", "gs:"))]
    missing = [u for u in local if not os.path.exists(u)]
    if not urls or (local and len(missing) == len(urls)):
        raise FileNotFoundError(f"no shards match {shards!r}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} shards of {shards!r} do not exist, e.g. {missing[0]}")
    if index is None:
        if not local:
            raise ValueError(f"shards {shards!r} are not local files: give their index with `index:`")
        index = index_path_for(urls[0])
    if not os.path.exists(index):
        raise FileNotFoundError(f"no shard index {index} for {shards!r}: run "
                                f"`python -m data_pipeline.write_shards --index-only '{shards}' --modality ...`")
    shard_index = ShardIndex.load(index)
    counts = []
    for url in urls:
        name = shard_name(url)
        if name not in shard_index.shards:
            raise ValueError(f"shard {url} is not in the index {index}")
        counts.append(shard_index.shards[name])
    return Source(urls, shard_index, weight, counts)


# -- writing ---------------------------------------------------------------------------------------------


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
                 max_samples: int = 10_000, max_bytes: float = 1e9, progress: bool = True, check: bool = True) -> ShardIndex:
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
        raise FileNotFoundError(f"--index-only: {missing[0]} is not a shard file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
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


# -- reading ---------------------------------------------------------------------------------------------


class SkipCounter(Counter):
    """Samples skipped, by reason. The first skips of each reason are logged with their shard and key, then
    every 1000th (counts reach TensorBoard and the end of the run), so broken data cannot flood the log."""

    _muted = False
    LOGGED = 10

    def skip(self, reason: str, url: str, key: str | None, detail: str = "") -> None:
        if self._muted:
            return
        self[reason] += 1
        n = self[reason]
        if n <= self.LOGGED or n % 1000 == 0:
            more = f"; further {reason} skips are logged every 1000th" if n == self.LOGGED else ""
            log.warning("skipped %s: %s in %s%s (%d so far%s)", key or "(shard rest)", reason, url,
                        f" ({detail})" if detail else "", n, more)

    @contextmanager
    def muted(self):
        """Count nothing inside (a replay of samples counted before)."""
        self._muted = True
        try:
            yield
        finally:
            self._muted = False


class _Tail:
    """A stream that remembers how many bytes it gave and the last of them (to check how a tar ended)."""

    KEEP = 1 << 16

    def __init__(self, stream):
        self.stream, self.total, self.tail = stream, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def ended_at(self, offset: int) -> bool:
        """Whether an end-of-archive block (512 zero bytes) was read at `offset`."""
        start = len(self.tail) - (self.total - offset)
        return self.total >= offset + 512 and start >= 0 and not self.tail[start:start + 512].strip(b"\0")


def read_raw_samples(url: str, skipped: SkipCounter) -> Iterator[dict]:
    """The samples of one shard as dicts of raw bytes (members grouped by key), in tar order.

    A truncated or corrupt tar ends the shard, counted once (`truncated_shard`, or `corrupt_shard` for
    damage inside the archive): every sample before the damage is kept, and a sample whose member data the
    damage cuts is dropped (one cut before a header keeps the members read, whole). A member
    whose extension repeats within a sample starts a new sample (`duplicate_key`, counted; both are kept);
    a member without an extension is counted (`member_without_extension`) and left out, one with an
    extension no modality uses is counted (`unknown_extension`).
    """
    current: dict | None = None
    stream = _Tail(wds.gopen(url, "rb"))
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or not ext:
                    skipped.skip("member_without_extension", url, info.name)
                    continue
                ext = ext.lower()
                if ext not in KNOWN_EXTENSIONS:
                    skipped.skip("unknown_extension", url, key, f"a {ext} member, left unused")
                if current is not None and (current["__key__"] != key or ext in current):
                    if current["__key__"] == key:
                        skipped.skip("duplicate_key", url, key, f"a second {ext} member: a sample of its own")
                    yield current  # complete: the next member is another sample's
                    current = None
                data = tar.extractfile(info).read()
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if not stream.ended_at(tar.offset):  # cut at or inside a header: every member read is whole
                skipped.skip("truncated_shard", url, None, f"no end-of-archive block after {stream.total} bytes")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        reason = "truncated_shard" if "end of data" in str(e) else "corrupt_shard"
        skipped.skip(reason, url, current["__key__"] if current else None, f"{type(e).__name__}: {e}")
        current = None  # a sample cut by the damage is not trusted
    finally:
        stream.stream.close()
    if current is not None:
        yield current
