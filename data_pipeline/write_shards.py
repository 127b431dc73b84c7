"""Turn a folder of files, a JSONL manifest or a Hugging Face dataset into WebDataset shards and an index.

    python -m data_pipeline.write_shards --input photos/ --modality image --out data/img --prefix img
    python -m data_pipeline.write_shards --input pairs.jsonl --modality audio --out data/audio
    python -m data_pipeline.write_shards --input hf_saved_dir --hf --modality image --out data/img
    python -m data_pipeline.write_shards --input train.parquet --hf --modality text --out data/text
    python -m data_pipeline.write_shards --index-only 'data/img-{000000..000127}.tar' --modality image

A folder pairs members by path without the last extension (`a/x.jpg` + `a/x.txt` -> one sample `a/x`;
hidden files and files without an extension are left out). A manifest line is a JSON object: string
values that name existing files become members with that file's extension and bytes (a media path that
does not exist, or a null value, is an error naming the line), other strings become `.txt` (for the field
`text` or `caption`) or `.<field>` members, and an optional `key` names the sample. Keys are made safe
for every WebDataset reader (no dots, no `..`) and unique; each sample is decoded as the loader will,
and the unusable ones are left out and counted (nothing is written when none is usable). A Hugging Face
dataset (saved with `save_to_disk`, or local JSON/CSV/Parquet files) maps columns the same way; `Image`
and `Audio` features are written as encoded files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from .fields import MEDIA_FIELDS, MODALITIES
from .writer import index_existing, write_shards

CAPTION_FIELDS = ("text", "caption", "txt")


def from_folder(folder: str | Path, left_out: Counter | None = None) -> Iterator[dict]:
    """Files grouped by their path without the last extension (`a/x.jpg` + `a/x.txt` -> sample `a/x`);
    hidden files and files without an extension are left out, counted in `left_out`."""
    groups: dict[str, dict] = defaultdict(dict)
    folder = Path(folder)
    left_out = Counter() if left_out is None else left_out
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            left_out["hidden_file"] += 1
        elif not path.suffix:
            left_out["file_without_extension"] += 1
        else:
            groups[str(rel.with_suffix(""))][path.suffix[1:].lower()] = path
    for key, members in groups.items():
        yield {"__key__": key, **{ext: p.read_bytes() for ext, p in members.items()}}


_MEDIA_EXTENSIONS = {ext for exts in MEDIA_FIELDS.values() for ext in exts}


def _member(field: str, value, base: Path) -> tuple[str, bytes | str]:
    if value is None:
        raise ValueError(f"{field} is null")
    if isinstance(value, str) and field not in CAPTION_FIELDS:
        path = Path(value) if os.path.isabs(value) else base / value
        if path.is_file():
            return path.suffix.lstrip(".").lower(), path.read_bytes()
        if field in MEDIA_FIELDS or path.suffix.lstrip(".").lower() in _MEDIA_EXTENSIONS:
            raise ValueError(f"{field}: no file {path}")
    if field in CAPTION_FIELDS:
        return "txt", str(value)
    return field, value if isinstance(value, (str, bytes)) else json.dumps(value)


def from_manifest(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    with path.open() as f:
        for line_number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(record.pop("key", f"{line_number:09d}"))
                yield {"__key__": key, **dict(_member(k, v, path.parent) for k, v in record.items())}
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number + 1}: not JSON ({e})") from None
            except ValueError as e:
                raise ValueError(f"{path}:{line_number + 1}: {e}") from None


def _hf_value(field: str, value) -> tuple[str, bytes | str]:
    if isinstance(value, dict) and {"bytes", "path"} <= set(value):  # an undecoded Image, Audio or Video feature
        data = value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()
        return Path(value["path"] or f"x.{field}").suffix.lstrip(".").lower() or field, data
    return _member(field, value, Path("."))


def from_hf_dataset(path: str, split: str = "train") -> Iterator[dict]:
    """A dataset saved with `save_to_disk`, or local JSON/CSV/Parquet files loaded with `load_dataset`."""
    import datasets

    if (os.path.isdir(path) and (Path(path) / "dataset_info.json").exists()
            or (Path(path) / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(Path(path).suffix)
        if kind is None:
            raise ValueError(f"{path}: not a saved dataset nor a .json/.jsonl/.csv/.parquet file")
        ds = datasets.load_dataset(kind, data_files=path, split=split)
    for name, feature in ds.features.items():
        if type(feature).__name__ in ("Image", "Audio", "Video"):
            ds = ds.cast_column(name, type(feature)(decode=False))  # write the encoded file as it is
    for i, record in enumerate(ds):
        key = str(record.pop("key", f"{i:09d}"))
        try:
            yield {"__key__": key, **dict(_hf_value(k, v) for k, v in record.items())}
        except ValueError as e:
            raise ValueError(f"{path}: row {i}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.write_shards", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--input", help="a folder, a .jsonl manifest, or (with --hf) a Hugging Face dataset")
    parser.add_argument("--hf", action="store_true", help="read --input with Hugging Face datasets")
    parser.add_argument("--split", default="train")
    parser.add_argument("--index-only", metavar="SHARDS", help="write the index of existing shards (a pattern)")
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--prefix", help="shard name prefix (default: the modality)")
    parser.add_argument("--max-samples", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _left_out(counts: dict) -> str:
    return (f"; left out {sum(counts.values())}: "
            + ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda x: -x[1])) if counts else "")


def _run(parser, args) -> int:
    prefix = args.prefix or args.modality
    if args.index_only:
        out = Path(args.out) / f"{prefix}.index.json" if args.out else None
        index = index_existing(args.index_only, args.modality, out)
        print(f"indexed {index.samples} usable {args.modality} samples in {len(index.shards)} shards"
              f"{_left_out(index.left_out)} (index {out or 'beside the shards'})")
        return 0
    if not args.input or not args.out:
        parser.error("--input and --out are required (or --index-only)")
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"--input {args.input} does not exist")
    left_out = Counter()
    if args.hf:
        samples = from_hf_dataset(args.input, args.split)
    elif os.path.isdir(args.input):
        samples = from_folder(args.input, left_out)
    else:
        samples = from_manifest(args.input)
    index = write_shards(samples, args.out, prefix, args.modality, args.max_samples, args.max_bytes)
    print(f"wrote {index.samples} usable samples in {len(index.shards)} shards to {args.out} "
          f"(index {prefix}.index.json){_left_out({**left_out, **index.left_out})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
