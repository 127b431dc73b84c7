"""Write the sample corpus and train its tokenizer, unless they are there already.

    python -m pretrain.prepare_sample --out data/sample --vocab-size 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.sample_corpus import write_corpus
from data_pipeline.shards import ShardIndex, SkipCounter
from data_pipeline.train_tokenizer import shard_texts
from skillnet.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.prepare_sample", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not all((out / m / f"{m}.index.json").exists() for m in ("image", "audio", "video", "code", "text")):
        write_corpus(out, seed=args.seed)
    if not (out / "tokenizer" / "tokenizer.json").exists():
        patterns = ["::".join(str(out / m / n) for n in ShardIndex.load(out / m / f"{m}.index.json").shards)
                    for m in ("text", "code", "image", "audio", "video")]
        train_tokenizer(shard_texts(patterns, SkipCounter()), args.vocab_size, out / "tokenizer")
    print(f"sample corpus and tokenizer in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
