"""Train the text/code tokenizer (byte-level BPE) on the text members of shards and save `tokenizer.json`.

    python -m data_pipeline.train_tokenizer --shards 'data/text/text-{000000..000009}.tar' \\
        --shards 'data/code/code-{000000..000004}.tar' --vocab-size 32000 --out runs/tokenizer
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

from tqdm import tqdm
from webdataset.shardlists import expand_urls

from skillnet.tokenizer import train_tokenizer

from .fields import MEDIA_FIELDS
from .shards import SkipCounter, read_raw_samples

TEXT_FIELDS = ("txt",) + MEDIA_FIELDS["code"]


def shard_texts(patterns: list[str], skipped: SkipCounter) -> Iterator[str]:
    """Captions, paragraphs and code of every sample in the shards."""
    urls = [u for p in patterns for u in expand_urls(p)]
    for url in tqdm(urls, desc="tokenizer shards", unit=" shards"):
        for sample in read_raw_samples(url, skipped):
            for field in TEXT_FIELDS:
                if field in sample:
                    try:
                        yield sample[field].decode("utf-8")
                    except UnicodeDecodeError:
                        skipped.skip("undecodable_text", url, sample["__key__"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", action="append", required=True, help="a shard pattern (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--out", required=True, help="folder for tokenizer.json")
    args = parser.parse_args(argv)
    skipped = SkipCounter()
    tokenizer = train_tokenizer(shard_texts(args.shards, skipped), args.vocab_size, args.out)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {args.out}/tokenizer.json"
          + (f"; skipped {dict(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
