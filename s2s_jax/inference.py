"""The model side of decoding: a jitted batch decoder, and `CorpusDecoder`, which hands it to the
decode driver (`s2s_jax.driver`) for training's dev BLEU and `Translator`.

The encoder runs once per batch; its memory and attention keys stay in `step_fn`'s closure with
shape [B, S, ...] and are never tiled per beam (docs/architecture.md, "Decode path").

`CorpusDecoder` provides the driver's compiled callable and the fields it needs: the bucket
boundaries (eval.decode_buckets, else the training buckets), the longest source, the compiled
output limit of each bucket (min(eval.max_decode_len, 2 * bucket length + 10), or an explicit
`max_len`) and the rows of every call (eval.decode_rows; fewer only when beam x vocabulary would
not fit the memory budget). On a mesh
(`CorpusDecoder(mesh=...)`, one axis 'data'): each call's rows (a multiple of the mesh's devices)
are split over its devices, the parameters are replicated on it, and the results come back
replicated, so every process of a multi-process mesh reads them all.

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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from s2s_jax import compiled, decoding, parallel
from s2s_jax import attention as attn
from s2s_jax.driver import CallInputs, Driver, output_limits
from s2s_jax.hypotheses import Hypothesis
from s2s_jax.models import Seq2Seq
from s2s_jax.options import SEARCHES, Limits, SearchOptions

# Largest [rows, hypotheses, vocab] log-prob block decoded at once (float32: 512 MiB).
MAX_STEP_ELEMENTS = 1 << 27
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
    common = dict(max_lens=max_lens, prefix=prefix, prefix_lens=prefix_lens)  # what every search takes
    if return_attention:
        common["record_fn"] = functools.partial(tracked, key="attention")
    if search == "greedy":
        return decoding.greedy_search(step_fn, init_state, max_len=max_len, min_len=min_len, **common)
    if search == "beam":
        final_score_fn = None
        if coverage:
            final_score_fn = functools.partial(_add_coverage, mask=attn.source_mask(src_len, src.shape[1]),
                                               beta=coverage)
        return decoding.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_len, alpha=alpha,
                                    n_best=n_best, min_len=min_len, no_repeat_ngram_size=no_repeat_ngram_size,
                                    final_score_fn=final_score_fn, **common)
    if search == "sample":
        return decoding.sample_search(step_fn, init_state, rng, max_len=max_len, temperature=temperature,
                                      top_k=top_k, top_p=top_p, min_len=min_len, num_samples=n_best, **common)
    raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")


@functools.cache
def cached_decode_batch(mesh: Mesh | None = None) -> compiled.Cached:
    """`decode_batch` with its executables cached (`s2s_jax.compiled`; every argument by keyword).
    mesh: rows split over it and params replicated on it, the outputs replicated (every process
    can read them); None: on the default device. One cached function per mesh."""
    if mesh is None:
        return compiled.jit(decode_batch.__wrapped__, static_argnames=DECODE_STATIC)
    return compiled.jit(decode_batch.__wrapped__, static_argnames=DECODE_STATIC,
                        out_shardings=parallel.replicated(mesh))


class CorpusDecoder:
    """Source sentences -> n-best hypotheses in input order (`s2s_jax.driver`), for one model (or
    an ensemble: a tuple of models, decoded with a tuple of params) and its tokenizers.

    boundaries: the source bucket boundaries; max_source_len: the longest source in pieces (EOS
    excluded), what the model was trained on (config.data.max_len); max_decode_len: the cap of the
    buckets' compiled output limits (config.eval.max_decode_len); rows: the rows of every call
    (batch invariance: one shape per bucket and search). mesh: decode each call split over its
    devices (every process of a multi-process mesh calls with the same sentences and params
    replicated on the mesh); None: on the default device.
    """

    def __init__(self, model: Seq2Seq | tuple[Seq2Seq, ...], src_tokenizer, tgt_tokenizer, *,
                 boundaries: Sequence[int], max_source_len: int, max_decode_len: int, rows: int,
                 mesh: Mesh | None = None):
        self.model, self.src_tokenizer, self.tgt_tokenizer = model, src_tokenizer, tgt_tokenizer
        self.mesh = mesh
        self.decode_batch = cached_decode_batch(mesh)
        self.boundaries, self.rows = [int(b) for b in boundaries], int(rows)
        self.max_source_len, self.max_decode_len = int(max_source_len), int(max_decode_len)
        # Hard cap on any output limit: 4x the longest training sentence, or the configured cap.
        self.max_output_len = max(self.max_decode_len, 4 * (self.max_source_len + 1))

    @classmethod
    def from_config(cls, model: Seq2Seq | tuple[Seq2Seq, ...], src_tokenizer, tgt_tokenizer, eval_cfg, data_cfg,
                    mesh: Mesh | None = None) -> CorpusDecoder:
        """The decoder of a run's config.eval and config.data: its decode buckets, rows and dtype (the
        model's members compute their matmuls in eval.decode_dtype when it is set)."""
        if eval_cfg.decode_dtype:
            dtype = jnp.dtype(eval_cfg.decode_dtype)
            models = tuple(m.clone(dtype=dtype) for m in members(model, None)[0])
            model = models if isinstance(model, tuple) else models[0]
        return cls(model, src_tokenizer, tgt_tokenizer, boundaries=eval_cfg.decode_buckets or data_cfg.bucket_boundaries,
                   max_source_len=data_cfg.max_len, max_decode_len=eval_cfg.max_decode_len,
                   rows=eval_cfg.decode_rows, mesh=mesh)

    def check(self, options: SearchOptions) -> None:
        """ValueError naming the first option this model cannot decode with."""
        options.check(Limits(vocab_size=self.tgt_tokenizer.vocab_size, max_output_len=self.max_output_len))
        if options.coverage and any(m.attention == "none" for m in members(self.model, None)[0]):
            raise ValueError("coverage needs attention: a model has model.attention='none'")

    def rows_per_call(self, options: SearchOptions | None = None) -> int:
        """Rows of every decoding (options None: scoring) call: `rows` unless memory says fewer for
        the options' hypotheses x vocabulary, rounded up to a multiple of the mesh's devices."""
        rows = self.rows
        if options is not None:
            hypotheses = options.static()["beam_size"] * (options.n_best if options.search == "sample" else 1)
            rows = max(1, min(rows, MAX_STEP_ELEMENTS // (hypotheses * self.tgt_tokenizer.vocab_size)))
        devices = 1 if self.mesh is None else self.mesh.size
        return -(-rows // devices) * devices

    def __call__(self, params, sentences: Sequence[str], options: SearchOptions,
                 prefixes: Sequence[str | None] | None = None,
                 return_attention: bool = False, first_line: int = 1) -> list[list[Hypothesis]]:
        """Per sentence, up to n_best hypotheses, best first (`driver.Driver`), after checking the
        options. return_attention: each hypothesis gets its `attention` [T, S] (recorded by the search)."""
        self.check(options)
        return self.driver(params, options, return_attention)(sentences, options, prefixes, first_line)

    def driver(self, params, options: SearchOptions, return_attention: bool = False) -> Driver:
        """The decode driver of `decode_batch` with these params and options."""
        def decode(inputs: CallInputs, max_len: int) -> tuple:
            if self.mesh is not None:  # rows (and their keys) split over the devices
                inputs = parallel.shard_batch(inputs, self.mesh)
            out = self.decode_batch(model=self.model, params=params, **inputs._asdict(), max_len=max_len,
                                    return_attention=return_attention, **options.static())
            beams, attention = out if return_attention else (out, None)
            return (*beams, attention)

        limits = output_limits(self.boundaries, self.max_source_len, self.max_decode_len, options.max_len)
        return Driver(decode, self.src_tokenizer, self.tgt_tokenizer, self.boundaries, self.max_source_len,
                      limits, self.rows_per_call(options))
