"""The one decode driver: source sentences -> n-best hypotheses in input order, for any compiled
batch decoder. `inference.CorpusDecoder` (the jitted model, maybe on a mesh) and
`export.ExportedTranslator` (deserialised `jax.export` functions) each give a `Driver` their
callable and the shapes it was built for; training's dev BLEU, translate and export all decode
through it. Everything it does depends on the sources and the options only, never on a reference
(docs/architecture.md, "Decode path"):
  * blank sentences are not decoded (their one result is `hypotheses.BLANK`);
  * sentences are grouped into length buckets by their source length;
  * each row's output limit is floor(max_len_a * source pieces + max_len_b) (fairseq's rule),
    capped by its bucket's compiled limit (`output_limit`, or the option max_len); a forced prefix
    raises it to hold the prefix and one more piece (a prefix that leaves no room within the
    compiled limit is refused, naming its line);
  * sampling: each row draws with its own key, fold_in(PRNGKey(seed), the sentence's line in the
    whole input), so a sentence's samples depend neither on its batch nor on how the input is split;
  * batch invariance: every call decodes [rows_per_call, bucket] arrays whatever the number of
    sentences; XLA's float results depend on array shapes, not on the other rows, so a sentence's
    tokens and score do not depend on what else is translated with it.
Only jax and numpy: the loader of exported artifacts uses it without the model code.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from s2s_jax import PAD_ID, data, decoding, sources
from s2s_jax.hypotheses import BLANK, Hypothesis, unpack
from s2s_jax.options import SearchOptions

# Prefixes are padded to a multiple of this many pieces (bounds the number of compiled shapes).
PREFIX_QUANTUM = 8


class CallInputs(NamedTuple):
    """The traced inputs of one decoding call; all [rows, ...] with rows = Driver.rows_per_call."""
    src: np.ndarray                 # int32[rows, S] source ids + EOS, then PAD (S: the bucket length)
    src_len: np.ndarray             # int32[rows] source lengths incl. EOS (filler rows: 1)
    max_lens: np.ndarray            # int32[rows] each row's output limit (<= the compiled limit)
    prefix: np.ndarray | None       # int32[rows, P] forced target prefixes, or None when none has one
    prefix_lens: np.ndarray | None  # int32[rows], or None
    rng: np.ndarray | None          # uint32[rows, 2] sampling keys (search="sample"), else None


# decode(inputs, max_len) -> (sequences [rows, N, L], scores [rows, N], lengths [rows, N],
# attention [rows, N, L, S] or None), L = max_len: the bucket's compiled output limit.
BatchDecode = Callable[[CallInputs, int], tuple]


def output_limit(bucket_length: int, max_decode_len: int) -> int:
    """The compiled output limit of a source bucket of `bucket_length` positions."""
    return min(max_decode_len, 2 * bucket_length + 10)


def output_limits(boundaries: Sequence[int], max_source_len: int, max_decode_len: int,
                  max_len: int | None = None) -> dict[int, int]:
    """{bucket length: compiled output limit} for every bucket a source of 1..max_source_len
    pieces (+ EOS) can fall into; max_len: one limit for all instead of `output_limit`'s."""
    lengths = sorted({data.padded_length(n + 1, boundaries) for n in range(1, max_source_len + 1)})
    return {length: max_len or output_limit(length, max_decode_len) for length in lengths}


def row_keys(seed: int, lines: Sequence[int]) -> np.ndarray:
    """Sampling keys uint32[rows, 2]: row r's is fold_in(PRNGKey(seed), lines[r]), so a sentence's
    samples depend on the seed and its line (from 0) only, never on its batch or chunk."""
    return np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed),
                                                                      np.asarray(lines, np.uint32)))


def prefix_arrays(prefixes: list[list[int]], rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prefix int32[rows, P], prefix_lens int32[rows]) with P a multiple of PREFIX_QUANTUM, or
    (None, None) when no sentence of the batch has a prefix."""
    longest = max((len(p) for p in prefixes), default=0)
    if not longest:
        return None, None
    width = -(-longest // PREFIX_QUANTUM) * PREFIX_QUANTUM
    prefix = np.full((rows, width), PAD_ID, np.int32)
    lens = np.zeros(rows, np.int32)
    for row, ids in enumerate(prefixes):
        prefix[row, :len(ids)], lens[row] = ids, len(ids)
    return prefix, lens


class Driver(NamedTuple):
    """A compiled batch decoder and the shapes it was built for; `driver(sentences, options)`
    decodes a corpus with it."""
    decode: BatchDecode
    src_tokenizer: Any
    tgt_tokenizer: Any
    boundaries: Sequence[int]       # source bucket boundaries (pieces incl. EOS)
    max_source_len: int             # longest source in pieces, EOS excluded (longer: options.on_long)
    output_limits: Mapping[int, int]  # bucket length -> compiled output limit (EOS included)
    rows_per_call: int              # rows of every call (batch invariance)

    def __call__(self, sentences: Sequence[str], options: SearchOptions,
                 prefixes: Sequence[str | None] | None = None, first_line: int = 1) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best hypotheses, best first; a blank sentence gives [BLANK].

        options: checked already (max_len_a, max_len_b, on_long, search and seed are read here).
        prefixes: optional target text per sentence (or None) that every hypothesis starts with.
        first_line: the line number of the first sentence in messages (a part of a longer input).
        """
        sentences = sources.sentence_list(sentences)
        src_ids = [sources.source_ids(self.src_tokenizer, s, first_line - 1 + i, self.max_source_len, options.on_long)
                   for i, s in enumerate(sentences)]
        forced = sources.prefix_ids(self.tgt_tokenizer, prefixes, len(src_ids))
        results = [[BLANK] for _ in src_ids]
        todo = [i for i, ids in enumerate(src_ids) if ids]  # blank lines are not decoded
        # Source-only buckets: the reference never shapes the decoding.
        batches = data.eval_batches([src_ids[i] for i in todo], [[] for _ in todo], batch_size=self.rows_per_call,
                                    boundaries=self.boundaries)
        batch_sentences = [[todo[i] for i in batch.index if i >= 0] for batch in batches]
        self._check_prefixes(batches, batch_sentences, forced, first_line)
        for batch, indices in zip(batches, batch_sentences):  # one compilation per bucket and search
            cap = self.output_limits[batch.src.shape[1]]
            lines = [first_line - 1 + todo[i] if i >= 0 else 0 for i in batch.index]
            inputs = self._inputs(batch, [forced[i] for i in indices], lines, cap, options)
            sequences, scores, lengths, attention = (None if x is None else np.asarray(x)
                                                     for x in self.decode(inputs, cap))
            for row, index in enumerate(indices):  # attention: [rows, N, L, S], cut to the row's source
                results[index] = unpack(self.tgt_tokenizer, sequences[row], scores[row], lengths[row],
                                        None if attention is None else attention[row, :, :, :batch.src_len[row]])
        return results

    def _inputs(self, batch: data.Batch, prefixes: list[list[int]], lines: list[int], cap: int,
                options: SearchOptions) -> CallInputs:
        """The call inputs of a batch: its rows' output limits, prefixes and sampling keys (lines:
        each row's line in the whole input, from 0)."""
        prefix, prefix_lens = prefix_arrays(prefixes, len(batch.index))
        max_lens = decoding.length_limits(batch.src_len - 1, options.max_len_a, options.max_len_b, cap)
        if prefix_lens is not None:  # room for the prefix and one more piece (within cap: checked)
            max_lens = np.maximum(max_lens, prefix_lens + 1)
        rng = row_keys(options.seed, lines) if options.search == "sample" else None
        return CallInputs(batch.src, batch.src_len, np.asarray(max_lens, np.int32), prefix, prefix_lens, rng)

    def _check_prefixes(self, batches: list[data.Batch], batch_sentences: list[list[int]],
                        forced: list[list[int]], first_line: int) -> None:
        """ValueError naming the first line whose prefix leaves no room for one more piece within
        its batch's compiled limit (batch_sentences: the sentences of each batch)."""
        for batch, indices in zip(batches, batch_sentences):
            cap = self.output_limits[batch.src.shape[1]]
            for index in indices:
                if len(forced[index]) >= cap:
                    raise ValueError(f"line {first_line + index}: its prefix of {len(forced[index])} pieces leaves "
                                     f"no room within the output limit of {cap} pieces; shorten the prefix "
                                     "or raise max_len")


# score(batch) -> float32[rows]: each row's summed target log-probability (filler rows: anything).
BatchScore = Callable[[data.Batch], np.ndarray]


def score_pairs(score: BatchScore, src_tokenizer: Any, tgt_tokenizer: Any, sentences: Sequence[str],
                targets: Sequence, *, boundaries: Sequence[int], max_source_len: int, rows: int,
                on_long: str = "truncate", first_line: int = 1) -> list[tuple[float, int]]:
    """Per (sentence, target) pair, in input order: (summed log-probability of the target's pieces
    and EOS, their number). The sources follow decoding's rules (at most max_source_len pieces,
    `on_long`); targets are texts or piece ids (`sources.target_ids`). Pairs are grouped by length
    into batches of `rows` rows, so a pair's score does not depend on the others."""
    sentences = sources.sentence_list(sentences)
    if isinstance(targets, str) or len(targets) != len(sentences):
        raise ValueError(f"{len(sentences)} sources but "
                         f"{'one string' if isinstance(targets, str) else len(targets)} targets: give one per source")
    src_ids = [sources.source_ids(src_tokenizer, s, first_line - 1 + i, max_source_len, on_long)
               for i, s in enumerate(sentences)]
    tgt_ids = [sources.target_ids(tgt_tokenizer, t, first_line - 1 + i) for i, t in enumerate(targets)]
    log_probs = np.zeros(len(sentences), np.float64)
    for batch in data.eval_batches(src_ids, tgt_ids, batch_size=rows, boundaries=boundaries):
        scores = np.asarray(score(batch))
        real = batch.index >= 0
        log_probs[batch.index[real]] = scores[real]
    return [(float(lp), len(ids) + 1) for lp, ids in zip(log_probs, tgt_ids)]
