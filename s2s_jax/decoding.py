"""Model-agnostic, pure, jittable search: beam search, greedy search and sampling.

All three searches share one protocol and one loop (`_search`, a single `jax.lax.while_loop`):

    step_fn(tokens: int32[B, K], state) -> (log_probs: float[B, K, V], new_state)

`state` is any pytree whose leaves have leading dims [B, K]; the caller passes `init_state` with
leading dim [B] and the search broadcasts it to [B, K]. After every step the recurrent state is
gathered by beam index (`take_along_axis` on axis 1 of each leaf). Static encoder memory belongs in
`step_fn`'s closure with shape [B, S, ...]; it is never tiled to [B * K, S, ...].

The searches differ only in how the K hypotheses of the next step are chosen from the [B, K, V]
extensions (`_beam_select`, `_sample_select`) and in how a finished hypothesis is scored.

Names: B rows, K = `beam_size` hypotheses kept per step (`num_samples` when sampling), N = `n_best`
finished hypotheses returned per row, V tokens, `max_len` the compiled output length. Each step of
the loop masks the extensions (`_allowed_tokens`, `_extensions`), selects K of them, gathers the
hypotheses by parent (`_take_extensions`, `_extend_hypotheses`), sets the finished ones aside into
a store of the N best (`_split_finished`, `_finished_scores`, `_merge_finished`) and decides which
rows stop (`_rows_done`).

Options shared by all three (keyword-only, traced arrays, defaults off):
  * `max_lens: int32[B]`: per-row output limits, min(max_lens[b], max_len) clipped to >= 1;
    `max_len` stays the static compiled cap. `length_limits` computes fairseq's
    `max_len_a * source_length + max_len_b` rule.
  * `prefix: int32[B, P]`, `prefix_lens: int32[B]`: at steps t <= prefix_lens[b] every token but
    prefix[b, t - 1] is masked, on top of the usual masks (PAD, BOS, min_len, n-grams): a row whose
    prefix holds a forbidden token has no result. Beam search starts from one hypothesis, so only
    the forced one is alive through the prefix. Scores include the prefix's log-probs.
  * `record_fn(state) -> float[B, K, ...]`: a per-step record of each hypothesis (e.g. the model's
    attention weights [B, K, S]), read from the state after every step, gathered by parent with the
    hypotheses and returned with them: the search then returns `(Beams, records)` with records
    float32[B, N, max_len, ...], row t the record of the step that emitted token t, zeros from
    `lengths` on. Costs O(B * K * max_len * ...) memory only when given.

`ensemble_step_fn` combines several step functions into one (their states as a tuple).

Conventions (see docs/architecture.md, "Contracts"):
  * Step 1 feeds `bos_id`; returned sequences hold no BOS, include the EOS within `lengths`, and are
    `pad_id` after the end. `pad_id` and `bos_id` are forbidden at every step, whatever the model
    prefers, so neither ever appears inside a hypothesis; `eos_id` must differ from both.
  * step_fn's log-probs must be floating point (TypeError otherwise). They are cast to float32,
    NaN and anything below NEG_INF (-1e7, never -inf) become NEG_INF, and a log-prob at or below
    NEG_INF / 2 marks a token the model forbids (a model that masks with -inf/-1e9, or a NaN):
    such an extension is not kept, unless the model forbids every token the search allows that
    hypothesis (an all-NaN or all -inf row): then each of those is an extension of log-prob
    NEG_INF, so the hypothesis still ends with EOS or at its limit, scored <= NEG_INF (below every
    ordinary one). The search's own masks (PAD, BOS, min_len, no_repeat_ngram_size, prefix) are
    never lifted: a hypothesis they leave no token ends there, unfinished.
  * A beam wider than V ** max_len (the token sequences of a V-word vocabulary) can never be
    filled: beam_search refuses it (ValueError) once step_fn gives V. Wider beams than V are fine:
    with K >= the number of extensions at every step the search is exact.
  * Result slots that no hypothesis filled (possible only when fewer than N sequences exist, e.g.
    a tiny vocabulary) have length 0, all `pad_id` tokens and score NEG_INF; they come last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from s2s_jax import NEG_INF, ops
from s2s_jax.validate import check_int

__all__ = ["Beams", "NEG_INF", "beam_search", "ensemble_step_fn", "greedy_search", "length_limits",
           "sample_search"]

_FORBIDDEN = 0.5 * NEG_INF  # log-probs <= this: tokens the model forbids (see _extensions)
_EMPTY = -1e30  # key / sampling logit of an empty or invalid slot: below any NEG_INF sum or tempered
# log-prob; only compared (or perturbed by sampling noise), never accumulated

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
# final_score_fn(score float32[B, K], length int32[B, K], state leaves [B, K, ...]) -> float32[B, K]
FinalScoreFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
# record_fn(state leaves [B, K, ...]) -> float[B, K, ...]: what the search records per step
RecordFn = Callable[[Any], jax.Array]


class Beams(NamedTuple):
    """Search result, best first. N = number of hypotheses returned per batch element."""

    sequences: jax.Array  # int32[B, N, max_len], no BOS, EOS included, pad_id after the end
    scores: jax.Array  # float32[B, N], descending
    lengths: jax.Array  # int32[B, N], number of tokens including the EOS (0 = empty slot)


# --------------------------------------------------------------------------------------------
# Argument checks (clear messages, before any tracing of step_fn)
# --------------------------------------------------------------------------------------------


def _check_nonneg(name: str, value) -> None:
    """Checks a possibly traced scalar: only concrete values can be checked."""
    if isinstance(value, jax.core.Tracer):
        return
    if float(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_row_arg(name: str, value, batch: int, ndim: int) -> None:
    """Checks the static shape of an optional per-row array: [B] (ndim 1) or [B, P] (ndim 2)."""
    shape = np.shape(value)
    if len(shape) != ndim or shape[0] != batch:
        want = "[B]" if ndim == 1 else "[B, P]"
        raise ValueError(f"{name} must have shape {want} with B = {batch}, got {shape}")


def _check_common(max_len, min_len, eos_id, bos_id, pad_id) -> None:
    check_int("max_len", max_len, 1)
    _check_nonneg("min_len", min_len)
    for name, value in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
        check_int(name, value, 0)
    if eos_id in (bos_id, pad_id):  # pad_id == bos_id is fine: both are forbidden anyway
        raise ValueError(
            f"eos_id must differ from bos_id and pad_id (both are forbidden in hypotheses), got "
            f"eos_id={eos_id}, bos_id={bos_id}, pad_id={pad_id}")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _batch_size(init_state) -> int:
    leaves = jax.tree.leaves(init_state)
    if not leaves:
        raise ValueError(
            "init_state must contain at least one array with leading batch dim [B, ...] "
            "(the search reads the batch size from it)")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every leaf of init_state must have the same leading batch dim [B, ...]; got shapes "
            f"{[np.shape(x) for x in leaves]}")
    return sizes.pop()


def _tile_state(init_state, beam_size: int):
    """[B, ...] -> [B, K, ...] for every leaf (the only broadcast the search does)."""

    def tile(x):
        x = jnp.asarray(x)
        return jnp.broadcast_to(x[:, None], (x.shape[0], beam_size) + x.shape[1:])  # [batch, beam, ...]

    return jax.tree.map(tile, init_state)


def _gather_beams(tree, parent: jax.Array):
    """Reorders every leaf [B, K, ...] along axis 1 by parent int32[B, K]."""

    def gather(x):
        idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))  # [batch, beam, 1, ...]
        return jnp.take_along_axis(x, idx, axis=1)

    return jax.tree.map(gather, tree)


def _check_step_fn(step_fn: StepFn, tokens: jax.Array, state) -> int:
    """Traces step_fn abstractly once, checks its output, returns the vocabulary size V."""
    out = jax.eval_shape(step_fn, tokens, state)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("step_fn must return a pair (log_probs, new_state)")
    log_probs, new_state = out
    if not jnp.issubdtype(log_probs.dtype, jnp.floating):
        raise TypeError(f"step_fn must return floating-point log_probs, got dtype {log_probs.dtype}")
    batch, beam_size = tokens.shape
    if len(log_probs.shape) != 3 or log_probs.shape[:2] != (batch, beam_size):
        raise ValueError(
            f"step_fn must return log_probs of shape [B, K, V] = [{batch}, {beam_size}, V]; "
            f"got {log_probs.shape}")
    if log_probs.shape[2] < 1:
        raise ValueError("step_fn returned an empty vocabulary (V = 0)")
    in_def, out_def = jax.tree.structure(state), jax.tree.structure(new_state)
    if in_def != out_def:
        raise ValueError(f"step_fn must return a state with the input's structure: {in_def} vs {out_def}")
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
        if old.shape != new.shape:
            raise ValueError(
                f"step_fn changed a state leaf's shape from {old.shape} to {new.shape}; state leaves "
                "must keep their leading [B, K] dims and shape")
    return log_probs.shape[2]


def _ngram_banned(seq: jax.Array, step: jax.Array, n: int, vocab: int) -> jax.Array:
    """bool[B, K, V]: tokens that would complete an n-gram already in the hypothesis.

    seq: int32[B, K, L], the first `step` tokens generated (BOS excluded), the rest padding.
    A token v is banned at position `step` if some earlier n-gram seq[j : j + n] lies fully inside
    the generated prefix (j + n <= step), matches the last n - 1 tokens seq[step - n + 1 : step] on
    its first n - 1 tokens, and ends in v.
    """
    batch, beam_size, max_len = seq.shape
    num_starts = max_len - n + 1  # candidate start positions j of an earlier n-gram
    if n == 1:
        match = jnp.ones((batch, beam_size, num_starts), bool)  # [batch, beam, start]
    else:
        context = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(step - (n - 1), 0), n - 1, axis=2)
        # [batch, beam, start, n-1]
        windows = jnp.stack([seq[:, :, m:m + num_starts] for m in range(n - 1)], axis=-1)
        match = jnp.all(windows == context[:, :, None, :], axis=-1)  # [batch, beam, start]
    match &= jnp.arange(num_starts) <= step - n  # the earlier n-gram must be complete
    completing = seq[:, :, n - 1:]  # [batch, beam, start]: last token of the n-gram at j
    b_idx = jnp.arange(batch)[:, None, None]
    k_idx = jnp.arange(beam_size)[None, :, None]
    banned = jnp.zeros((batch, beam_size, vocab), jnp.int32)
    banned = banned.at[b_idx, k_idx, completing].max(match.astype(jnp.int32))  # [batch, beam, vocab]
    return banned > 0


def _check_beam_width(beam_size: int, vocab: int, max_len: int) -> None:
    """Refuses a beam that no vocabulary of `vocab` tokens could ever fill (static shapes)."""
    if beam_size > vocab ** max_len:
        raise ValueError(
            f"beam_size={beam_size} can never be filled: step_fn's vocabulary allows at most "
            f"{vocab} ** max_len = {vocab ** max_len} sequences; use a beam_size at most that")


def _beam_select(beam_size: int, max_len: int):
    """Keeps the `beam_size` valid extensions with the highest summed log-prob (ties: lower index)."""

    def select(step, log_probs, cand_sum, cand_valid):
        del step, log_probs
        batch, _, vocab = cand_sum.shape
        _check_beam_width(beam_size, vocab, max_len)
        key = jnp.where(cand_valid, cand_sum, _EMPTY)  # [batch, beam, vocab]
        # Two-stage top-k (exact): the best beam_size overall are among each beam's best beam_size.
        per_beam = min(beam_size, vocab)
        beam_best, beam_tokens = ops.top_k(key, per_beam)  # [batch, beam, per_beam]
        _, flat = jax.lax.top_k(beam_best.reshape(batch, beam_size * per_beam), beam_size)  # [batch, beam]
        tokens = jnp.take_along_axis(beam_tokens.reshape(batch, beam_size * per_beam), flat, axis=1)
        return flat // per_beam, tokens

    return select


def _nucleus(sorted_logits: jax.Array, top_p) -> jax.Array:
    """Masks, in logits sorted descending on the last axis, every token after the smallest prefix
    whose probability mass reaches top_p (a token is kept iff the mass before it is < top_p)."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum; 0 for the first
    return jnp.where(mass_before < top_p, sorted_logits, _EMPTY)


def _sample_select(rng: jax.Array, temperature, top_k: int, top_p):
    """Each hypothesis draws its own next token: softmax(log_probs / temperature) over its top_k,
    then over the nucleus (mass top_p) of that renormalised top_k distribution."""
    nucleus = isinstance(top_p, jax.core.Tracer) or float(top_p) < 1.0

    def select(step, log_probs, cand_sum, cand_valid):
        del cand_sum
        batch, num_samples, vocab = log_probs.shape
        logits = jnp.where(cand_valid, log_probs / temperature, _EMPTY)  # [batch, sample, vocab]
        if (top_k and top_k < vocab) or nucleus:
            width = top_k if 0 < top_k < vocab else vocab
            top_logits, top_ids = ops.top_k(logits, width)  # [batch, sample, width], descending
            if nucleus:
                top_logits = _nucleus(top_logits, top_p)
            choice = _categorical(rng, step, top_logits)  # [batch, sample]
            token = jnp.take_along_axis(top_ids, choice[..., None], axis=-1)[..., 0]  # [batch, sample]
        else:
            token = _categorical(rng, step, logits)  # [batch, sample]
        parent = jnp.broadcast_to(jnp.arange(num_samples), (batch, num_samples))  # [batch, sample]
        return parent, token.astype(jnp.int32)

    return select


def _categorical(rng: jax.Array, step, logits: jax.Array) -> jax.Array:
    """A draw from logits [batch, sample, n] -> [batch, sample], with the key fold_in(rng, step);
    rng uint32[batch, 2] (one key per row): row b draws with fold_in(rng[b], step)."""
    if rng.ndim == 1:
        return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, step)  # [batch, 2]
    return jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys, logits)


def _model_log_probs(log_probs: jax.Array) -> jax.Array:
    """step_fn's float[B, K, V] -> float32[B, K, V], NaN and anything below NEG_INF at NEG_INF."""
    log_probs = log_probs.astype(jnp.float32)
    return jnp.where(jnp.isnan(log_probs), NEG_INF, jnp.maximum(log_probs, NEG_INF))


def _extensions(log_probs: jax.Array, allowed: jax.Array) -> jax.Array:
    """bool[B, K, V]: the tokens each hypothesis may take next.

    allowed: bool, broadcastable to [B, K, V], the search's own masks. Of those, the tokens the
    model does not forbid (log-prob > _FORBIDDEN); all of them if the model forbids every one.
    """
    usable = allowed & (log_probs > _FORBIDDEN)  # [batch, beam, vocab]
    return usable | (allowed & ~jnp.any(usable, axis=-1, keepdims=True))


def _raw_score(log_prob_sum, length):
    del length
    return log_prob_sum


def _length_penalty_fn(length_penalty: str, alpha):
    """score_fn(sum, length) = sum / d(length), with d > 0 non-decreasing in length (alpha >= 0).

    So score_fn(s, max_lens[b]) bounds the final score of an alive hypothesis of row b with raw sum
    s <= 0: later log-probs are <= 0, so its final sum s' <= s <= 0, and s' / d is largest for the
    largest denominator, reached at the row's limit max_lens[b]."""
    if length_penalty == "gnmt":

        def penalty(length):
            return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha

    elif length_penalty == "average":

        def penalty(length):
            return jnp.asarray(length, jnp.float32)

    else:
        raise ValueError(f"length_penalty must be 'gnmt' or 'average', got {length_penalty!r}")
    return lambda s, length: s / penalty(length)


# --------------------------------------------------------------------------------------------
# The one loop, in steps (names B, K, N, V, max_len: see the module docstring)
# --------------------------------------------------------------------------------------------


def _row_limits(max_lens, batch: int, max_len: int) -> jax.Array:
    """int32[B]: each row's output limit, min(max_lens[b], max_len) and >= 1 (max_len if None)."""
    if max_lens is None:
        return jnp.full((batch,), max_len, jnp.int32)
    _check_row_arg("max_lens", max_lens, batch, 1)
    return jnp.clip(jnp.asarray(max_lens, jnp.int32), 1, max_len)


def _prefix_args(prefix, prefix_lens, batch: int):
    """(int32[B, P], int32[B] clipped to [0, P]) or (None, None) when nothing is forced."""
    if prefix is None:
        if prefix_lens is not None:
            raise ValueError("prefix_lens needs prefix")
        return None, None
    _check_row_arg("prefix", prefix, batch, 2)
    width = np.shape(prefix)[1]
    if width == 0:
        return None, None
    if prefix_lens is None:
        return jnp.asarray(prefix, jnp.int32), jnp.full((batch,), width, jnp.int32)
    _check_row_arg("prefix_lens", prefix_lens, batch, 1)
    return jnp.asarray(prefix, jnp.int32), jnp.clip(jnp.asarray(prefix_lens, jnp.int32), 0, width)


def _record_shape(record_fn: RecordFn | None, state) -> tuple[int, ...] | None:
    """The trailing shape [...] of record_fn's float[B, K, ...] on state (None without record_fn)."""
    if record_fn is None:
        return None
    record = jax.eval_shape(record_fn, state)
    batch, beam_size = jax.tree.leaves(state)[0].shape[:2]
    if record.shape[:2] != (batch, beam_size):
        raise ValueError(f"record_fn must return an array [B, K, ...] = [{batch}, {beam_size}, ...]; "
                         f"got {record.shape}")
    return record.shape[2:]


class _Finished(NamedTuple):
    """Finished hypotheses of each row, in n slots: the store (n = N, best first) or one step's
    candidates (n = K, _EMPTY / 0 where not finished)."""

    seq: jax.Array  # int32[B, n, max_len], pad_id after the end
    score: jax.Array  # float32[B, n] (_EMPTY: empty slot)
    length: jax.Array  # int32[B, n] (0: empty slot)
    records: jax.Array | None  # float32[B, n, max_len, ...] (None: no record_fn)


class _Carry(NamedTuple):
    """The loop's state: the K hypotheses still growing and the store of the N best finished."""

    step: jax.Array  # int32[], steps done so far == index where the next token is written
    tokens: jax.Array  # int32[B, K], last token of each hypothesis (input of the next step)
    state: Any  # pytree, leaves [B, K, ...]
    alive_seq: jax.Array  # int32[B, K, max_len]
    alive_sum: jax.Array  # float32[B, K], summed log-probs (NEG_INF where not alive)
    alive: jax.Array  # bool[B, K]
    alive_rec: jax.Array | None  # float32[B, K, max_len, ...] records (None: no record_fn)
    finished: _Finished  # the store, n = N


def _initial_carry(tokens, state, *, n_best: int, max_len: int, pad_id, single_start: bool,
                   record_shape) -> _Carry:
    """Before step 1: the K hypotheses (tokens int32[B, K] of BOS, state leaves [B, K, ...]) are
    empty, all alive (with single_start only hypothesis 0); the finished store is empty."""
    batch, beam_size = tokens.shape
    if single_start:
        alive = jnp.broadcast_to(jnp.arange(beam_size) == 0, (batch, beam_size))  # [batch, beam]
    else:
        alive = jnp.ones((batch, beam_size), bool)

    def records(n):  # float32[batch, n, max_len, ...]
        return None if record_shape is None else jnp.zeros((batch, n, max_len) + record_shape, jnp.float32)

    finished = _Finished(seq=jnp.full((batch, n_best, max_len), pad_id, jnp.int32),
                         score=jnp.full((batch, n_best), _EMPTY, jnp.float32),
                         length=jnp.zeros((batch, n_best), jnp.int32), records=records(n_best))
    return _Carry(step=jnp.zeros((), jnp.int32), tokens=tokens, state=state,
                  alive_seq=jnp.full((batch, beam_size, max_len), pad_id, jnp.int32),
                  alive_sum=jnp.where(alive, 0.0, NEG_INF).astype(jnp.float32), alive=alive,
                  alive_rec=records(beam_size), finished=finished)


class _Masks(NamedTuple):
    """The search's own token masks, fixed for one search; the model's log-probs never lift them."""

    vocab_ids: jax.Array  # int32[V]
    special: jax.Array  # bool[V]: PAD and BOS, never inside a hypothesis
    eos_id: int
    min_len: Any  # int (maybe traced): EOS is masked at steps t < min_len
    no_repeat_ngram_size: int  # 0: off
    prefix: jax.Array | None  # int32[B, P], forced tokens (None: nothing forced)
    prefix_lens: jax.Array | None  # int32[B], in [0, P]


def _allowed_tokens(masks: _Masks, step: jax.Array, alive_seq: jax.Array) -> jax.Array:
    """bool, broadcastable to [B, K, V]: the tokens the search allows at step t = step + 1.

    alive_seq: int32[B, K, max_len], the hypotheses so far. Never PAD or BOS; no EOS at t < min_len;
    no token completing a repeated n-gram; at t <= prefix_lens[b] only prefix[b, t - 1].
    """
    t = step + 1
    vocab_ids = masks.vocab_ids
    allowed = ~masks.special  # [vocab]
    if isinstance(masks.min_len, jax.core.Tracer) or masks.min_len > 0:  # off: no ops traced
        allowed &= ~((vocab_ids == masks.eos_id) & (t < masks.min_len))
    if 0 < masks.no_repeat_ngram_size <= alive_seq.shape[2]:
        banned = _ngram_banned(alive_seq, step, masks.no_repeat_ngram_size, vocab_ids.shape[0])
        allowed &= ~banned  # [batch, beam, vocab]
    if masks.prefix is not None:
        forced = masks.prefix[:, jnp.minimum(step, masks.prefix.shape[1] - 1)]  # [batch]
        allowed &= (t > masks.prefix_lens)[:, None, None] | (vocab_ids == forced[:, None, None])
    return allowed


def _take_extensions(cand_sum: jax.Array, cand_valid: jax.Array, parent: jax.Array, token: jax.Array):
    """The chosen extensions' summed log-probs float32[B, K] and validity bool[B, K].

    cand_sum, cand_valid: [B, K, V], every extension of every hypothesis; parent, token: int32[B, K],
    the K chosen (hypothesis, token) pairs.
    """
    batch, beam_size, vocab = cand_sum.shape
    flat = parent * vocab + token  # [batch, beam]: index into beam * vocab

    def take(x):
        return jnp.take_along_axis(x.reshape(batch, beam_size * vocab), flat, axis=1)  # [batch, beam]

    return take(cand_sum), take(cand_valid)


def _extend_hypotheses(c: _Carry, new_state, parent: jax.Array, token: jax.Array,
                       record_fn: RecordFn | None):
    """Gathers the hypotheses by parent int32[B, K] and appends token int32[B, K] at c.step.

    new_state: step_fn's state after this step, leaves [B, K, ...] in the order of c's hypotheses.
    Returns (seq int32[B, K, max_len], state leaves [B, K, ...], records float32[B, K, max_len, ...]
    with record_fn(state) at c.step, or None).
    """
    seq, state, records = _gather_beams((c.alive_seq, new_state, c.alive_rec), parent)
    seq = jnp.where(jnp.arange(seq.shape[2]) == c.step, token[..., None], seq)  # [batch, beam, max_len]
    if record_fn is not None:
        records = records.at[:, :, c.step].set(record_fn(state))  # [batch, beam, max_len, ...]
    return seq, state, records


def _split_finished(valid: jax.Array, token: jax.Array, t: jax.Array, max_lens: jax.Array, eos_id):
    """(finished, alive) bool[B, K] of the valid[B, K] extensions ending in token int32[B, K] at
    step t: finished with EOS or at the row's limit max_lens int32[B], else alive."""
    is_eos = token == eos_id
    at_limit = (t >= max_lens)[:, None]  # [batch, 1]
    return valid & (is_eos | at_limit), valid & ~is_eos & ~at_limit


def _finished_scores(log_prob_sum, finished, t, state, score_fn, final_score_fn) -> jax.Array:
    """float32[B, K]: the score of each hypothesis finished at step t (log_prob_sum float32[B, K]
    length-penalised, then final_score_fn with state leaves [B, K, ...]), _EMPTY if not finished."""
    score = score_fn(log_prob_sum, t)  # [batch, beam]
    if final_score_fn is not None:
        score = final_score_fn(score, jnp.full(score.shape, t), state).astype(jnp.float32)
    return jnp.where(finished, score, _EMPTY)


def _merge_finished(store: _Finished, new: _Finished, n_best: int) -> _Finished:
    """The n_best best of the store [B, N, ...] and one step's candidates [B, K, ...]. The store
    comes first, so on equal scores the earlier-found hypothesis is kept."""
    both = jax.tree.map(lambda old, x: jnp.concatenate([old, x], axis=1), store, new)  # [batch, N+K, ...]
    score, keep = jax.lax.top_k(both.score, n_best)  # [batch, n_best]
    seq, length, records = _gather_beams((both.seq, both.length, both.records), keep)
    return _Finished(seq, score, length, records)


def _rows_done(stop_early: str, store: _Finished, alive, log_prob_sum, max_lens, score_fn) -> jax.Array:
    """bool[B]: the rows that stop now (stop_early: see _search). alive bool[B, K] and log_prob_sum
    float32[B, K]: this step's hypotheses; max_lens int32[B]: the rows' limits."""
    full = store.length[:, -1] > 0  # [batch]: n_best hypotheses have finished
    if stop_early == "bound":  # the best alive one, at its best, cannot beat the n-th finished
        best_alive = jnp.max(jnp.where(alive, log_prob_sum, _EMPTY), axis=1)  # [batch]
        return full & (score_fn(best_alive, max_lens) < store.score[:, -1])
    if stop_early == "n_best":
        return full
    return jnp.zeros(alive.shape[:1], bool)


def _search(
    step_fn: StepFn,
    init_state,
    select,
    *,
    beam_size: int,
    n_best: int,
    max_len: int,
    eos_id,
    bos_id,
    pad_id,
    min_len,
    no_repeat_ngram_size: int,
    score_fn,
    stop_early: str,
    single_start: bool,
    max_lens=None,
    prefix=None,
    prefix_lens=None,
    final_score_fn: FinalScoreFn | None = None,
    record_fn: RecordFn | None = None,
) -> tuple[Beams | tuple[Beams, jax.Array], jax.Array]:
    """Shared search loop. Returns (Beams, number of steps run), or ((Beams, records), steps) with
    a record_fn.

    select(step, log_probs, cand_sum, cand_valid) -> (parent, token) int32[B, K]: the K extensions
    kept, from log_probs, cand_sum float32[B, K, V] and cand_valid bool[B, K, V].
    stop_early: "bound" (stop a row once no alive hypothesis can beat its n_best-th finished one;
    exact when step_fn's log-probs are <= 0 and final_score_fn never raises a score), "n_best"
    (once n_best hypotheses have finished) or "never" (only when nothing is alive or at the row's
    limit). A row that stops is frozen while others run on.
    single_start: only hypothesis 0 is alive at step 1 (beam search: the K starts are identical).
    max_lens, prefix, prefix_lens, record_fn: see the module docstring. final_score_fn: see
    beam_search.
    """
    batch = _batch_size(init_state)
    max_lens = _row_limits(max_lens, batch, max_len)  # [batch]
    prefix, prefix_lens = _prefix_args(prefix, prefix_lens, batch)  # [batch, P], [batch]
    state = _tile_state(init_state, beam_size)  # leaves [batch, beam, ...]
    tokens = jnp.full((batch, beam_size), bos_id, jnp.int32)  # [batch, beam]
    vocab_ids = jnp.arange(_check_step_fn(step_fn, tokens, state))  # [vocab]
    init = _initial_carry(tokens, state, n_best=n_best, max_len=max_len, pad_id=pad_id,
                          single_start=single_start, record_shape=_record_shape(record_fn, state))
    masks = _Masks(vocab_ids, (vocab_ids == pad_id) | (vocab_ids == bos_id), eos_id, min_len,
                   no_repeat_ngram_size, prefix, prefix_lens)
    state_dtypes = jax.tree.map(lambda x: x.dtype, state)  # the loop's carry keeps its dtypes

    def body(c: _Carry) -> _Carry:
        t = c.step + 1  # 1-based step number; the new token goes to index c.step
        log_probs, new_state = step_fn(c.tokens, c.state)
        new_state = jax.tree.map(lambda x, dtype: x.astype(dtype), new_state, state_dtypes)
        log_probs = _model_log_probs(log_probs)  # [batch, beam, vocab]
        allowed = _allowed_tokens(masks, c.step, c.alive_seq)  # broadcastable to [batch, beam, vocab]
        cand_valid = c.alive[..., None] & _extensions(log_probs, allowed)  # [batch, beam, vocab]
        cand_sum = c.alive_sum[..., None] + log_probs  # [batch, beam, vocab]
        parent, token = select(c.step, log_probs, cand_sum, cand_valid)  # [batch, beam] each
        new_sum, new_valid = _take_extensions(cand_sum, cand_valid, parent, token)  # [batch, beam] each
        seq, state, records = _extend_hypotheses(c, new_state, parent, token, record_fn)
        finished, alive = _split_finished(new_valid, token, t, max_lens, eos_id)
        score = _finished_scores(new_sum, finished, t, state, score_fn, final_score_fn)
        candidates = _Finished(seq, score, jnp.where(finished, t, 0), records)
        store = _merge_finished(c.finished, candidates, n_best)
        done = _rows_done(stop_early, store, alive, new_sum, max_lens, score_fn)  # [batch]
        alive &= ~done[:, None]  # freeze the rows that stop
        return _Carry(step=t, tokens=token, state=state, alive_seq=seq,
                      alive_sum=jnp.where(alive, new_sum, NEG_INF), alive=alive, alive_rec=records,
                      finished=store)

    out = jax.lax.while_loop(lambda c: (c.step < max_len) & jnp.any(c.alive), body, init)
    store = out.finished
    scores = jnp.where(store.length > 0, store.score, NEG_INF)  # empty slots: NEG_INF
    beams = Beams(store.seq, scores, store.length)
    return (beams if record_fn is None else (beams, store.records)), out.step


# --------------------------------------------------------------------------------------------
# Public searches
# --------------------------------------------------------------------------------------------

def ensemble_step_fn(step_fns: Sequence[StepFn]) -> StepFn:
    """One step function for an ensemble of M models: the log of the mean of their probabilities,
    logsumexp_m(log_probs_m) - log M (fairseq's ensemble), so the result is normalised when each
    member's log-probs are. The state is the tuple of the members' states (init_state: the tuple of
    their initial states); each member keeps its own state and its closure's encoder memory."""
    step_fns = tuple(step_fns)
    if not step_fns or not all(callable(f) for f in step_fns):
        raise ValueError(f"ensemble_step_fn needs a non-empty sequence of step functions, got {step_fns!r}")

    def step_fn(tokens, states):
        outs = [f(tokens, s) for f, s in zip(step_fns, states, strict=True)]
        log_probs = jnp.stack([lp.astype(jnp.float32) for lp, _ in outs])  # [member, batch, beam, vocab]
        mean = jax.nn.logsumexp(log_probs, axis=0) - np.log(len(step_fns))  # [batch, beam, vocab]
        return mean, tuple(s for _, s in outs)

    return step_fn


def length_limits(source_lengths, max_len_a: float, max_len_b: float, max_len: int) -> jax.Array | np.ndarray:
    """Per-row output limits by fairseq's rule: floor(max_len_a * source_length + max_len_b),
    capped by the compiled `max_len` and at least 1. Returns int32[B] for the searches' `max_lens`.

    source_lengths: int[B], source tokens per row (no padding). Host values are computed in float64
    as fairseq does (0.7 * 10 + 0 gives 7), with numpy (nothing to compile); traced ones (under
    jit) in float32.
    """
    check_int("max_len", max_len, 1)
    if isinstance(source_lengths, jax.core.Tracer):
        limits = jnp.floor(max_len_a * source_lengths.astype(jnp.float32) + max_len_b)
        return jnp.clip(limits, 1, max_len).astype(jnp.int32)
    limits = np.floor(max_len_a * np.asarray(source_lengths, np.float64) + max_len_b)
    return np.clip(limits, 1, max_len).astype(np.int32)


def beam_search(
    step_fn: StepFn,
    init_state,
    *,
    beam_size: int,
    max_len: int,
    eos_id: int = 2,
    bos_id: int = 1,
    pad_id: int = 0,
    alpha: float = 0.6,
    n_best: int | None = None,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
    length_penalty: str = "gnmt",
    stop_early: str = "bound",
    max_lens=None,
    prefix=None,
    prefix_lens=None,
    final_score_fn: FinalScoreFn | None = None,
    record_fn: RecordFn | None = None,
) -> Beams | tuple[Beams, jax.Array]:
    """Batched beam search in one `jax.lax.while_loop`.

    Each step extends every alive hypothesis by every token and keeps the `beam_size` extensions
    with the highest summed log-prob. Kept extensions ending in EOS are finished with length t (EOS
    counted); a hypothesis alive at its row's limit (`max_len`, or `max_lens[b]`) is finished with
    that length. Finished hypotheses are ranked by
      "gnmt":    sum_logprob / ((5 + length) / 6) ** alpha   (alpha = 0: raw log-prob)
      "average": sum_logprob / length,
    then by final_score_fn(that score, length, state) when given.
    With `beam_size` >= the number of extensions at every step nothing is pruned and the result is
    exact; `beam_size=1` is greedy search.

    Args:
        step_fn: (tokens int32[B, K], state) -> (log_probs float[B, K, V], new_state); state leaves
            are [B, K, ...]. Log-probs must be normalised (<= 0) for stop_early="bound" to be exact.
        init_state: pytree of [B, ...] leaves (at least one); broadcast to [B, K, ...].
        beam_size: K >= 1 (static), at most V ** max_len (ValueError once step_fn gives V).
        max_len: maximum number of generated tokens, EOS included (static).
        eos_id, bos_id, pad_id: special ids (eos_id differs from the others); PAD and BOS are
            never generated.
        alpha: GNMT length-penalty exponent, >= 0.
        n_best: N hypotheses returned per batch element, 1 <= N <= beam_size (default beam_size).
        min_len: EOS is forbidden at steps t < min_len (so a finished length is >= min_len).
        no_repeat_ngram_size: n > 0 forbids a token that would complete an n-gram already present in
            the hypothesis (generated tokens; BOS is not part of it).
        length_penalty: "gnmt" or "average".
        stop_early: "bound": stop a batch element once no alive hypothesis can beat its N-th best
            finished one (exact: same result as running to the end); "n_best": stop once N hypotheses
            have finished (the simple lecture rule; not exact); "never": run until no hypothesis is
            alive or max_len.
        max_lens: optional int32[B], per-row output limits min(max_lens[b], max_len), >= 1 (see
            `length_limits`); the stop bound uses each row's own limit.
        prefix, prefix_lens: optional int32[B, P] and int32[B] (default P): row b is forced through
            prefix[b, :prefix_lens[b]] (other tokens masked, on top of the usual masks; only the
            forced hypothesis is alive meanwhile); results start with it, scores include it.
        final_score_fn: optional (score float32[B, K], length int32[B, K], state) -> float32[B, K],
            applied to each hypothesis's length-penalised score when it finishes; `state` (leaves
            [B, K, ...]) is that hypothesis's decode state after its last step, so a model-aware
            caller can add e.g. a GNMT coverage penalty from attention it accumulates in the state.
            The "bound" stop stays exact only if the hook never raises a score (a penalty <= 0, as
            coverage is); with a hook that may raise scores use stop_early="never".
        record_fn: optional state -> float[B, K, ...] recorded per step (see the module docstring).

    Returns:
        Beams(sequences int32[B, N, max_len], scores float32[B, N], lengths int32[B, N]), best first;
        with record_fn, (Beams, records float32[B, N, max_len, ...]).
    """
    check_int("beam_size", beam_size, 1)
    _check_common(max_len, min_len, eos_id, bos_id, pad_id)
    if n_best is None:
        n_best = beam_size
    check_int("n_best", n_best, 1)
    if n_best > beam_size:
        raise ValueError(f"n_best must be <= beam_size, got n_best={n_best} > beam_size={beam_size}")
    _check_nonneg("alpha", alpha)
    check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0)
    if stop_early not in ("bound", "n_best", "never"):
        raise ValueError(f"stop_early must be 'bound', 'n_best' or 'never', got {stop_early!r}")
    if final_score_fn is not None and not callable(final_score_fn):
        raise ValueError(f"final_score_fn must be callable or None, got {final_score_fn!r}")
    result, _ = _search(
        step_fn, init_state, _beam_select(beam_size, max_len),
        beam_size=beam_size, n_best=n_best, max_len=max_len, eos_id=eos_id, bos_id=bos_id,
        pad_id=pad_id, min_len=min_len, no_repeat_ngram_size=no_repeat_ngram_size,
        score_fn=_length_penalty_fn(length_penalty, alpha), stop_early=stop_early, single_start=True,
        max_lens=max_lens, prefix=prefix, prefix_lens=prefix_lens, final_score_fn=final_score_fn,
        record_fn=record_fn)
    return result


def greedy_search(
    step_fn: StepFn,
    init_state,
    *,
    max_len: int,
    eos_id: int = 2,
    bos_id: int = 1,
    pad_id: int = 0,
    min_len: int = 0,
    max_lens=None,
    prefix=None,
    prefix_lens=None,
    record_fn: RecordFn | None = None,
) -> Beams | tuple[Beams, jax.Array]:
    """Greedy search: the argmax allowed token each step until EOS or `max_len` (= beam search, K = 1).

    Returns Beams with N = 1; the score is the raw summed log-prob (no length penalty).
    `max_lens`, `prefix`, `prefix_lens`, `record_fn`: as in `beam_search`.
    """
    _check_common(max_len, min_len, eos_id, bos_id, pad_id)
    result, _ = _search(
        step_fn, init_state, _beam_select(1, max_len),
        beam_size=1, n_best=1, max_len=max_len, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
        min_len=min_len, no_repeat_ngram_size=0, score_fn=_raw_score, stop_early="never",
        single_start=True, max_lens=max_lens, prefix=prefix, prefix_lens=prefix_lens,
        record_fn=record_fn)
    return result


def sample_search(
    step_fn: StepFn,
    init_state,
    rng: jax.Array,
    *,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    eos_id: int = 2,
    bos_id: int = 1,
    pad_id: int = 0,
    min_len: int = 0,
    num_samples: int = 1,
    top_p: float = 1.0,
    max_lens=None,
    prefix=None,
    prefix_lens=None,
    record_fn: RecordFn | None = None,
) -> Beams | tuple[Beams, jax.Array]:
    """Ancestral sampling: `num_samples` independent samples per batch element (K = N = num_samples).

    Each step draws token ~ softmax(log_probs / temperature) over the allowed tokens (never PAD or
    BOS), restricted to the `top_k` most likely of them when top_k > 0, then, when top_p < 1, to the
    nucleus: the smallest set of most likely of those whose (renormalised, tempered) probability
    mass reaches top_p. The key is `jax.random.fold_in(rng, step)` (rng uint32[batch, 2]: each row
    its own, so a row's samples do not depend on the other rows). A sample's score is its raw
    summed (untempered) log-prob; samples are returned sorted by score, best first.
    `max_lens`, `prefix`, `prefix_lens`, `record_fn`: as in `beam_search` (every sample starts with
    the prefix).
    """
    _check_common(max_len, min_len, eos_id, bos_id, pad_id)
    check_int("num_samples", num_samples, 1)
    check_int("top_k", top_k, 0)
    if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0 (use greedy_search for argmax), got {temperature!r}")
    if not isinstance(top_p, jax.core.Tracer) and not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    result, _ = _search(
        step_fn, init_state, _sample_select(rng, temperature, top_k, top_p),
        beam_size=num_samples, n_best=num_samples, max_len=max_len, eos_id=eos_id, bos_id=bos_id,
        pad_id=pad_id, min_len=min_len, no_repeat_ngram_size=0, score_fn=_raw_score,
        stop_early="never", single_start=False, max_lens=max_lens, prefix=prefix,
        prefix_lens=prefix_lens, record_fn=record_fn)
    return result
