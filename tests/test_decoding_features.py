"""Tests for the optional search features of s2s_jax.decoding: nucleus sampling (top_p), per-row
output limits (max_lens, length_limits), prefix forcing (prefix, prefix_lens), the beam
search's final-score hook (final_score_fn) and per-step records (record_fn).

References: the brute-force enumeration, Python greedy and teacher forcing of test_decoding.py,
the exact renormalised nucleus, and each row decoded alone with its own static max_len.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax.decoding import beam_search, greedy_search, length_limits, sample_search
from tests.test_decoding import (BOS, H0, PAD, Toy, as_list, assert_same_ranking, brute_force,
                                 check_well_formed, np_greedy, reference_beam, teacher_forced_sums)

# --------------------------------------------------------------------------------------------
# Nucleus sampling
# --------------------------------------------------------------------------------------------


def nucleus_probs(logp, temperature, top_k, top_p):
    """Exact first-token distribution: tempered softmax over the allowed tokens, cut to the top_k,
    renormalised, cut to the smallest most-likely set of mass >= top_p, renormalised."""
    p = np.exp(logp / temperature) * np.isin(np.arange(len(logp)), [PAD, BOS], invert=True)
    order = np.argsort(-p, kind="stable")
    if top_k:
        p[order[top_k:]] = 0.0
    p /= p.sum()
    cumulative = np.cumsum(p[order])
    assert np.min(np.abs(cumulative - top_p)) > 0.02, "top_p too close to a boundary"
    p[order[cumulative - p[order] >= top_p]] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.6), (0.7, 3, 0.74), (1.5, 0, 0.3)])
def test_nucleus_first_token_distribution(temperature, top_k, top_p):
    toy, h0, n = Toy(6, seed=12, scale=1.0), [0, 3], 4000
    beams = sample_search(toy.step_fn, toy.init_state(h0), jax.random.PRNGKey(5), max_len=1,
                          temperature=temperature, top_k=top_k, top_p=top_p, num_samples=n)
    for b, h in enumerate(h0):
        logp, _ = toy.np_step(h, BOS)
        want = nucleus_probs(logp, temperature, top_k, top_p)
        assert 0 < np.count_nonzero(want) < 4, "the nucleus should cut something"
        counts = np.bincount(np.asarray(beams.sequences)[b, :, 0], minlength=6)
        assert np.all(counts[want == 0] == 0), (counts, want)
        kept = want > 0
        chi2 = np.sum((counts[kept] - n * want[kept]) ** 2 / (n * want[kept]))
        assert chi2 < 20.0, (chi2, counts, want)  # df <= 2: p-value < 1e-4 (fixed key: deterministic)


def test_tiny_top_p_is_greedy_and_jittable():
    toy = Toy(6, mod=13, seed=9)
    init, key = toy.init_state(H0), jax.random.PRNGKey(0)
    greedy = greedy_search(toy.step_fn, init, max_len=7)
    search = jax.jit(functools.partial(sample_search, toy.step_fn, max_len=7, num_samples=2,
                                       temperature=0.8))
    samples = search(init, key, top_p=jnp.float32(1e-6))  # traced top_p
    for k in range(2):
        np.testing.assert_array_equal(samples.sequences[:, k], greedy.sequences[:, 0])
        np.testing.assert_allclose(samples.scores[:, k], greedy.scores[:, 0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Per-row output limits
# --------------------------------------------------------------------------------------------

MAX_LENS, LIMITS = [2, 9, 0], [2, 4, 1]  # capped by max_len = 4 and raised to >= 1


def test_length_limits():
    src = np.array([10, 3, 0, 40])
    # 0.7 * 10 is 6.99999988 in float32: the host path computes in float64, as fairseq does.
    np.testing.assert_array_equal(length_limits(src, 0.7, 0, 20), [7, 2, 1, 20])
    np.testing.assert_array_equal(length_limits(src, 1.2, 10, 30), [22, 13, 10, 30])
    limits = jax.jit(length_limits, static_argnums=(1, 2, 3))(jnp.asarray(src), 0.5, 3, 20)
    assert limits.dtype == jnp.int32
    np.testing.assert_array_equal(limits, [8, 4, 3, 20])


def test_max_lens_beam_equals_each_row_alone():
    toy = Toy(5, mod=11, seed=3, eos_bias=-1.0)  # long hypotheses: the limits matter
    kw = dict(beam_size=2, n_best=2, alpha=0.6)
    batched = beam_search(toy.step_fn, toy.init_state(H0), max_len=4, max_lens=np.array(MAX_LENS), **kw)
    check_well_formed(batched, 4, limits=LIMITS)
    for b, (h0, limit) in enumerate(zip(H0, LIMITS)):
        alone = beam_search(toy.step_fn, toy.init_state([h0]), max_len=limit, **kw)
        assert as_list(batched, b) == as_list(alone, 0)
        assert_same_ranking(as_list(batched, b), reference_beam(toy, h0, 2, limit, 2, 0.6, "bound"))
    assert np.asarray(batched.lengths).max(axis=1).tolist() == LIMITS


def test_max_lens_wide_beam_greedy_and_sampling():
    toy = Toy(5, mod=11, seed=4, eos_bias=-0.5)
    init, max_lens = toy.init_state(H0), jnp.asarray(MAX_LENS)
    wide = beam_search(toy.step_fn, init, beam_size=3**4, n_best=3, max_len=4, max_lens=max_lens)
    greedy = greedy_search(toy.step_fn, init, max_len=4, max_lens=max_lens)
    for b, (h0, limit) in enumerate(zip(H0, LIMITS)):
        assert_same_ranking(as_list(wide, b), brute_force(toy, h0, limit, 0.6)[:3])
        assert as_list(greedy, b)[0][1] == np_greedy(toy, h0, limit)
    samples = sample_search(toy.step_fn, init, jax.random.PRNGKey(1), max_len=4, max_lens=max_lens,
                            num_samples=64)
    check_well_formed(samples, 4, check_eos=False)
    lengths = np.asarray(samples.lengths)
    assert lengths.max(axis=1).tolist() == LIMITS
    np.testing.assert_allclose(samples.scores, teacher_forced_sums(toy.step_fn, init, samples), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Prefix forcing
# --------------------------------------------------------------------------------------------

PREFIX = np.array([[3, 4], [4, 0], [3, 3]], np.int32)
PREFIX_LENS = np.array([2, 1, 0], np.int32)  # row 2 is free


def starts_with_prefix(seq, b):
    return seq[:PREFIX_LENS[b]] == tuple(PREFIX[b, :PREFIX_LENS[b]])


def test_prefix_and_max_lens_wide_beam_jitted_equal_restricted_brute_force():
    toy, max_len, n_best, limits = Toy(5, seed=7), 4, 5, [4, 3, 4]
    search = jax.jit(functools.partial(beam_search, toy.step_fn, beam_size=3**max_len,
                                       max_len=max_len, n_best=n_best))
    beams = search(toy.init_state(H0), prefix=PREFIX, prefix_lens=PREFIX_LENS, max_lens=np.array(limits))
    check_well_formed(beams, max_len, limits=limits)
    np.testing.assert_allclose(beams.scores, np.asarray(teacher_forced_sums(
        toy.step_fn, toy.init_state(H0), beams)) / ((5.0 + np.asarray(beams.lengths)) / 6.0) ** 0.6,
        rtol=1e-5)
    for b, h0 in enumerate(H0):
        want = [w for w in brute_force(toy, h0, limits[b], 0.6) if starts_with_prefix(w[1], b)]
        assert_same_ranking(as_list(beams, b), want[:n_best])


def test_prefix_greedy_beam1_and_sampling():
    toy, max_len = Toy(6, mod=13, seed=2), 6
    init = toy.init_state(H0)
    rows = dict(prefix=PREFIX, prefix_lens=PREFIX_LENS)
    greedy = greedy_search(toy.step_fn, init, max_len=max_len, **rows)
    beam1 = beam_search(toy.step_fn, init, beam_size=1, max_len=max_len, alpha=0.0, **rows)
    for got, want in zip(beam1, greedy):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(greedy.scores, teacher_forced_sums(toy.step_fn, init, greedy), rtol=1e-5)
    for b, h0 in enumerate(H0):
        prefix = tuple(PREFIX[b, :PREFIX_LENS[b]])
        assert as_list(greedy, b)[0][1] == np_greedy(toy, h0, max_len, prefix=prefix)
    assert as_list(greedy, 1)[0][1] != np_greedy(toy, H0[1], max_len), "the prefix should matter"
    samples = sample_search(toy.step_fn, init, jax.random.PRNGKey(2), max_len=max_len, num_samples=32,
                            temperature=2.0, max_lens=np.array([3, 6, 6]), **rows)
    check_well_formed(samples, max_len, check_eos=False)
    np.testing.assert_allclose(samples.scores, teacher_forced_sums(toy.step_fn, init, samples), rtol=1e-5)
    for b in range(len(H0)):
        seqs = [s for _, s in as_list(samples, b)]
        assert all(starts_with_prefix(s, b) for s in seqs)
        assert len(set(seqs)) > 1
    assert len({s[0] for _, s in as_list(samples, 2)}) > 1, "the free row samples its first token"


# --------------------------------------------------------------------------------------------
# Final-score hook
# --------------------------------------------------------------------------------------------

WORD = 3


class Counting:
    """The toy model, its state extended with `count`: how often WORD was fed as input so far
    (so after the last step of y_1 .. y_t it counts WORD in y_1 .. y_{t-1})."""

    def __init__(self, toy):
        self.toy = toy

    def init_state(self, h0):
        return {"toy": self.toy.init_state(h0), "count": jnp.zeros(len(h0), jnp.float32)}

    def step_fn(self, tokens, state):
        log_probs, toy_state = self.toy.step_fn(tokens, state["toy"])
        return log_probs, {"toy": toy_state, "count": state["count"] + (tokens == WORD)}


@pytest.mark.parametrize("weight,stop_early", [(-1.0, "bound"), (0.8, "never")])
def test_final_score_hook_equals_hand_computed(weight, stop_early):
    toy, max_len, n_best = Toy(5, seed=9, eos_bias=0.5), 4, 4
    model = Counting(toy)

    def hook(score, length, state):  # [batch, beam]: a per-word term plus a length term
        return score + weight * state["count"] - 0.05 * length

    def bonus(seq):  # the same, by hand
        return weight * seq[:-1].count(WORD) - 0.05 * len(seq)

    beams = beam_search(model.step_fn, model.init_state(H0), beam_size=3**max_len, max_len=max_len,
                        n_best=n_best, stop_early=stop_early, final_score_fn=hook)
    check_well_formed(beams, max_len)
    changed = False
    for b, h0 in enumerate(H0):
        want = brute_force(toy, h0, max_len, 0.6, bonus=bonus)[:n_best]
        assert_same_ranking(as_list(beams, b), want)
        changed |= [w[1] for w in want] != [w[1] for w in brute_force(toy, h0, max_len, 0.6)[:n_best]]
    assert changed, "the hook should change the ranking"


def test_final_score_hook_penalty_keeps_bound_exact():
    model = Counting(Toy(6, mod=13, seed=8, eos_bias=2.0))
    kw = dict(beam_size=3, n_best=2, max_len=10,
              final_score_fn=lambda score, length, state: score - 0.5 * state["count"])
    bound, never = (beam_search(model.step_fn, model.init_state(H0), stop_early=rule, **kw)
                    for rule in ("bound", "never"))
    for got, want in zip(bound, never):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Per-step records
# --------------------------------------------------------------------------------------------


def record(state):
    """[batch, beam, 3]: the toy's state after a step: (hash, steps, the step's input token)."""
    return jnp.concatenate([state["h"][..., None].astype(jnp.float32), state["aux"]], axis=-1)


def hand_records(toy, h0, seq, max_len):
    """The same records by hand along one returned sequence, zeros from its length on. [max_len, 3]"""
    out, h = np.zeros((max_len, 3), np.float32), h0
    for t, token in enumerate(seq):
        fed = BOS if t == 0 else seq[t - 1]
        h = (3 * h + fed + 1) % toy.mod
        out[t] = (h, t + 1, fed)
    return out


@pytest.mark.parametrize("search", ["beam", "greedy", "sample"])
def test_records_follow_their_hypotheses(search):
    toy, max_len = Toy(5, mod=11, seed=6, eos_bias=-0.5), 5
    init, key = toy.init_state(H0), jax.random.PRNGKey(3)
    run = {"beam": functools.partial(beam_search, beam_size=6, n_best=4, max_lens=np.array([5, 3, 4])),
           "greedy": greedy_search,
           "sample": functools.partial(sample_search, rng=key, num_samples=5)}[search]
    plain = run(toy.step_fn, init, max_len=max_len)
    beams, records = jax.jit(functools.partial(run, toy.step_fn, max_len=max_len, record_fn=record))(init)
    for got, want in zip(beams, plain):  # recording changes nothing else
        np.testing.assert_array_equal(got, want)
    assert records.shape == beams.sequences.shape + (3,) and records.dtype == jnp.float32
    for b, h0 in enumerate(H0):
        for n, (_, seq) in enumerate(as_list(beams, b)):
            np.testing.assert_array_equal(records[b, n], hand_records(toy, h0, seq, max_len))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_bad_feature_arguments():
    toy = Toy(5)
    init, key = toy.init_state(H0), jax.random.PRNGKey(0)
    cases = [
        (dict(max_lens=np.array([2, 3])), r"max_lens must have shape \[B\]"),
        (dict(prefix=np.array([3, 4, 3])), r"prefix must have shape \[B, P\]"),
        (dict(prefix=PREFIX, prefix_lens=np.array([[1], [1], [1]])), r"prefix_lens must have shape \[B\]"),
        (dict(prefix_lens=PREFIX_LENS), "prefix_lens needs prefix"),
    ]
    for kwargs, message in cases:
        for search in (functools.partial(beam_search, beam_size=2), greedy_search,
                       functools.partial(sample_search, rng=key)):
            with pytest.raises(ValueError, match=message):
                search(toy.step_fn, init, max_len=3, **kwargs)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sample_search(toy.step_fn, init, key, max_len=3, top_p=top_p)
    with pytest.raises(ValueError, match="final_score_fn"):
        beam_search(toy.step_fn, init, beam_size=2, max_len=3, final_score_fn=1.0)
    with pytest.raises(ValueError, match="record_fn"):
        beam_search(toy.step_fn, init, beam_size=2, max_len=3, record_fn=lambda state: state["h"][0])
    with pytest.raises(ValueError, match="max_len"):
        length_limits(np.array([3]), 1.0, 0, 0)
