"""Translation metrics on token sequences: BLEU, bag-of-tokens P/R/F1, sacrebleu wrappers.

Two BLEUs, each with its own job. The run's dev BLEU (evaluation, summary.json, the final line) is
sacrebleu's on detokenized text (`sacrebleu_score`): the field's standard score, reported with its
signature. `corpus_bleu` / `sentence_bleu` / `bleu_by_length` are the library's fast token-level
BLEU for users who score ids or tokens (analyses, studies, tests); tests/test_metrics.py checks
them against sacrebleu.

BLEU mirrors ``sacrebleu`` (``tokenize="none"`` on space-joined tokens) exactly, including its
smoothing methods and edge cases, but counts n-grams for the whole corpus at once with numpy:
every n-gram becomes one integer id per (sentence, n-gram), built order by order from the id of
its (n-1)-gram prefix, so matching is a sort plus a few bincounts instead of Python Counters.

Tokens may be ints (ids) or strings; they are compared by equality. For parity with sacrebleu,
string tokens must be non-empty and free of whitespace.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import sacrebleu

Tokens = Sequence[Hashable] | np.ndarray

# Smoothing methods and their default values, as in sacrebleu.BLEU.SMOOTH_DEFAULTS.
SMOOTH_DEFAULTS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}


class BleuScore(NamedTuple):
    """BLEU in 0..100, n-gram precisions in percent, brevity penalty, system/reference lengths."""

    score: float
    precisions: tuple[float, ...]
    bp: float
    sys_len: int
    ref_len: int


def _is_sequence(x) -> bool:
    return isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, str)


def _reference_streams(hypotheses, references, *, multi: bool) -> list:
    """The reference streams (``references`` if multi, else ``[references]``), checked: ValueError
    unless the hypotheses and every stream are lists with one entry per hypothesis."""
    if not _is_sequence(hypotheses):
        raise ValueError(f"hypotheses must be a list of sentences, got {type(hypotheses).__name__}")
    streams = references if multi else [references]
    if not _is_sequence(streams):
        raise ValueError(f"references must be a list of reference streams, e.g. [refs], got {type(streams).__name__}")
    for i, stream in enumerate(streams):
        if not _is_sequence(stream):
            name = f"reference stream {i}" if multi else "references"
            raise ValueError(f"{name} must be a list of sentences, got {type(stream).__name__}")
    if not streams:
        raise ValueError("need at least one reference stream: corpus_bleu(hyps, [refs])")
    lengths = [len(s) for s in streams]
    if len(set(lengths)) > 1:
        raise ValueError(f"reference streams have unequal lengths: {lengths}")
    if lengths[0] != len(hypotheses):
        hint = " per stream (BLEU references are a list of streams: corpus_bleu(hyps, [refs]))" if multi else ""
        raise ValueError(f"{len(hypotheses)} hypotheses but {lengths[0]} references{hint}")
    return list(streams)


def _token_ids(streams: Sequence[Sequence[Tokens]]) -> tuple[np.ndarray, int]:
    """All tokens of all streams, flattened, as int64 ids in [0, vocab); returns (ids, vocab)."""
    tokens = np.array(list(chain.from_iterable(chain.from_iterable(streams))))
    # Raw non-negative int ids are used as they are when later keys (< len * vocab) fit in int64.
    if tokens.dtype.kind in "iu" and tokens.size and tokens.min() >= 0:
        vocab = int(tokens.max()) + 1
        if vocab * (tokens.size + sum(map(len, streams))) < 2**63:
            return tokens.astype(np.int64), vocab
    vocab_tokens, ids = np.unique(tokens, return_inverse=True)
    return ids.astype(np.int64), len(vocab_tokens)


def _sentence_stats(hypotheses: Sequence[Tokens], references, max_order: int, multi: bool = True) -> np.ndarray:
    """Per-sentence BLEU statistics, int64[N, 2 + 2 * max_order]; references as in _reference_streams.

    Columns: hypothesis length, closest reference length (ties -> shorter), clipped n-gram
    matches for n = 1..max_order, hypothesis n-gram counts for n = 1..max_order.
    """
    streams = [hypotheses, *_reference_streams(hypotheses, references, multi=multi)]
    for seq in chain.from_iterable(streams):
        if isinstance(seq, str):
            raise TypeError("BLEU takes token sequences, not strings: split them first")
        if not _is_sequence(seq):
            raise TypeError(f"a sentence must be a token sequence, got {type(seq).__name__}")
    n_sent = len(hypotheses)
    lengths = np.array([[len(seq) for seq in stream] for stream in streams], np.int64)
    tokens, vocab = _token_ids(streams)

    # Each token's segment (stream-major), stream, sentence and the end of its segment.
    seg = np.repeat(np.arange(lengths.size), lengths.ravel())
    stream, sent = np.divmod(seg, n_sent)
    seg_end = np.cumsum(lengths.ravel())[seg]

    # pos: start of every n-gram still able to match; key: id of its (sentence, (n-1)-gram prefix).
    pos, key, key_sent = np.arange(tokens.size), sent, np.arange(n_sent)
    correct = np.zeros((max_order, n_sent), np.int64)
    for n in range(max_order):
        fits = pos + n < seg_end[pos]
        pos, key = pos[fits], key[fits]
        uniq, key = np.unique(key * vocab + tokens[pos + n], return_inverse=True)
        key_sent = key_sent[uniq // vocab]
        counts = np.bincount(stream[pos] * len(uniq) + key, minlength=len(streams) * len(uniq))
        counts = counts.reshape(len(streams), len(uniq))
        hyp_counts, ref_counts = counts[0], counts[1:].max(axis=0)
        clipped = np.minimum(hyp_counts, ref_counts)
        correct[n] = np.bincount(key_sent, weights=clipped, minlength=n_sent)
        # An n-gram absent from the hypothesis or all references cannot start a longer match.
        alive = clipped[key] > 0
        pos, key = pos[alive], key[alive]

    sys_len, ref_lens = lengths[0], lengths[1:]
    # Closest reference length, the shorter one on ties: argmin of (distance, length).
    distance = np.abs(ref_lens - sys_len)
    closest = np.argmin(distance * (ref_lens.max(initial=0) + 1) + ref_lens, axis=0)
    ref_len = ref_lens[closest, np.arange(n_sent)]
    total = np.maximum(sys_len[None, :] - np.arange(max_order)[:, None], 0)
    return np.column_stack([sys_len, ref_len, correct.T, total.T])


def _bleu(
    stats: np.ndarray, max_order: int, smooth_method: str, smooth_value: float | None,
    effective_order: bool,
) -> BleuScore:
    """BLEU from summed statistics, with sacrebleu's smoothing (BLEU.compute_bleu) semantics."""
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth_method {smooth_method!r}; one of {list(SMOOTH_DEFAULTS)}")
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    sys_len, ref_len = int(stats[0]), int(stats[1])
    correct, total = stats[2 : 2 + max_order].tolist(), stats[2 + max_order :].tolist()

    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return BleuScore(0.0, tuple(precisions), bp, sys_len, ref_len)

    order, exp_denominator = max_order, 1
    for n in range(max_order):
        matches, count = correct[n], total[n]
        if smooth_method == "add-k" and n > 0:
            matches, count = matches + smooth_value, count + smooth_value
        if count == 0:
            break
        if effective_order:
            order = n + 1
        if matches:
            precisions[n] = 100.0 * matches / count
        elif smooth_method == "exp":
            exp_denominator *= 2
            precisions[n] = 100.0 / (exp_denominator * count)
        elif smooth_method == "floor":
            precisions[n] = 100.0 * smooth_value / count

    used = precisions[:order]
    score = bp * math.exp(sum(map(math.log, used)) / order) if all(used) else 0.0
    return BleuScore(score, tuple(precisions), bp, sys_len, ref_len)


def corpus_bleu(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    max_order: int = 4,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
) -> BleuScore:
    """Corpus BLEU of token sequences; ``references`` is a list of streams, e.g. ``[refs]``.

    Equals ``sacrebleu.corpus_bleu`` with ``tokenize="none"`` on space-joined tokens.
    """
    stats = _sentence_stats(hypotheses, references, max_order).sum(axis=0)
    return _bleu(stats, max_order, smooth_method, smooth_value, effective_order=False)


def sentence_bleu(
    hypothesis: Tokens,
    references: Sequence[Tokens],
    max_order: int = 4,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
) -> BleuScore:
    """BLEU of one hypothesis against its references (a list of token sequences).

    Like ``sacrebleu.sentence_bleu``, uses the effective order: n-gram orders the hypothesis
    is too short to have are left out of the geometric mean.
    """
    if not _is_sequence(references):
        raise ValueError(f"references must be a list of token sequences, got {type(references).__name__}")
    stats = _sentence_stats([hypothesis], [[ref] for ref in references], max_order)[0]
    return _bleu(stats, max_order, smooth_method, smooth_value, effective_order=True)


def bleu_by_length(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    source_lengths: Sequence[int],
    buckets: Sequence[float],
    max_order: int = 4,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
) -> list[tuple[str, int, BleuScore]]:
    """Corpus BLEU per source-length bucket: ``[(label, n_sentences, BleuScore), ...]``.

    ``buckets`` are increasing inclusive upper bounds, e.g. ``(10, 20, 30, 40, math.inf)``;
    bucket i holds sentences with ``buckets[i-1] < length <= buckets[i]`` and is labelled
    e.g. ``"11-20"`` (``"41+"`` for an infinite bound). ``references`` and the BLEU options are
    as for `corpus_bleu`. Empty buckets are kept, with a BLEU of 0.
    """
    stats = _sentence_stats(hypotheses, references, max_order)
    source_lengths = np.asarray(source_lengths)
    if len(source_lengths) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(source_lengths)} source lengths")
    if np.any(np.diff(buckets) <= 0):
        raise ValueError(f"buckets must be increasing, got {buckets}")
    if np.any(source_lengths > buckets[-1]):
        raise ValueError(f"a source length exceeds the last bucket bound {buckets[-1]}")
    which = np.searchsorted(buckets, source_lengths, side="left")
    result = []
    for i, upper in enumerate(buckets):
        lower = buckets[i - 1] + 1 if i else 0
        label = f"{lower:g}+" if math.isinf(upper) else f"{lower:g}-{upper:g}"
        members = which == i
        score = _bleu(stats[members].sum(axis=0), max_order, smooth_method, smooth_value, False)
        result.append((label, int(members.sum()), score))
    return result


def precision_recall_f1(
    hypotheses: Sequence[Tokens], references: Sequence[Tokens]
) -> tuple[float, float, float]:
    """Bag-of-tokens precision, recall and F1 in 0..1, micro-averaged over the corpus.

    Each sentence's matches are clipped token counts (a token repeated k times in the hypothesis
    matches at most as often as it occurs in the reference). ``references`` is ONE stream.
    precision = matches / hypothesis tokens, recall = matches / reference tokens, F1 their
    harmonic mean; each is 0 when its denominator is 0.
    """
    stats = _sentence_stats(hypotheses, references, max_order=1, multi=False).sum(axis=0)
    hyp_tokens, ref_tokens, matches = (int(x) for x in stats[:3])
    precision = matches / hyp_tokens if hyp_tokens else 0.0
    recall = matches / ref_tokens if ref_tokens else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _sacrebleu_references(hyp_texts: Sequence[str], ref_texts: Sequence[str]) -> list[list[str]]:
    """[ref_texts] for sacrebleu, checked: ValueError for unequal counts or no sentences (where
    sacrebleu raises IndexError)."""
    _reference_streams(hyp_texts, ref_texts, multi=False)
    if not hyp_texts:
        raise ValueError("no sentences to score: sacrebleu needs at least one hypothesis")
    return [list(ref_texts)]


def sacrebleu_score(
    hyp_texts: Sequence[str], ref_texts: Sequence[str], tokenize: str = "13a"
) -> tuple[float, str]:
    """sacrebleu BLEU of detokenized texts against ONE reference stream, and its signature."""
    references = _sacrebleu_references(hyp_texts, ref_texts)
    bleu = sacrebleu.BLEU(tokenize=tokenize)
    score = bleu.corpus_score(list(hyp_texts), references).score
    return score, str(bleu.get_signature())


def chrf_score(hyp_texts: Sequence[str], ref_texts: Sequence[str]) -> float:
    """sacrebleu corpus chrF of detokenized texts against ONE reference stream."""
    return sacrebleu.CHRF().corpus_score(list(hyp_texts), _sacrebleu_references(hyp_texts, ref_texts)).score
