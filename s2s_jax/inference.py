"""The model side of decoding: a jitted batch decoder, and the corpus decoder that training's dev
BLEU and `Translator` both use.

The encoder runs once per batch; its memory and attention keys stay in `step_fn`'s closure with
shape [B, S, ...] and are never tiled per beam (DESIGN.md section 2).

`CorpusDecoder` turns source sentences into n-best hypotheses in input order. Everything it does
depends on the sources and the options only, never on a reference:
  * sentences are grouped into length buckets by their source length;
  * each row's output limit is floor(max_len_a * source pieces + max_len_b) (fairseq's rule),
    capped by the bucket's compiled limit min(eval.max_decode_len, 2 * bucket length + 10) or by
    an explicit `max_len`; a forced prefix raises it to hold the prefix and one more piece (a
    prefix that leaves no room within the compiled limit is refused, naming its line);
  * sampling: each row draws with its own key, fold_in(PRNGKey(seed), the sentence's line in the
    whole input), so a sentence's samples depend neither on its batch nor on how the input is split;
  * batch invariance: every call decodes [DECODE_ROWS, bucket] arrays (fewer rows only when
    beam x vocabulary would not fit the memory budget), whatever the number of sentences; XLA's
    float results depend on array shapes, not on the other rows, so a sentence's tokens and score
    do not depend on what else is translated with it;
  * on a mesh (`CorpusDecoder(mesh=...)`, one axis 'data'): each batch's rows (a multiple of the
    mesh's devices) are split over its devices, the parameters are replicated on it, and the
    results come back replicated, so every process of a multi-process mesh reads them all.

Beyond the plain searches (all opt-in; off, the compiled search is unchanged):
  * attention per hypothesis (`return_attention`): the model's decode state carries each step's
    attention weights (`Seq2Seq.encode(track_attention=True)`), which the search records and
    gathers along with the hypotheses (`decoding`'s `record_fn`);
  * GNMT coverage penalty (`coverage` = beta, beam only): the state also carries the summed
    attention, and a finished hypothesis's score gets beta * sum_i log(min(coverage_i, 1)) over the
    real source positions i (its EOS included), each log floored at log(COVERAGE_FLOOR);
  * ensembles: `model` and `params` may be tuples of models and their parameters (same target
    vocabulary): their log-probs are combined by `decoding.ensemble_step_fn` (log of the mean
    probability), each keeps its own encoder memory and state; an ensemble's attention and coverage
    are the means of its members'.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from s2s_jax import PAD_ID, data, decoding, parallel
from s2s_jax import attention as attn
from s2s_jax.data import Hypothesis
from s2s_jax.models import Seq2Seq
from s2s_jax.validate import is_int

SEARCHES = ("beam", "greedy", "sample")
ON_LONG = ("truncate", "error")
# Rows of every decoding call (batch invariance: one shape per bucket and search).
DECODE_ROWS = 32
# Largest [rows, hypotheses, vocab] log-prob block decoded at once (float32: 512 MiB).
MAX_STEP_ELEMENTS = 1 << 27
# Prefixes are padded to a multiple of this many pieces (bounds the number of compiled shapes).
PREFIX_QUANTUM = 8
# Coverage penalty: log(min(coverage, 1)) is floored at log(COVERAGE_FLOOR) (about -13.8), so a
# source position that got no attention costs a finite amount instead of -inf.
COVERAGE_FLOOR = 1e-6


def members(model, params) -> tuple[tuple[Seq2Seq, ...], tuple]:
    """(models, params) as tuples: one model, or the members of an ensemble."""
    return (model, params) if isinstance(model, tuple) else ((model,), (params,))


def step_fn_for(model: Seq2Seq | tuple[Seq2Seq, ...], params, src: jax.Array, src_len: jax.Array, *,
                track_attention: bool = False):
    """Encodes the batch; returns (step_fn, init_state) fitting `decoding.beam_search`.

    model, params: one model, or tuples of models and their params (an ensemble: the state is the
    tuple of the members' states). track_attention: the state holds `attention` and `coverage`
    (`Seq2Seq.encode`; read them with `tracked`).
    """
    step_fns, init_states = [], []
    for one, one_params in zip(*members(model, params), strict=True):
        memory, init_state = one.apply({"params": one_params}, src, src_len, track_attention=track_attention,
                                       method=Seq2Seq.encode)
        step_fns.append(functools.partial(_decode_step, one, one_params, memory))
        init_states.append(init_state)
    if isinstance(model, tuple):
        return decoding.ensemble_step_fn(step_fns), tuple(init_states)
    return step_fns[0], init_states[0]


def _decode_step(model: Seq2Seq, params, memory: attn.Memory, tokens, state):
    return model.apply({"params": params}, memory, tokens, state, method=Seq2Seq.decode_step)


def tracked(state, key: str) -> jax.Array:
    """The `attention` or `coverage` leaf [B, K, S] of a tracking decode state (step_fn_for), the
    mean over the members for an ensemble's state."""
    if isinstance(state, tuple):
        return sum(s[key] for s in state) / len(state)
    return state[key]


def coverage_penalty(coverage: jax.Array, mask: jax.Array, beta) -> jax.Array:
    """GNMT's coverage penalty beta * sum_i log(max(min(coverage_i, 1), COVERAGE_FLOOR)) over the
    real source positions (mask bool[B, S]) of coverage [B, K, S] (summed attention) -> [B, K]."""
    terms = jnp.log(jnp.clip(coverage, COVERAGE_FLOOR, 1.0))  # [B, K, S]
    return beta * jnp.sum(jnp.where(mask[:, None, :], terms, 0.0), axis=-1)


def _add_coverage(score, length, state, *, mask, beta):
    """The beam search's final_score_fn for a coverage penalty: score [B, K] + the penalty."""
    del length
    return score + coverage_penalty(tracked(state, "coverage"), mask, beta)


DECODE_STATIC = ("model", "search", "beam_size", "max_len", "alpha", "n_best", "min_len", "no_repeat_ngram_size",
                 "temperature", "top_k", "top_p", "coverage", "return_attention")


@functools.partial(jax.jit, static_argnames=DECODE_STATIC)
def decode_batch(model: Seq2Seq | tuple[Seq2Seq, ...], params, src: jax.Array, src_len: jax.Array, *,
                 search: str = "greedy", beam_size: int = 5, max_len: int = 100, alpha: float = 0.6,
                 n_best: int | None = None, min_len: int = 0, no_repeat_ngram_size: int = 0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, coverage: float = 0.0,
                 return_attention: bool = False, max_lens=None, prefix=None, prefix_lens=None,
                 rng=None) -> decoding.Beams | tuple[decoding.Beams, jax.Array]:
    """src [B, S], src_len [B] -> Beams(sequences [B, N, max_len], scores [B, N], lengths [B, N]).

    model, params: one model, or tuples of them (an ensemble; see the module docstring).
    coverage: GNMT coverage penalty beta >= 0 (beam only; 0 = off). return_attention: return
    (Beams, attention float32[B, N, max_len, S]) with each hypothesis's attention weights per
    generated piece (zeros from its length on).
    max_lens int32[B] (per-row limits <= max_len), prefix int32[B, P] / prefix_lens int32[B]
    (forced target prefixes) and rng (sampling: one key, or uint32[B, 2] one per row) are traced;
    everything else is static.
    """
    if coverage and search != "beam":
        raise ValueError(f"coverage applies to beam search only, got search={search!r}")
    track = bool(coverage) or return_attention  # the state carries attention and coverage
    step_fn, init_state = step_fn_for(model, params, src, src_len, track_attention=track)
    rows = dict(max_lens=max_lens, prefix=prefix, prefix_lens=prefix_lens)
    if return_attention:
        rows["record_fn"] = functools.partial(tracked, key="attention")
    if search == "greedy":
        return decoding.greedy_search(step_fn, init_state, max_len=max_len, min_len=min_len, **rows)
    if search == "beam":
        final_score_fn = None
        if coverage:
            final_score_fn = functools.partial(_add_coverage, mask=attn.source_mask(src_len, src.shape[1]),
                                               beta=coverage)
        return decoding.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_len, alpha=alpha,
                                    n_best=n_best, min_len=min_len, no_repeat_ngram_size=no_repeat_ngram_size,
                                    final_score_fn=final_score_fn, **rows)
    if search == "sample":
        return decoding.sample_search(step_fn, init_state, rng, max_len=max_len, temperature=temperature,
                                      top_k=top_k, top_p=top_p, min_len=min_len, num_samples=n_best, **rows)
    raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")


@functools.cache
def sharded_decode_batch(mesh: Mesh):
    """`decode_batch` for rows split over `mesh` and params replicated on it; its outputs are
    replicated (every process can read them). One jitted function, so one cache, per mesh."""
    return jax.jit(decode_batch.__wrapped__, static_argnames=DECODE_STATIC, out_shardings=parallel.replicated(mesh))


def row_keys(seed: int, lines: Sequence[int]) -> np.ndarray:
    """Sampling keys uint32[rows, 2]: row r's is fold_in(PRNGKey(seed), lines[r]), so a sentence's
    samples depend on the seed and its line (from 0) only, never on its batch or chunk."""
    return np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed),
                                                                      np.asarray(lines, np.uint32)))


def sentence_list(sentences) -> list[str]:
    """`sentences` as a list, or TypeError saying that a list of strings is expected."""
    if isinstance(sentences, str) or not isinstance(sentences, Iterable):
        raise TypeError(f"sentences must be a list of strings, got {type(sentences).__name__}"
                        f"{' (one sentence: wrap it in a list)' if isinstance(sentences, str) else ''}")
    sentences = list(sentences)
    for number, sentence in enumerate(sentences, start=1):
        if not isinstance(sentence, str):
            raise TypeError(f"sentences must be a list of strings, but sentence {number} is a "
                            f"{type(sentence).__name__}")
    return sentences


def max_decode_len(source_length: int, cap: int) -> int:
    """Compiled output limit for a source bucket of `source_length` positions."""
    return min(cap, 2 * source_length + 10)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and np.isfinite(value)


class SearchOptions(NamedTuple):
    """How to decode: one checked set of options shared by `Translator` and the command line.

    Which search reads what: beam: beam_size, alpha, no_repeat_ngram_size, coverage; sample: temperature,
    top_k, top_p, seed (n_best = number of samples); all: n_best, min_len, max_len_a, max_len_b,
    max_len, on_long.
    """
    search: str = "beam"            # beam | greedy | sample
    beam_size: int = 5              # hypotheses kept per step (beam)
    alpha: float = 0.6              # GNMT length-penalty exponent (beam; 0 = raw log-prob)
    n_best: int = 1                 # hypotheses returned per sentence (sample: samples drawn)
    min_len: int = 0                # EOS forbidden before this many pieces (EOS included)
    no_repeat_ngram_size: int = 0   # forbid repeating any n-gram of this size (beam; 0 = off)
    coverage: float = 0.0           # GNMT coverage penalty beta (beam; 0 = off)
    temperature: float = 1.0        # sampling temperature (> 0)
    top_k: int = 0                  # sample among the k most likely pieces (0 = all)
    top_p: float = 1.0              # nucleus: the smallest set with this much probability (1 = all)
    seed: int = 0                   # sampling seed
    max_len_a: float = 2.0          # per-sentence limit a * source pieces + b ...
    max_len_b: int = 10             # ... capped by the bucket's compiled limit
    max_len: int | None = None      # compiled limit override (EOS included); None = the bucket rule
    on_long: str = "truncate"       # a source longer than data.max_len: "truncate" (warn) or "error"

    @classmethod
    def from_eval_config(cls, eval_cfg, search: str) -> SearchOptions:
        """The options of dev BLEU during training (config.eval) for `search`."""
        return cls(search=search, beam_size=int(eval_cfg.beam_size), alpha=float(eval_cfg.alpha),
                   max_len_a=float(eval_cfg.get("max_len_a", cls._field_defaults["max_len_a"])),  # absent in
                   max_len_b=int(eval_cfg.get("max_len_b", cls._field_defaults["max_len_b"])))  # older workdirs

    def check(self, *, vocab_size: int, max_output_len: int) -> None:
        """Raises ValueError naming the first bad option; sizes are capped by what the model allows."""
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.on_long not in ON_LONG:
            raise ValueError(f"on_long must be one of {ON_LONG}, got {self.on_long!r}")
        for name, minimum in (("beam_size", 1), ("n_best", 1), ("min_len", 0), ("no_repeat_ngram_size", 0),
                              ("top_k", 0), ("seed", 0), ("max_len_b", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.beam_size > vocab_size:
            raise ValueError(f"beam_size must be <= the target vocabulary size {vocab_size}, got {self.beam_size}")
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be <= the target vocabulary size {vocab_size}, got {self.top_k}")
        if self.max_len is not None and (not is_int(self.max_len) or not 1 <= self.max_len <= max_output_len):
            raise ValueError(f"max_len must be an integer in [1, {max_output_len}] (4x the longest training "
                             f"sentence, or eval.max_decode_len), or None for the default rule; got {self.max_len!r}")
        if self.min_len > max_output_len:
            raise ValueError(f"min_len must be <= {max_output_len}, got {self.min_len}")
        if self.search == "beam" and self.n_best > self.beam_size:
            raise ValueError(f"n_best must be <= beam_size, got n_best={self.n_best} > beam_size={self.beam_size}")
        if self.search == "greedy" and self.n_best != 1:
            raise ValueError(f"greedy search returns one hypothesis; got n_best={self.n_best}")
        if self.search == "sample" and self.n_best > 1024:
            raise ValueError(f"n_best (samples per sentence) must be <= 1024, got {self.n_best}")
        for name, low, high, closed in (("alpha", 0.0, float("inf"), "[0, inf)"),
                                        ("max_len_a", 0.0, float("inf"), "[0, inf)"),
                                        ("coverage", 0.0, float("inf"), "[0, inf)")):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value < high:
                raise ValueError(f"{name} must be a finite number in {closed}, got {value!r}")
        if self.coverage and self.search != "beam":
            raise ValueError(f"coverage (penalty {self.coverage}) applies to beam search only, "
                             f"got search={self.search!r}")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    def static(self) -> dict:
        """decode_batch's static arguments; options a search does not read are normalised away, so
        they never cost a compilation."""
        beam, sample = self.search == "beam", self.search == "sample"
        return dict(search=self.search, beam_size=self.beam_size if beam else 1,
                    alpha=float(self.alpha) if beam else 0.0, n_best=self.n_best if beam or sample else None,
                    min_len=self.min_len, no_repeat_ngram_size=self.no_repeat_ngram_size if beam else 0,
                    coverage=float(self.coverage) if beam else 0.0,
                    temperature=float(self.temperature) if sample else 1.0, top_k=self.top_k if sample else 0,
                    top_p=float(self.top_p) if sample else 1.0)


class CorpusDecoder:
    """Source sentences -> n-best hypotheses in input order, for one model (or an ensemble: a tuple
    of models, decoded with a tuple of params) and its tokenizers.

    mesh: decode each batch split over its devices (every process of a multi-process mesh calls
    with the same sentences and params replicated on the mesh); None: on the default device.
    """

    def __init__(self, config, model: Seq2Seq | tuple[Seq2Seq, ...], src_tokenizer, tgt_tokenizer,
                 mesh: Mesh | None = None):
        self.model, self.src_tokenizer, self.tgt_tokenizer = model, src_tokenizer, tgt_tokenizer
        self.mesh = mesh
        self.decode_batch = decode_batch if mesh is None else sharded_decode_batch(mesh)
        self.boundaries = [int(b) for b in config.data.bucket_boundaries]
        # Longest source in pieces (EOS excluded): what the model was trained on; fits the last bucket.
        self.max_source_len = int(config.data.max_len)
        self.max_len_cap = int(config.eval.max_decode_len)
        # Hard cap on any output limit: 4x the longest training sentence, or the configured cap.
        self.max_output_len = max(self.max_len_cap, 4 * (self.max_source_len + 1))

    def check(self, options: SearchOptions) -> None:
        options.check(vocab_size=self.tgt_tokenizer.vocab_size, max_output_len=self.max_output_len)
        if options.coverage and any(m.attention == "none" for m in members(self.model, None)[0]):
            raise ValueError("coverage needs attention: a model has model.attention='none'")

    def rows(self, options: SearchOptions) -> int:
        """Rows of every decoding call for these options: DECODE_ROWS unless memory says fewer,
        rounded up to a multiple of the mesh's devices."""
        hypotheses = options.static()["beam_size"] * (options.n_best if options.search == "sample" else 1)
        rows = max(1, min(DECODE_ROWS, MAX_STEP_ELEMENTS // (hypotheses * self.tgt_tokenizer.vocab_size)))
        devices = 1 if self.mesh is None else self.mesh.size
        return -(-rows // devices) * devices

    def source_ids(self, sentence: str, index: int, on_long: str) -> list[int]:
        """Piece ids of one sentence (EOS excluded), at most max_source_len of them; [] if blank."""
        return data.source_ids(self.src_tokenizer, sentence, index, self.max_source_len, on_long)

    def prefix_ids(self, prefixes: Sequence[str | None] | None, count: int) -> list[list[int]]:
        """Target piece ids of each sentence's forced prefix ([] for none)."""
        if prefixes is None:
            return [[] for _ in range(count)]
        if isinstance(prefixes, str) or len(prefixes) != count:
            raise ValueError(f"prefixes must be a list with one entry (text or None) per sentence: "
                             f"{count} sentences")
        ids = []
        for index, prefix in enumerate(prefixes):
            if prefix is not None and not isinstance(prefix, str):
                raise TypeError(f"prefix {index + 1} is a {type(prefix).__name__}, not a string or None")
            ids.append(self.tgt_tokenizer.encode([prefix])[0] if prefix and prefix.strip() else [])
        return ids

    def __call__(self, params, sentences: Sequence[str], options: SearchOptions,
                 prefixes: Sequence[str | None] | None = None,
                 return_attention: bool = False, first_line: int = 1) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best hypotheses, best first; a blank sentence gives [Hypothesis("", [], 0.0)].

        prefixes: optional target text per sentence (or None) that every hypothesis starts with.
        return_attention: each hypothesis gets its `attention` [T, S] (recorded by the search).
        first_line: the line number of the first sentence in messages (a part of a longer input).
        """
        self.check(options)
        sentences = sentence_list(sentences)
        src_ids = [self.source_ids(s, first_line - 1 + i, options.on_long) for i, s in enumerate(sentences)]
        forced = self.prefix_ids(prefixes, len(src_ids))
        results = [[Hypothesis("", [], 0.0)] for _ in src_ids]
        todo = [i for i, ids in enumerate(src_ids) if ids]  # blank lines are not decoded
        # Source-only buckets: the reference never shapes the decoding.
        batches = data.eval_batches([src_ids[i] for i in todo], [[] for _ in todo], batch_size=self.rows(options),
                                    boundaries=self.boundaries)
        members = [[todo[i] for i in batch.index if i >= 0] for batch in batches]  # sentences of each batch
        self._check_prefixes(batches, members, forced, options, first_line)
        for batch, real in zip(batches, members):  # [rows, bucket] each: one compilation per bucket and search
            cap = self._cap(batch, options)
            prefix, prefix_lens = self._prefix_arrays([forced[i] for i in real], len(batch.index))
            max_lens = decoding.length_limits(batch.src_len - 1, options.max_len_a, options.max_len_b, cap)
            if prefix_lens is not None:  # room for the prefix and one more piece (within cap: checked)
                max_lens = jnp.maximum(max_lens, prefix_lens + 1)
            rows = {"src": batch.src, "src_len": batch.src_len, "max_lens": max_lens, "prefix": prefix,
                    "prefix_lens": prefix_lens}  # [rows, ...] each (prefixes: None when absent)
            if options.search == "sample":  # one key per row, from its line in the whole input
                rows["rng"] = row_keys(options.seed, [first_line - 1 + todo[i] if i >= 0 else 0 for i in batch.index])
            if self.mesh is not None:  # rows (and their keys) split over the devices
                rows = parallel.shard_batch(rows, self.mesh)
            out = self.decode_batch(self.model, params, **rows, max_len=cap,
                                    return_attention=return_attention, **options.static())
            beams, weights = out if return_attention else (out, None)
            sequences, scores, lengths = (np.asarray(x) for x in beams)  # [rows, N, L], [rows, N], [rows, N]
            weights = None if weights is None else np.asarray(weights)  # [rows, N, L, S]
            for row, index in enumerate(real):
                results[index] = data.hypotheses(self.tgt_tokenizer, 
                    sequences[row], scores[row], lengths[row],
                    None if weights is None else weights[row, :, :, :batch.src_len[row]])
        return results

    def _cap(self, batch: data.Batch, options: SearchOptions) -> int:
        """The compiled output limit of a batch: options.max_len, else its bucket's."""
        return options.max_len or max_decode_len(batch.src.shape[1], self.max_len_cap)

    def _check_prefixes(self, batches: list[data.Batch], members: list[list[int]], forced: list[list[int]],
                        options: SearchOptions, first_line: int) -> None:
        """ValueError naming the first line whose prefix leaves no room for one more piece within
        its batch's compiled limit (members: the sentences of each batch)."""
        for batch, sentences in zip(batches, members):
            cap = self._cap(batch, options)
            for index in sentences:
                if len(forced[index]) >= cap:
                    raise ValueError(f"line {first_line + index}: its prefix of {len(forced[index])} pieces leaves "
                                     f"no room within the output limit of {cap} pieces; shorten the prefix "
                                     "or raise max_len")

    def _prefix_arrays(self, prefixes: list[list[int]], rows: int):
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
