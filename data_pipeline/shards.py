"""The shard index, a source's shards matched to it, and raw sample reading with corruption accounting.

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
from typing import Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from .fields import KNOWN_EXTENSIONS, check_modality

log = logging.getLogger(__name__)


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
                                          "shards": [{"name": n, "samples": c} for n, c in self.shards.items()]},
                                         indent=1))

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
