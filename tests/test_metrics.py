"""Tests for s2s_jax.metrics: parity with sacrebleu, hand-worked cases, errors."""

import math

import numpy as np
import pytest
import sacrebleu

from s2s_jax.metrics import (
    BleuScore,
    bleu_by_length,
    chrf_score,
    corpus_bleu,
    precision_recall_f1,
    sacrebleu_score,
    sentence_bleu,
)

SMOOTH_METHODS = ("none", "floor", "add-k", "exp")


def joined(seq) -> str:
    return " ".join(map(str, seq))


def random_corpus(rng, vocab: int, n_refs: int, n: int = 40):
    """Hypotheses (noisy copies of the first reference, some empty or 1-3 tokens), ref streams."""
    streams = [[rng.integers(0, vocab, rng.integers(0, 15)).tolist() for _ in range(n)]
               for _ in range(n_refs)]
    hyps = []
    for ref in streams[0]:
        hyp = [t if rng.random() < 0.7 else int(rng.integers(0, vocab)) for t in ref]
        hyps.append(hyp[: rng.choice([0, 1, 2, 3, len(hyp), len(hyp) + 1])])
    return hyps, streams


def assert_same(ours: BleuScore, theirs) -> None:
    assert ours.score == pytest.approx(theirs.score, abs=1e-6)
    np.testing.assert_allclose(ours.precisions, theirs.precisions, atol=1e-9)
    assert ours.bp == pytest.approx(theirs.bp, abs=1e-12)
    assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)


@pytest.mark.parametrize("smooth_method", SMOOTH_METHODS)
@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("vocab", [3, 10, 1000])
def test_corpus_and_sentence_bleu_match_sacrebleu(vocab, n_refs, smooth_method):
    rng = np.random.default_rng([vocab, n_refs, SMOOTH_METHODS.index(smooth_method)])
    for _ in range(4):
        hyps, refs = random_corpus(rng, vocab, n_refs)
        theirs = sacrebleu.corpus_bleu([joined(h) for h in hyps],
                                       [[joined(r) for r in stream] for stream in refs],
                                       tokenize="none", smooth_method=smooth_method)
        assert_same(corpus_bleu(hyps, refs, smooth_method=smooth_method), theirs)

        for i in range(10):
            sentence_refs = [stream[i] for stream in refs]
            theirs = sacrebleu.sentence_bleu(joined(hyps[i]), [joined(r) for r in sentence_refs],
                                             tokenize="none", smooth_method=smooth_method)
            assert_same(sentence_bleu(hyps[i], sentence_refs, smooth_method=smooth_method), theirs)


def test_smooth_value_and_max_order_match_sacrebleu():
    hyps, refs = random_corpus(np.random.default_rng(1), vocab=5, n_refs=1)
    for method, value in [("floor", 0.5), ("add-k", 2)]:
        theirs = sacrebleu.BLEU(tokenize="none", smooth_method=method, smooth_value=value,
                                max_ngram_order=3)
        theirs = theirs.corpus_score([joined(h) for h in hyps], [[joined(r) for r in refs[0]]])
        assert_same(corpus_bleu(hyps, refs, max_order=3, smooth_method=method,
                                smooth_value=value), theirs)


def test_perfect_match_is_100():
    score = corpus_bleu([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[[1, 2, 3, 4, 5], [6, 7, 8, 9]]])
    assert score.score == pytest.approx(100.0)  # exp(log(100)), as sacrebleu: 100.00000000000004
    assert score[1:] == ((100.0,) * 4, 1.0, 9, 9)


def test_no_4gram_match_without_smoothing_is_0():
    # 4-grams of the hypothesis: (1 2 3 4), (2 3 4 5); the reference has (1 2 3 9), (2 3 9 4),
    # (3 9 4 5): none match, while every unigram does.
    score = corpus_bleu([[1, 2, 3, 4, 5]], [[[1, 2, 3, 9, 4, 5]]], smooth_method="none")
    assert score.precisions[0] == 100.0 and score.precisions[3] == 0.0
    assert score.score == 0.0


def test_brevity_penalty_by_hand():
    # c = 4 hypothesis tokens, r = 8 reference tokens; all 4 + 3 + 2 + 1 hypothesis n-grams match,
    # so every precision is 100 and BLEU = 100 * BP = 100 * exp(1 - r / c) = 100 * exp(1 - 2).
    score = corpus_bleu([[1, 2, 3, 4]], [[[1, 2, 3, 4, 5, 6, 7, 8]]])
    assert score.precisions == (100.0,) * 4
    assert score.bp == pytest.approx(math.exp(1 - 8 / 4))
    assert score.score == pytest.approx(100 * math.exp(-1))


def test_clipped_unigram_precision_by_hand():
    # "7" occurs 4 times in the hypothesis, once in the reference: 1 of 4 unigrams match.
    assert corpus_bleu([[7, 7, 7, 7]], [[[7, 3]]]).precisions[0] == 25.0


def test_multi_reference_counts_and_closest_length():
    # Matches clip at the max count over references: "5" twice (ref b), "6" once.
    # Reference lengths 2 and 6 are equally close to 4: the shorter one is used.
    score = corpus_bleu([[5, 5, 6, 9]], [[[5, 6]], [[5, 5, 8, 8, 8, 8]]])
    assert score.precisions[0] == 75.0
    assert (score.sys_len, score.ref_len) == (4, 2)


def test_empty_corpus_and_empty_hypotheses():
    assert corpus_bleu([], [[]]) == BleuScore(0.0, (0.0,) * 4, 1.0, 0, 0)
    assert corpus_bleu([[]], [[[1, 2]]]) == BleuScore(0.0, (0.0,) * 4, 0.0, 0, 2)


def test_string_tokens_and_arrays_same_as_ints():
    rng = np.random.default_rng(2)
    hyps, refs = random_corpus(rng, vocab=12, n_refs=2)
    words = [f"w{i}" for i in range(12)]
    to_words = lambda seqs: [[words[t] for t in seq] for seq in seqs]  # noqa: E731
    as_ints = corpus_bleu(hyps, refs)
    assert corpus_bleu(to_words(hyps), [to_words(s) for s in refs]) == as_ints
    assert corpus_bleu([np.array(h, np.int32) for h in hyps], refs) == as_ints
    # Negative or huge ids take the re-indexing path and give the same result.
    shifted = lambda seqs: [[t * 2**40 - 5 for t in seq] for seq in seqs]  # noqa: E731
    assert corpus_bleu(shifted(hyps), [shifted(s) for s in refs]) == as_ints
    assert sentence_bleu(to_words([hyps[0]])[0], to_words([refs[0][0]])) == sentence_bleu(
        hyps[0], [refs[0][0]])
    assert precision_recall_f1(to_words(hyps), to_words(refs[0])) == precision_recall_f1(
        hyps, refs[0])


def test_precision_recall_f1_by_hand():
    # Clipping: "1" matches min(3, 1) = 1 time, "2" min(1, 2) = 1 time -> 2 matches,
    # 4 hypothesis tokens, 5 reference tokens.
    p, r, f1 = precision_recall_f1([[1, 1, 1, 2]], [[1, 2, 2, 3, 4]])
    assert (p, r) == (2 / 4, 2 / 5)
    assert f1 == pytest.approx(2 * 0.5 * 0.4 / (0.5 + 0.4))
    # Micro-average: 2 + 0 matches over 3 hypothesis and 4 reference tokens.
    assert precision_recall_f1([[1, 2], [3]], [[1, 2, 3], [4]])[:2] == (2 / 3, 2 / 4)
    # Tokens only match within their own sentence.
    assert precision_recall_f1([[1], [2]], [[2], [1]]) == (0.0, 0.0, 0.0)


def test_precision_recall_f1_empty():
    assert precision_recall_f1([[]], [[1, 2]]) == (0.0, 0.0, 0.0)
    assert precision_recall_f1([[]], [[]]) == (0.0, 0.0, 0.0)
    assert precision_recall_f1([], []) == (0.0, 0.0, 0.0)
    p, r, f1 = precision_recall_f1([[], [1]], [[1], [1]])
    assert (p, r) == (1.0, 0.5) and f1 == pytest.approx(2 / 3)


def test_mismatched_counts_raise():
    with pytest.raises(ValueError, match=r"3 hypotheses but 2 references"):
        corpus_bleu([[1], [2], [3]], [[[1], [2]]])
    with pytest.raises(ValueError, match=r"unequal lengths: \[2, 1\]"):
        corpus_bleu([[1], [2]], [[[1], [2]], [[1]]])
    with pytest.raises(ValueError, match=r"2 hypotheses but 1 references"):
        precision_recall_f1([[1], [2]], [[1]])
    with pytest.raises(ValueError, match=r"1 hypotheses but 2 references"):
        sacrebleu_score(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="smooth_method"):
        corpus_bleu([[1]], [[[1]]], smooth_method="bogus")
    with pytest.raises(TypeError, match="not strings"):
        corpus_bleu(["a b"], [["a b"]])


def test_empty_corpus_for_sacrebleu_is_a_value_error():
    # sacrebleu defines no score for an empty corpus (it raises IndexError), so the wrappers refuse it.
    with pytest.raises(IndexError):
        sacrebleu.corpus_bleu([], [[]])
    with pytest.raises(IndexError):
        sacrebleu.corpus_chrf([], [[]])
    for score in (sacrebleu_score, chrf_score):
        with pytest.raises(ValueError, match="^no sentences to score: sacrebleu needs at least one hypothesis$"):
            score([], [])


@pytest.mark.parametrize("call, message", [
    (lambda: corpus_bleu(None, None), "hypotheses must be a list of sentences, got NoneType"),
    (lambda: corpus_bleu([[1]], None), r"references must be a list of reference streams, e\.g\. \[refs\], got None"),
    (lambda: corpus_bleu([[1]], [[[1]], None]), "reference stream 1 must be a list of sentences, got NoneType"),
    (lambda: sentence_bleu([1], None), "references must be a list of token sequences, got NoneType"),
    (lambda: precision_recall_f1([[1]], None), "references must be a list of sentences, got NoneType"),
    (lambda: bleu_by_length(None, [[]], [], (10,)), "hypotheses must be a list of sentences, got NoneType"),
    (lambda: sacrebleu_score(None, ["a"]), "hypotheses must be a list of sentences, got NoneType"),
    (lambda: chrf_score(["a"], "a"), "references must be a list of sentences, got str"),
    (lambda: chrf_score(["a", "b"], ["a"]), "2 hypotheses but 1 references$"),
])
def test_bad_containers_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call()


def test_bad_sentences_are_type_errors():
    with pytest.raises(TypeError, match="a sentence must be a token sequence, got NoneType"):
        corpus_bleu([[1], None], [[[1], [2]]])
    with pytest.raises(TypeError, match="a sentence must be a token sequence, got int"):
        sentence_bleu(5, [[5]])


def test_sacrebleu_wrappers():
    hyps = ["The cat sat on the mat.", "A dog barked, loudly!"]
    refs = ["The cat sat on a mat.", "The dog barked loudly!"]
    score, signature = sacrebleu_score(hyps, refs)
    assert score == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert "tok:13a" in signature and "nrefs:1" in signature
    assert chrf_score(hyps, refs) == sacrebleu.corpus_chrf(hyps, [refs]).score


def test_bleu_by_length():
    rng = np.random.default_rng(3)
    hyps, refs = random_corpus(rng, vocab=20, n_refs=1, n=200)
    lengths = rng.integers(1, 60, len(hyps))
    lengths[:3] = [10, 11, 41]  # bucket edges: upper bounds are inclusive
    result = bleu_by_length(hyps, refs, lengths, (10, 20, 30, 40, math.inf))

    assert [label for label, _, _ in result] == ["0-10", "11-20", "21-30", "31-40", "41+"]
    bounds = [(0, 10), (11, 20), (21, 30), (31, 40), (41, 10**9)]
    for (_, count, score), (low, high) in zip(result, bounds):
        members = [i for i, n in enumerate(lengths) if low <= n <= high]
        assert count == len(members) > 0
        subset = corpus_bleu([hyps[i] for i in members], [[refs[0][i] for i in members]])
        assert score == subset

    empty = bleu_by_length(hyps[:1], [refs[0][:1]], [5], (3, 10))
    assert empty[0][:2] == ("0-3", 0) and empty[0][2].score == 0.0
    with pytest.raises(ValueError, match="exceeds the last bucket"):
        bleu_by_length(hyps[:1], [refs[0][:1]], [50], (10, 20))
