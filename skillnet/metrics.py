"""Evaluation metrics for the downstream tasks, in plain Python and torch (no metric libraries).

Each head type (`skillnet.heads`) scores its task with these, so they live beside the model package rather
than in an application that uses it.

Every function takes a whole evaluation set and returns plain Python floats; scores are fractions in [0, 1].
Inputs of different lengths, and empty evaluation sets, raise ``ValueError`` rather than giving a silent 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

__all__ = ["accuracy", "bleu", "character_error_rate", "recall_at_k", "rouge_l", "span_f1", "tag_f1"]


def _check_pairs(predictions: Sequence, references: Sequence, what: str = "references") -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} {what}")
    if len(predictions) == 0:
        raise ValueError("no examples to score")


def accuracy(predictions: Sequence | torch.Tensor, labels: Sequence | torch.Tensor) -> float:
    """Fraction of positions where ``predictions`` equals ``labels`` (lists or tensors of the same shape)."""
    if isinstance(predictions, torch.Tensor) or isinstance(labels, torch.Tensor):
        predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
        if predictions.numel() == 0:
            raise ValueError("no examples to score")
        return (predictions == labels).double().mean().item()
    _check_pairs(predictions, labels, "labels")
    return sum(p == g for p, g in zip(predictions, labels)) / len(labels)


# --------------------------------------------------------------------------- sequence labelling

def _split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``. Prefixes B, I, E, S, O (BIO and BIOES/IOBES)."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is not O or one of B-/I-/E-/S-<type>")
    return prefix, kind


def _entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, start, end-inclusive) chunks of one tag sequence, by conlleval's start/end-of-chunk rules.

    A chunk ends after E- or S-, before B-, S- or O, and where the type changes; it starts at B- or S-, at I- or E-
    after O, E- or S-, and wherever the type changes. So an I- tag after O or after another type opens an entity.
    """
    found: set[tuple[str, int, int]] = set()
    start, prev, prev_kind = -1, "O", ""
    for i, tag in enumerate([*tags, "O"]):  # the sentinel O closes a chunk running to the end
        cur, kind = _split_tag(tag)
        ends = prev in ("E", "S") or (prev in ("B", "I") and cur in ("B", "S", "O")) or (
            prev != "O" and kind != prev_kind)
        starts = cur in ("B", "S") or (prev in ("E", "S", "O") and cur in ("I", "E")) or (
            cur != "O" and kind != prev_kind)
        if ends and start >= 0:
            found.add((prev_kind, start, i - 1))
            start = -1
        if starts:
            start = i
        prev, prev_kind = cur, kind
    return found


def tag_f1(predicted_tags: list[list[str]], gold_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over BIO or BIOES tag sequences, as conlleval and seqeval score.

    An entity counts as correct only when its span and type both match a gold entity exactly. Entities are read with
    conlleval's rules (see ``_entities``): an ``I-`` tag following ``O`` or a different type starts a new entity.
    Like seqeval, a zero denominator gives 0: with no predicted entities precision is 0, with no gold entities recall
    is 0, and F1 is 0 when precision + recall is 0 (so two empty tag sets score 0, not 1).
    """
    _check_pairs(predicted_tags, gold_tags, "gold sequences")
    n_pred = n_gold = n_correct = 0
    for i, (pred, gold) in enumerate(zip(predicted_tags, gold_tags)):
        if len(pred) != len(gold):
            raise ValueError(f"sequence {i}: {len(pred)} predicted tags but {len(gold)} gold tags")
        p, g = _entities(pred), _entities(gold)
        n_pred, n_gold, n_correct = n_pred + len(p), n_gold + len(g), n_correct + len(p & g)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- extractive QA

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def _normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = _normalize_answer(prediction).split(), _normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD 2.0: an empty answer scores 1 only against an empty answer
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def span_f1(predicted: list[str], gold: list[list[str]]) -> dict[str, float]:
    """SQuAD answer metrics: mean exact match and mean token-level F1, each against the best of the gold answers.

    Answers are normalised as SQuAD does (lowercase, no punctuation, no articles a/an/the, single spaces) before
    comparison. Both scores are fractions in [0, 1] (the official script reports them times 100). An answer that
    normalises to nothing has F1 1 against an empty gold answer and 0 against any other, as in SQuAD 2.0.
    """
    _check_pairs(predicted, gold, "gold answer lists")
    exact = f1 = 0.0
    for i, (pred, answers) in enumerate(zip(predicted, gold)):
        if not answers:
            raise ValueError(f"example {i} has no gold answers")
        exact += max(float(_normalize_answer(pred) == _normalize_answer(a)) for a in answers)
        f1 += max(_token_f1(pred, a) for a in answers)
    return {"exact_match": exact / len(predicted), "f1": f1 / len(predicted)}


# --------------------------------------------------------------------------- retrieval

def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for retrieval: the fraction of queries whose correct candidate ranks among the top k.

    ``similarity`` is (queries, candidates), higher meaning more similar, and query i's correct candidate is
    candidate i. A query's rank is the number of *other* candidates scoring at least as high as the correct one, so
    ties count against the query: a candidate with an equal score is ranked ahead of the correct one. A k larger than
    the number of candidates counts every query as found. Returns ``{"recall@<k>": fraction}`` for each k.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (queries, candidates), got shape {tuple(similarity.shape)}")
    queries, candidates = similarity.shape
    if queries == 0:
        raise ValueError("no queries to score")
    if candidates < queries:
        raise ValueError(f"{queries} queries need at least as many candidates, got {candidates}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be at least 1, got {tuple(ks)}")
    correct = similarity.diagonal()[:, None]
    rank = (similarity >= correct).sum(dim=1) - 1  # the correct candidate itself always passes >=
    return {f"recall@{k}": (rank < k).double().mean().item() for k in ks}


# --------------------------------------------------------------------------- generation

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a) * len(b)))."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (beta = 1) over pairs, on lowercased whitespace tokens.

    Per pair: P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R). A pair with an empty side
    scores 0, as in Google's ``rouge_score``.
    """
    _check_pairs(predictions, references)
    total = 0.0
    for pred, ref in zip(predictions, references):
        p, r = pred.lower().split(), ref.lower().split()
        lcs = _lcs_length(p, r) if p and r else 0
        if lcs:
            precision, recall = lcs / len(p), lcs / len(r)
            total += 2 * precision * recall / (precision + recall)
    return total / len(predictions)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in [0, 1], with sacrebleu's default arithmetic on whitespace tokens.

    ``references[i]`` holds one or more references for ``predictions[i]``. The modified n-gram precisions p_1..p_N
    (counts clipped to the most any one reference holds) are pooled over the corpus, and
    BLEU = BP * exp(mean_n log p_n), with BP = exp(1 - r / c) when the total prediction length c is below the
    effective reference length r (per sentence, the reference length closest to the prediction's, ties to the
    shorter), else 1. No smoothing and no tokenisation beyond ``split()``: if any p_n is 0 the score is 0.
    """
    _check_pairs(predictions, references, "reference lists")
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not refs:
            raise ValueError(f"example {i} has no references")
        hyp, ref_tokens = pred.split(), [r.split() for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum((counts & max_ref).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


# --------------------------------------------------------------------------- speech

def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: fewest single-character insertions, deletions and substitutions turning a into b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev_diag, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (x != y))
    return row[-1]


def character_error_rate(predictions: list[str], references: list[str]) -> float:
    """Corpus CER: total character edit distance over total reference characters (can exceed 1 with insertions)."""
    _check_pairs(predictions, references)
    chars = sum(len(r) for r in references)
    if chars == 0:
        raise ValueError("references contain no characters, so the error rate is undefined")
    return sum(_edit_distance(p, r) for p, r in zip(predictions, references)) / chars
