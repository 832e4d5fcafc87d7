"""The model side of decoding: a jitted batch decoder, and the corpus decoder that training's dev
BLEU and `Translator` both use.

The encoder runs once per batch; its memory and attention keys stay in `step_fn`'s closure with
shape [B, S, ...] and are never tiled per beam (DESIGN.md section 2).

`CorpusDecoder` turns source sentences into n-best hypotheses in input order. Everything it does
depends on the sources and the options only, never on a reference: sentences are grouped into
length buckets by their source length, and the output limit of a bucket is
min(eval.max_decode_len, 2 * bucket length + 10) unless `max_len` is given.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from s2s_jax import EOS_ID, data, decoding
from s2s_jax.models import Seq2Seq
from s2s_jax.validate import is_int

logger = logging.getLogger(__name__)

SEARCHES = ("beam", "greedy")
ON_LONG = ("truncate", "error")
# Largest [rows, beam, vocab] log-prob block decoded at once (float32: 512 MiB); batches shrink to fit.
MAX_STEP_ELEMENTS = 1 << 27


def step_fn_for(model: Seq2Seq, params, src: jax.Array, src_len: jax.Array):
    """Encodes the batch; returns (step_fn, init_state) fitting `decoding.beam_search`."""
    memory, init_state = model.apply({"params": params}, src, src_len, method=Seq2Seq.encode)

    def step_fn(tokens, state):
        return model.apply({"params": params}, memory, tokens, state, method=Seq2Seq.decode_step)

    return step_fn, init_state


@functools.partial(jax.jit, static_argnames=("model", "search", "beam_size", "max_len", "alpha", "n_best"))
def decode_batch(model: Seq2Seq, params, src: jax.Array, src_len: jax.Array, *, search: str = "greedy",
                 beam_size: int = 5, max_len: int = 100, alpha: float = 0.6,
                 n_best: int | None = None) -> decoding.Beams:
    """src [B, S], src_len [B] -> Beams(sequences [B, N, max_len], scores [B, N], lengths [B, N])."""
    step_fn, init_state = step_fn_for(model, params, src, src_len)
    if search == "greedy":
        return decoding.greedy_search(step_fn, init_state, max_len=max_len)
    if search == "beam":
        return decoding.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_len,
                                    alpha=alpha, n_best=n_best)
    raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")


def max_decode_len(source_length: int, cap: int) -> int:
    """Output length limit for a source bucket of `source_length` positions."""
    return min(cap, 2 * source_length + 10)


class Hypothesis(NamedTuple):
    """One output of the search."""
    text: str          # detokenized
    ids: list[int]     # target ids, EOS excluded
    score: float       # beam: GNMT length-penalised log-prob; greedy: summed log-prob


class SearchOptions(NamedTuple):
    """How to decode. `check` validates them against a model; the API and the CLI share them."""
    search: str = "beam"
    beam_size: int = 5
    alpha: float = 0.6
    n_best: int = 1
    max_len: int | None = None   # output limit in pieces, EOS included; None = the bucket rule
    batch_size: int = 64
    on_long: str = "truncate"    # a source longer than data.max_len: "truncate" (warn) or "error"

    @classmethod
    def from_eval_config(cls, eval_cfg, search: str) -> SearchOptions:
        """The options of dev BLEU during training (config.eval) for `search`."""
        return cls(search=search, beam_size=int(eval_cfg.beam_size), alpha=float(eval_cfg.alpha),
                   batch_size=int(eval_cfg.batch_size))

    def check(self, *, vocab_size: int, max_output_len: int) -> None:
        """Raises ValueError naming the first bad option; sizes are capped by what the model allows."""
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.on_long not in ON_LONG:
            raise ValueError(f"on_long must be one of {ON_LONG}, got {self.on_long!r}")
        for name in ("beam_size", "n_best", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.beam_size > vocab_size:
            raise ValueError(f"beam_size must be <= the target vocabulary size {vocab_size}, got {self.beam_size}")
        if self.max_len is not None and (not is_int(self.max_len) or not 1 <= self.max_len <= max_output_len):
            raise ValueError(f"max_len must be an integer in [1, {max_output_len}] (4x the longest training "
                             f"sentence, or eval.max_decode_len), or None for the default rule; got {self.max_len!r}")
        if self.search == "beam" and self.n_best > self.beam_size:
            raise ValueError(f"n_best must be <= beam_size, got n_best={self.n_best} > beam_size={self.beam_size}")
        if self.search == "greedy" and self.n_best != 1:
            raise ValueError(f"greedy search returns one hypothesis; got n_best={self.n_best}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class CorpusDecoder:
    """Source sentences -> n-best hypotheses in input order, for one model and its tokenizers."""

    def __init__(self, config, model: Seq2Seq, src_tokenizer, tgt_tokenizer):
        self.model, self.src_tokenizer, self.tgt_tokenizer = model, src_tokenizer, tgt_tokenizer
        self.boundaries = [int(b) for b in config.data.bucket_boundaries]
        # Longest source in pieces (EOS excluded): what the model was trained on; fits the last bucket.
        self.max_source_len = int(config.data.max_len)
        self.max_len_cap = int(config.eval.max_decode_len)
        # Hard cap on any output limit: 4x the longest training sentence, or the configured cap.
        self.max_output_len = max(self.max_len_cap, 4 * (self.max_source_len + 1))

    def check(self, options: SearchOptions) -> None:
        options.check(vocab_size=self.tgt_tokenizer.vocab_size, max_output_len=self.max_output_len)

    def source_ids(self, sentence: str, index: int, on_long: str) -> list[int]:
        """Piece ids of one sentence (EOS excluded), at most max_source_len of them; [] if blank."""
        if not isinstance(sentence, str):
            raise TypeError(f"sentence {index + 1} is a {type(sentence).__name__}, not a string")
        if not sentence.strip():
            return []
        try:
            ids = self.src_tokenizer.encode([sentence])[0]
        except ValueError as error:
            raise ValueError(f"line {index + 1}: cannot tokenize {preview(sentence)}: {error}") from None
        limit = self.max_source_len
        if len(ids) > limit:
            message = f"{len(ids)} source pieces, more than the {limit} the model was trained on (data.max_len)"
            if on_long == "error":
                raise ValueError(f"line {index + 1}: {message}: {preview(sentence)}; shorten it or use "
                                 "on_long='truncate'")
            logger.warning("sentence %d (line %d): %s; truncated to the first %d", index, index + 1, message, limit)
            ids = ids[:limit]
        return ids

    def __call__(self, params, sentences: Sequence[str], options: SearchOptions) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best hypotheses, best first; a blank sentence gives [Hypothesis("", [], 0.0)]."""
        self.check(options)
        if isinstance(sentences, str):
            raise TypeError("translate takes a list of sentences, not one string")
        src_ids = [self.source_ids(s, i, options.on_long) for i, s in enumerate(sentences)]
        results = [[Hypothesis("", [], 0.0)] for _ in src_ids]
        todo = [i for i, ids in enumerate(src_ids) if ids]  # blank lines are not decoded
        if not todo:
            return results
        greedy = options.search == "greedy"  # one static signature for greedy, whatever beam options say
        beam_size = 1 if greedy else options.beam_size
        rows = min(options.batch_size, _pow2_at_least(len(todo)),
                   max(1, MAX_STEP_ELEMENTS // (beam_size * self.tgt_tokenizer.vocab_size)))
        # Source-only buckets: the reference never shapes the decoding.
        batches = data.eval_batches([src_ids[i] for i in todo], [[] for _ in todo], batch_size=rows,
                                    boundaries=self.boundaries)
        for batch in batches:  # [rows, bucket] each: one compilation per bucket and search
            real = int(np.sum(batch.index >= 0))
            limit = options.max_len or max_decode_len(batch.src.shape[1], self.max_len_cap)
            beams = decode_batch(self.model, params, batch.src, batch.src_len,
                                 search=options.search, beam_size=beam_size, max_len=limit,
                                 alpha=0.0 if greedy else float(options.alpha),
                                 n_best=None if greedy else options.n_best)
            sequences, scores, lengths = (np.asarray(x) for x in beams)  # [b, N, L], [b, N], [b, N]
            for row in range(real):
                results[todo[batch.index[row]]] = self._hypotheses(sequences[row], scores[row], lengths[row])
        return results

    def _hypotheses(self, sequences: np.ndarray, scores: np.ndarray, lengths: np.ndarray) -> list[Hypothesis]:
        """One sentence's result slots [N, L], [N], [N] -> hypotheses; empty slots are dropped."""
        hyps = [Hypothesis("", [int(t) for t in sequences[k, :lengths[k]] if t != EOS_ID], float(scores[k]))
                for k in range(len(lengths)) if lengths[k] > 0]
        texts = self.tgt_tokenizer.decode([h.ids for h in hyps])
        return [h._replace(text=t) for h, t in zip(hyps, texts)]


def preview(sentence: str, width: int = 60) -> str:
    return repr(sentence if len(sentence) <= width else sentence[:width] + "...")
