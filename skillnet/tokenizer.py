"""The text/code tokenizer: byte-level BPE trained locally with Hugging Face `tokenizers`, saved as
`tokenizer.json` and loaded as a `PreTrainedTokenizerFast` with BERT's special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train on `texts` (text and code alike: byte-level, whitespace kept) and save to `out_dir`.

    Special tokens take ids 0..6 in the order of SPECIAL_TOKENS ([PAD] = 0).
    """
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    fast = load_tokenizer(out_dir)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a folder (or file) holding `tokenizer.json`."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return PreTrainedTokenizerFast(tokenizer_file=str(file),
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                   **SPECIAL_TOKENS)


def fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's ids: its size and a hash of its vocabulary (token -> id)."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    return {"size": len(tokenizer), "sha": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()}
