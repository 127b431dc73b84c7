"""Finetuning metrics on hand-computed values, and the linear-chain CRF against brute-force enumeration."""

import itertools
import math

import pytest
import torch

from skillnet.crf import CRF
from skillnet.metrics import accuracy, bleu, character_error_rate, recall_at_k, rouge_l, span_f1, tag_f1

# --------------------------------------------------------------------------- accuracy


def test_accuracy_lists_and_tensors():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75  # 3 of 4 agree
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    assert accuracy(torch.tensor([[1, 0], [1, 1]]), torch.tensor([[1, 1], [1, 1]])) == 0.75  # 3 of 4 cells
    assert accuracy(torch.tensor([0, 2]), [1, 2]) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


# --------------------------------------------------------------------------- tag_f1


def test_tag_f1_counts_exact_span_and_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC"], ["B-MISC", "B-ORG", "I-ORG", "O"]]
    # gold: PER[0,1], LOC[3], ORG[1,3] -> 3; pred: PER[0,1], LOC[3], MISC[0], ORG[1,2] -> 4; correct PER, LOC -> 2.
    # P = 2/4, R = 2/3, F = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7.
    scores = tag_f1(pred, gold)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7)
    # Wrong type on the same span, and a span one token short, both count as errors: P = R = F = 1/2.
    one_right = tag_f1([["B-PER", "I-PER", "O", "B-ORG"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    assert one_right == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    short = tag_f1([["O", "B-ORG", "I-ORG", "O"]], [["O", "B-ORG", "I-ORG", "I-ORG"]])
    assert short == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_tag_f1_conlleval_chunk_rules():
    perfect = {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # I- after O opens an entity: O I-PER I-PER O reads as PER[1,2], the same as O B-PER I-PER O.
    assert tag_f1([["O", "I-PER", "I-PER", "O"]], [["O", "B-PER", "I-PER", "O"]]) == perfect
    # I- after another type opens a new entity: B-PER I-LOC is PER[0] + LOC[1].
    assert tag_f1([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]]) == perfect
    # B- always opens a new entity, so B-PER B-PER is two entities, not PER[0,1]: nothing matches.
    assert tag_f1([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])["f1"] == 0.0
    # An entity running to the end of one sentence does not continue into the next.
    assert tag_f1([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["B-PER", "O"]]) == perfect


def test_tag_f1_bioes():
    perfect = {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert tag_f1([["S-PER", "O", "B-LOC", "E-LOC"]], [["S-PER", "O", "B-LOC", "E-LOC"]]) == perfect
    # B-LOC I-LOC at the end closes the same LOC[2,3] as B-LOC E-LOC.
    assert tag_f1([["S-PER", "O", "B-LOC", "I-LOC"]], [["S-PER", "O", "B-LOC", "E-LOC"]]) == perfect
    # pred B-PER E-PER S-LOC E-LOC: PER[0,1], LOC[2] (S ends it), LOC[3] (E after S starts one) -> 3 entities;
    # gold PER[0,1], LOC[2,3] -> 2; correct PER only. P = 1/3, R = 1/2, F = 2 * 1/6 / (5/6) = 0.4.
    scores = tag_f1([["B-PER", "E-PER", "S-LOC", "E-LOC"]], [["B-PER", "E-PER", "B-LOC", "E-LOC"]])
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4})


def test_tag_f1_no_entities_and_errors():
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert tag_f1([["O", "O"]], [["O", "O"]]) == zero  # 0/0 counts as 0, like seqeval
    assert tag_f1([["B-PER", "O"]], [["O", "O"]]) == zero  # one false positive, no gold entities
    assert tag_f1([["O", "O"]], [["B-PER", "O"]]) == zero  # one miss, nothing predicted
    assert tag_f1([[]], [[]]) == zero
    with pytest.raises(ValueError, match="sequence 0: 1 predicted tags but 2 gold tags"):
        tag_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="'X-PER'"):
        tag_f1([["X-PER"]], [["O"]])
    with pytest.raises(ValueError, match="'B-'"):
        tag_f1([["B-"]], [["O"]])


# --------------------------------------------------------------------------- span_f1


def test_span_f1_squad_normalisation_and_means():
    predicted = ["The Eiffel Tower!", "in Paris, France", ""]
    gold = [["eiffel tower", "Paris"], ["Paris"], ["an apple"]]
    # 1: "eiffel tower" == "eiffel tower" -> EM 1, F1 1.
    # 2: "in paris france" vs "paris": 1 shared token, P = 1/3, R = 1 -> F1 = 2 * 1/3 / (4/3) = 1/2, EM 0.
    # 3: empty prediction vs "apple" -> EM 0, F1 0.
    scores = span_f1(predicted, gold)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.5)


def test_span_f1_best_gold_and_edge_cases():
    # "big red dog" vs "red dog": P = 2/3, R = 1 -> 0.8; vs "big red dog runs": P = 1, R = 3/4 -> 6/7. Best is 6/7.
    assert span_f1(["big red dog"], [["red dog", "big red dog runs"]]) == pytest.approx(
        {"exact_match": 0.0, "f1": 6 / 7})
    # Repeated tokens are counted with multiplicity: "cat cat" vs "cat" shares 1 -> P = 1/2, R = 1, F1 = 2/3.
    assert span_f1(["the cat, cat"], [["A cat."]])["f1"] == pytest.approx(2 / 3)
    # An answer that normalises to nothing matches only an empty gold answer.
    assert span_f1([""], [["The"]]) == {"exact_match": 1.0, "f1": 1.0}
    assert span_f1(["  "], [["x"]]) == {"exact_match": 0.0, "f1": 0.0}
    assert span_f1(["Denver Broncos"], [["denver  broncos"]]) == {"exact_match": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="example 0 has no gold answers"):
        span_f1(["x"], [[]])
    with pytest.raises(ValueError, match="no examples"):
        span_f1([], [])


# --------------------------------------------------------------------------- recall_at_k


def test_recall_at_k_ranks_and_ties():
    similarity = torch.tensor([[0.9, 0.1, 0.5],
                               [0.8, 0.3, 0.3],
                               [0.2, 0.4, 0.1]])
    # query 0: nothing else >= 0.9 -> rank 0; query 1: 0.8 and the tied 0.3 -> rank 2; query 2: 0.2, 0.4 -> rank 2.
    assert recall_at_k(similarity, ks=(1, 2, 3)) == pytest.approx({"recall@1": 1 / 3, "recall@2": 1 / 3,
                                                                   "recall@3": 1.0})
    # All scores tied: each query has one candidate ranked ahead, so it is never first.
    assert recall_at_k(torch.ones(2, 2), ks=(1, 2)) == {"recall@1": 0.0, "recall@2": 1.0}


def test_recall_at_k_perfect_and_errors():
    # Default ks; k above the candidate count finds every query.
    assert recall_at_k(torch.eye(4)) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}
    # Extra candidates beyond the queries' own are distractors: query 1's 0.7 loses to a distractor's 0.9.
    wide = torch.tensor([[1.0, 0.0, 0.0, 0.2], [0.0, 0.7, 0.9, 0.1]])
    assert recall_at_k(wide, ks=(1, 2)) == {"recall@1": 0.5, "recall@2": 1.0}
    with pytest.raises(ValueError, match="at least as many candidates"):
        recall_at_k(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="queries, candidates"):
        recall_at_k(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 1"):
        recall_at_k(torch.eye(2), ks=(0,))


# --------------------------------------------------------------------------- rouge_l


def test_rouge_l_known_values():
    predictions = ["the cat sat on the mat", "A B C D", ""]
    references = ["the cat is on the mat", "b d", "x"]
    # 1: LCS "the cat on the mat" = 5 of 6 and 6 -> P = R = F = 5/6.
    # 2: lowercased LCS "b d" = 2, P = 2/4, R = 2/2 -> F = 2 * 1/2 / (3/2) = 2/3.
    # 3: empty prediction -> 0. Mean = (5/6 + 2/3 + 0) / 3 = 1/2.
    assert rouge_l(predictions, references) == pytest.approx(0.5)
    assert rouge_l(["Hello World"], ["hello world"]) == 1.0
    assert rouge_l(["b a"], ["a b"]) == pytest.approx(0.5)  # LCS 1 of 2: order matters
    assert rouge_l(["x y"], ["z"]) == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])


# --------------------------------------------------------------------------- bleu


def test_bleu_sentence_and_corpus():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # 1-grams 5/6 (second "the" clipped), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; equal lengths so BP = 1.
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4) = 0.5373.
    assert bleu([hyp], [[ref]]) == pytest.approx((1 / 12) ** 0.25)
    # Adding "a b c d" with references of 6 and 9 tokens (closest: 6) and every n-gram matched pools the counts:
    # p = 9/10, 6/8, 4/6, 2/4 -> product 0.225; c = 10 < r = 12 -> BP = exp(1 - 12/10) = exp(-0.2). BLEU = 0.5639.
    corpus = bleu([hyp, "a b c d"], [[ref], ["a b c d e f", "a b c d e f g h x"]])
    assert corpus == pytest.approx(math.exp(-0.2) * 0.225 ** 0.25)
    assert corpus == pytest.approx(0.56388, abs=1e-5)


def test_bleu_edge_cases():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == 1.0
    # Reference lengths 3 and 5 are equally close to 4: the shorter wins, so no brevity penalty (else exp(-1/4)).
    assert bleu(["a b c d"], [["a b c", "a b c d x"]]) == 1.0
    # Clipping: "the" x4 against a reference holding it once -> p1 = 1/4; c = 4 > r = 2 so BP = 1.
    assert bleu(["the the the the"], [["the cat"]], max_n=1) == pytest.approx(0.25)
    # Brevity: c = 1, r = 4 -> BP = exp(1 - 4) with p1 = 1.
    assert bleu(["a"], [["a b c d"]], max_n=1) == pytest.approx(math.exp(-3))
    assert bleu(["a b c"], [["a x b y c"]]) == 0.0  # no matching bigram: no smoothing, score 0
    assert bleu([""], [["a b"]]) == 0.0
    assert bleu(["a b c"], [["a b c"]]) == 0.0  # too short to hold any 4-gram
    with pytest.raises(ValueError, match="example 0 has no references"):
        bleu(["a"], [[]])


# --------------------------------------------------------------------------- character_error_rate


def test_character_error_rate():
    # kitten -> sitting: 2 substitutions + 1 insertion = 3 edits; "abc" exact. 3 / (7 + 3) = 0.3.
    assert character_error_rate(["kitten", "abc"], ["sitting", "abc"]) == pytest.approx(0.3)
    assert character_error_rate([""], ["abcd"]) == 1.0  # 4 deletions over 4 characters
    assert character_error_rate(["aab"], ["ab"]) == 0.5  # 1 insertion over 2 characters
    assert character_error_rate(["abcdef"], ["ab"]) == 2.0  # insertions can push it above 1
    assert character_error_rate(["same"], ["same"]) == 0.0
    with pytest.raises(ValueError, match="no characters"):
        character_error_rate(["a"], [""])


# --------------------------------------------------------------------------- CRF


def _path_score(crf: CRF, emissions: torch.Tensor, path: tuple[int, ...]) -> float:
    """Score of one tag path written out from the definition, for a single sequence's (length, tags) emissions."""
    score = crf.start_transitions[path[0]] + emissions[0, path[0]] + crf.end_transitions[path[-1]]
    for t in range(1, len(path)):
        score = score + crf.transitions[path[t - 1], path[t]] + emissions[t, path[t]]
    return score.item()


def _random_crf(num_tags: int, seed: int) -> CRF:
    crf = CRF(num_tags)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return crf


def test_crf_log_partition_and_nll_match_brute_force():
    crf = _random_crf(2, seed=1)
    emissions = torch.randn(2, 3, 2, dtype=torch.float64)
    crf.double()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tags = torch.tensor([[0, 1, 1], [1, 0, -100]])  # padding label past the second sequence's end is ignored
    log_z, nll = [], []
    for b, length in enumerate(mask.sum(1).tolist()):
        scores = torch.tensor([_path_score(crf, emissions[b], p) for p in itertools.product(range(2), repeat=length)],
                              dtype=torch.float64)
        assert len(scores) == 2 ** length  # 8 paths of length 3, 4 of length 2
        log_z.append(torch.logsumexp(scores, 0))
        nll.append(log_z[-1] - _path_score(crf, emissions[b], tuple(tags[b, :length].tolist())))
    assert torch.allclose(crf.log_partition(emissions, mask), torch.stack(log_z))
    assert crf(emissions, tags, mask).item() == pytest.approx(float(sum(nll) / 2), rel=1e-10)
    # The model is a distribution: exp(-NLL) summed over every path of the full-length sequence is 1.
    total = sum(math.exp(-crf(emissions[:1], torch.tensor([p]), mask[:1]).item())
                for p in itertools.product(range(2), repeat=3))
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crf_viterbi_matches_brute_force(seed):
    num_tags, lengths = 3, [5, 4, 3, 2, 1, 5]
    crf = _random_crf(num_tags, seed)
    emissions = 2 * torch.randn(len(lengths), max(lengths), num_tags, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    decoded = crf.decode(emissions, mask)
    assert [len(p) for p in decoded] == lengths
    for b, length in enumerate(lengths):
        paths = list(itertools.product(range(num_tags), repeat=length))
        best = max(paths, key=lambda p: _path_score(crf, emissions[b], p))
        assert tuple(decoded[b]) == best


def test_crf_learns_transition_dependent_tags():
    # Tokens 0/1; tag O (0) for token 0, and for token 1 B (1) after O or at the start, else I (2). Emissions alone
    # see only the token, so telling B from I needs the learned start and O->B / B->I / I->I transitions.
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2, (64, 10), generator=gen)
    lengths = torch.randint(4, 11, (64,), generator=gen)
    mask = torch.arange(10)[None, :] < lengths[:, None]
    tags = torch.zeros_like(tokens)
    for t in range(10):
        inside = tokens[:, t] == 1
        after_entity = tags[:, t - 1] > 0 if t else torch.zeros(64, dtype=torch.bool)
        tags[:, t] = torch.where(inside, torch.where(after_entity, 2, 1), 0)
    embed, crf = torch.nn.Embedding(2, 3), CRF(3)
    optimizer = torch.optim.Adam([*embed.parameters(), *crf.parameters()], lr=0.05)
    initial = crf(embed(tokens), tags, mask).item()
    for _ in range(300):
        optimizer.zero_grad()
        loss = crf(embed(tokens), tags, mask)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 < initial / 10
    gold = [row[:n] for row, n in zip(tags.tolist(), lengths.tolist())]
    assert crf.decode(embed(tokens), mask) == gold
    assert crf.transitions[0, 1] > crf.transitions[0, 2]  # O->B preferred over O->I


def test_crf_rejects_bad_inputs():
    crf = CRF(3)
    emissions, tags = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.bool)
    bad_first = mask.clone()
    bad_first[1, 0] = False
    with pytest.raises(ValueError, match="first column must be all True"):
        crf(emissions, tags, bad_first)
    with pytest.raises(ValueError, match="first column must be all True"):
        crf.decode(emissions, bad_first)
    gap = mask.clone()
    gap[0, 2] = False
    with pytest.raises(ValueError, match="no gaps"):
        crf(emissions, tags, gap)
    with pytest.raises(ValueError, match="bool"):
        crf(emissions, tags, mask.long())
    with pytest.raises(ValueError, match=r"emissions must be \(batch, seq, 3\)"):
        crf(torch.randn(2, 4, 5), tags, mask)
    with pytest.raises(ValueError, match="tags"):
        crf(emissions, tags[:, :3], mask)
    with pytest.raises(ValueError, match="mask"):
        crf.decode(emissions, mask[:1])
    with pytest.raises(ValueError, match="at least one token"):
        crf.decode(torch.randn(2, 0, 3), torch.ones(2, 0, dtype=torch.bool))
