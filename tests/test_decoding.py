"""Tests for s2s_jax.decoding against independent references.

References: brute-force enumeration of every finished sequence (numpy float64), a direct
Python transcription of the beam-search contract, and teacher forcing through step_fn itself.
The toy model is non-Markov: its state is a running hash of the whole prefix.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import decoding
from s2s_jax.decoding import NEG_INF, Beams, beam_search, greedy_search, sample_search

PAD, BOS, EOS = 0, 1, 2


class Toy:
    """log p(. | prefix) = log_softmax(table[hash(prefix) % M, last token]).

    The hash h_t = (3 * h_{t-1} + token_t + 1) % M depends on the whole prefix (not just the last
    token), and h_0 comes from init_state, so batch elements differ. The state also carries a
    [K, 2] float leaf (step count, last token) to check that wider leaves are gathered correctly.
    `bias` ([vocab] or scalar) is added to every logit row.
    """

    def __init__(self, vocab, mod=7, seed=0, eos_bias=0.0, scale=1.5, bias=0.0):
        rng = np.random.default_rng(seed)
        table = rng.normal(size=(mod, vocab, vocab)) * scale + np.asarray(bias)
        table[..., EOS] += eos_bias
        self.table = table.astype(np.float32)
        self.vocab, self.mod = vocab, mod

    def init_state(self, h0):
        h0 = np.asarray(h0, np.int32)
        return {"h": jnp.asarray(h0), "aux": jnp.zeros((len(h0), 2), jnp.float32)}

    def step_fn(self, tokens, state):
        assert tokens.ndim == 2 and state["h"].shape == tokens.shape
        assert state["aux"].shape == tokens.shape + (2,)
        h = (3 * state["h"] + tokens + 1) % self.mod  # [batch, beam]
        logits = jnp.asarray(self.table)[h, tokens]  # [batch, beam, vocab]
        aux = jnp.stack([state["aux"][..., 0] + 1, tokens.astype(jnp.float32)], axis=-1)
        return jax.nn.log_softmax(logits, axis=-1), {"h": h, "aux": aux}

    def np_step(self, h, token):
        h = (3 * h + token + 1) % self.mod
        logits = self.table[h, token].astype(np.float64)
        logits = logits - logits.max()
        return logits - np.log(np.exp(logits).sum()), h


def np_score(total, length, alpha, length_penalty="gnmt"):
    if length_penalty == "average":
        return total / length
    return total / ((5.0 + length) / 6.0) ** alpha


def completes_repeat(prefix, token, n):
    """True if prefix + [token] ends in an n-gram that already occurs in prefix."""
    if n <= 0 or len(prefix) + 1 < n:
        return False
    gram = tuple(prefix[len(prefix) - n + 1:]) + (token,)
    return any(tuple(prefix[j:j + n]) == gram for j in range(len(prefix) - n + 1))


def allowed(prefix, token, t, min_len=0, ngram=0):
    if token in (PAD, BOS) or (token == EOS and t < min_len):
        return False
    return not completes_repeat(prefix, token, ngram)


def brute_force(toy, h0, max_len, alpha, length_penalty="gnmt", min_len=0, ngram=0, bonus=None):
    """Every finished sequence with its score (plus bonus(tokens) if given), best first:
    [(score, tokens tuple)]."""
    out = []

    def rec(prefix, total, h, last):
        t = len(prefix) + 1
        logp, h2 = toy.np_step(h, last)
        for v in range(toy.vocab):
            if not allowed(prefix, v, t, min_len, ngram):
                continue
            seq, s = prefix + (v,), total + logp[v]
            if v == EOS or t == max_len:
                out.append((np_score(s, t, alpha, length_penalty) + (bonus(seq) if bonus else 0.0), seq))
            else:
                rec(seq, s, h2, v)

    rec((), 0.0, h0, BOS)
    return sorted(out, key=lambda x: -x[0])


def reference_beam(toy, h0, beam_size, max_len, n_best, alpha, stop_early, length_penalty="gnmt"):
    """The contract, transcribed literally in Python (float64). Returns [(score, tokens)]."""
    alive = [((), 0.0, h0, BOS)]
    finished = []
    denom = max_len if length_penalty == "average" else ((5.0 + max_len) / 6.0) ** alpha
    for t in range(1, max_len + 1):
        cands = []
        for parent, (prefix, total, h, last) in enumerate(alive):
            logp, h2 = toy.np_step(h, last)
            cands += [(total + logp[v], parent, v, prefix, h2)
                      for v in range(toy.vocab) if allowed(prefix, v, t)]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        alive = []
        for total, _, v, prefix, h2 in cands[:beam_size]:
            if v == EOS or t == max_len:
                finished.append((np_score(total, t, alpha, length_penalty), prefix + (v,)))
            else:
                alive.append((prefix + (v,), total, h2, v))
        finished.sort(key=lambda x: -x[0])
        if not alive:
            break
        if len(finished) >= n_best:
            if stop_early == "n_best":
                break
            if max(a[1] for a in alive) / denom < finished[n_best - 1][0]:
                break
    return finished[:n_best]


def np_greedy(toy, h0, max_len, bos=BOS, pad=PAD, prefix=()):
    """Greedy by hand: prefix[t - 1] at steps t <= len(prefix), then the argmax token other than
    `pad` and `bos`, each step. Returns a tuple."""
    h, last, seq = h0, bos, []
    while len(seq) < max_len and last != EOS:
        logp, h = toy.np_step(h, last)
        logp[[pad, bos]] = -np.inf
        last = prefix[len(seq)] if len(seq) < len(prefix) else int(np.argmax(logp))
        seq.append(last)
    return tuple(seq)


def tile(init_state, k):
    return jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], k) + x.shape[1:]), init_state)


def teacher_forced_sums(step_fn, init_state, beams):
    """Summed log-probs of each returned hypothesis, recomputed by feeding it through step_fn."""
    batch, n, length = beams.sequences.shape
    state, tokens = tile(init_state, n), jnp.full((batch, n), BOS, jnp.int32)
    total = jnp.zeros((batch, n))
    for t in range(length):
        logp, state = step_fn(tokens, state)
        tokens = beams.sequences[:, :, t]
        lp_t = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        total += jnp.where(t < beams.lengths, lp_t, 0.0)
    return np.asarray(total)


def check_well_formed(beams, max_len, check_eos=True, limits=None):
    """limits: optional per-row output limits [B] (default max_len for every row)."""
    seqs, scores, lengths = map(np.asarray, beams)
    assert seqs.dtype == np.int32 and lengths.dtype == np.int32 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0), scores
    pos = np.arange(max_len)
    assert np.all(np.where(pos >= lengths[..., None], seqs, PAD) == PAD), "tokens after the end must be pad"
    assert not np.any(np.isin(seqs, [PAD, BOS]) & (pos < lengths[..., None])), "PAD or BOS inside"
    if check_eos:  # EOS only at the end; a hypothesis shorter than max_len ends with EOS
        inside = pos < lengths[..., None] - 1
        assert not np.any((seqs == EOS) & inside)
        last = np.take_along_axis(seqs, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
        limit = max_len if limits is None else np.asarray(limits)[:, None]
        assert np.all((last == EOS) | (lengths == limit))


def as_list(beams, b):
    seqs, scores, lengths = map(np.asarray, beams)
    return [(float(scores[b, i]), tuple(seqs[b, i, :lengths[b, i]])) for i in range(seqs.shape[1])]


def assert_same_ranking(got, want):
    assert len(got) == len(want)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]


H0 = [0, 3, 5]


# --------------------------------------------------------------------------------------------
# Exactness against brute force
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab,max_len,alpha,length_penalty",
    [(5, 3, 0.0, "gnmt"), (5, 3, 0.6, "gnmt"), (5, 3, 1.0, "gnmt"), (5, 4, 0.6, "gnmt"),
     (5, 3, 0.0, "average")])
def test_wide_beam_equals_brute_force(vocab, max_len, alpha, length_penalty):
    toy = Toy(vocab, seed=vocab + max_len)
    beam_size, n_best = vocab**max_len, 8  # wide: nothing is ever pruned
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=beam_size, max_len=max_len,
                        alpha=alpha, n_best=n_best, length_penalty=length_penalty)
    assert beams.sequences.shape == (len(H0), n_best, max_len)
    check_well_formed(beams, max_len)
    for b, h0 in enumerate(H0):
        want = brute_force(toy, h0, max_len, alpha, length_penalty)
        assert min(w[0] - v[0] for w, v in zip(want[:n_best], want[1:n_best + 1])) > 1e-4, "near tie"
        assert_same_ranking(as_list(beams, b), want[:n_best])


@pytest.mark.parametrize("min_len,ngram", [(2, 0), (3, 0), (0, 1), (0, 2), (2, 2)])
def test_min_len_and_no_repeat_ngram_equal_brute_force(min_len, ngram):
    toy = Toy(6, seed=11, eos_bias=1.0)  # 4 tokens besides PAD and BOS: >= n_best sequences
    max_len, n_best = 4, 6
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=6**max_len, max_len=max_len,
                        n_best=n_best, min_len=min_len, no_repeat_ngram_size=ngram)
    check_well_formed(beams, max_len)
    assert np.all(np.asarray(beams.lengths) >= min_len)
    for b, h0 in enumerate(H0):
        want = brute_force(toy, h0, max_len, 0.6, min_len=min_len, ngram=ngram)
        got = as_list(beams, b)
        assert_same_ranking(got, want[:n_best])
        for _, seq in got:
            assert not any(completes_repeat(seq[:i], seq[i], ngram) for i in range(len(seq)))


def test_no_repeat_ngram_narrow_beam():
    toy = Toy(6, mod=5, seed=4, eos_bias=-3.0, scale=3.0)  # long, repetitive hypotheses
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=3, max_len=10,
                        no_repeat_ngram_size=2)
    for b in range(len(H0)):
        for _, seq in as_list(beams, b):
            grams = list(zip(seq, seq[1:]))
            assert len(grams) == len(set(grams)), seq
    plain = beam_search(toy.step_fn, toy.init_state(H0), beam_size=3, max_len=10)
    seqs = [s for b in range(len(H0)) for _, s in as_list(plain, b)]
    assert any(len(set(zip(s, s[1:]))) < len(s) - 1 for s in seqs), "test model should repeat"


# --------------------------------------------------------------------------------------------
# Pruning semantics against the literal transcription of the contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "beam_size,n_best,alpha,stop_early,length_penalty",
    [(3, 3, 0.6, "bound", "gnmt"), (4, 2, 0.0, "bound", "gnmt"), (4, 2, 1.0, "n_best", "gnmt"),
     (2, 1, 0.6, "n_best", "gnmt"), (3, 2, 0.0, "bound", "average")])
def test_narrow_beam_equals_reference(beam_size, n_best, alpha, stop_early, length_penalty):
    toy = Toy(7, mod=11, seed=3, eos_bias=0.5)
    max_len = 7
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=beam_size, max_len=max_len,
                        alpha=alpha, n_best=n_best, stop_early=stop_early,
                        length_penalty=length_penalty)
    check_well_formed(beams, max_len)
    for b, h0 in enumerate(H0):
        want = reference_beam(toy, h0, beam_size, max_len, n_best, alpha, stop_early, length_penalty)
        assert_same_ranking(as_list(beams, b), want)


def test_scores_equal_teacher_forcing():
    toy = Toy(6, mod=13, seed=5, eos_bias=0.3)
    init = toy.init_state(H0)
    for alpha, penalty in [(0.0, "gnmt"), (0.6, "gnmt"), (0.0, "average")]:
        beams = beam_search(toy.step_fn, init, beam_size=4, max_len=6, alpha=alpha,
                            length_penalty=penalty)
        check_well_formed(beams, 6)
        sums = teacher_forced_sums(toy.step_fn, init, beams)
        want = np_score(sums, np.asarray(beams.lengths), alpha, penalty)
        np.testing.assert_allclose(np.asarray(beams.scores), want, rtol=1e-5, atol=1e-5)


def test_early_stop_is_exact_and_saves_steps():
    toy = Toy(6, mod=13, seed=8, eos_bias=2.0)
    init, max_len = toy.init_state(H0), 12
    calls = []

    def counting_step_fn(tokens, state):
        jax.debug.callback(lambda: calls.append(1))
        return toy.step_fn(tokens, state)

    for alpha, penalty in [(0.0, "gnmt"), (0.6, "gnmt"), (1.0, "gnmt"), (0.0, "average")]:
        score_fn = decoding._length_penalty_fn(penalty, alpha)
        results = {}
        for rule in ("bound", "never"):
            calls.clear()
            beams, steps = decoding._search(
                counting_step_fn, init, decoding._beam_select(3, max_len), beam_size=3, n_best=2,
                max_len=max_len, eos_id=EOS, bos_id=BOS, pad_id=PAD, min_len=0,
                no_repeat_ngram_size=0, score_fn=score_fn, stop_early=rule,
                single_start=True)
            results[rule] = (jax.tree.map(np.asarray, beams), int(steps), len(calls))
        (bound, bound_steps, bound_calls), (full, full_steps, _) = results["bound"], results["never"]
        assert bound_steps == bound_calls
        # The "average" bound s / max_len is loose (future log-probs may be 0), so it may not fire.
        assert bound_steps < full_steps or penalty == "average", (alpha, penalty)
        for got, want in zip(bound, full):
            np.testing.assert_array_equal(got, want)
    # The public function runs the same loop (last configuration above).
    public = beam_search(toy.step_fn, init, beam_size=3, n_best=2, max_len=max_len,
                         length_penalty="average")
    for got, want in zip(public, results["bound"][0]):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Greedy, batching, jit
# --------------------------------------------------------------------------------------------


def test_beam_size_one_is_greedy():
    toy = Toy(6, mod=13, seed=2)
    init = toy.init_state(H0)
    greedy = greedy_search(toy.step_fn, init, max_len=8)
    beam1 = beam_search(toy.step_fn, init, beam_size=1, max_len=8, alpha=0.0)
    assert greedy.sequences.shape == (3, 1, 8) and greedy.scores.shape == (3, 1)
    check_well_formed(greedy, 8)
    for got, want in zip(beam1, greedy):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.asarray(greedy.scores)[:, 0],
                               teacher_forced_sums(toy.step_fn, init, greedy)[:, 0], rtol=1e-5)
    for b, h0 in enumerate(H0):
        assert as_list(greedy, b)[0][1] == np_greedy(toy, h0, 8)


def test_min_len_greedy():
    toy = Toy(5, seed=1, eos_bias=10.0)  # EOS is always the argmax
    init = toy.init_state(H0)
    assert np.all(np.asarray(greedy_search(toy.step_fn, init, max_len=6).lengths) == 1)
    beams = greedy_search(toy.step_fn, init, max_len=6, min_len=3)
    assert np.all(np.asarray(beams.lengths) == 3)
    check_well_formed(beams, 6)


@pytest.mark.parametrize("stop_early", ["bound", "n_best"])
def test_batch_equals_single(stop_early):
    toy = Toy(6, mod=13, seed=6, eos_bias=1.0)
    kw = dict(beam_size=3, max_len=8, n_best=2, stop_early=stop_early)
    batched = beam_search(toy.step_fn, toy.init_state(H0), **kw)
    for b, h0 in enumerate(H0):
        single = beam_search(toy.step_fn, toy.init_state([h0]), **kw)
        for got, want in zip(single, batched):
            np.testing.assert_allclose(np.asarray(got)[0], np.asarray(want)[b], rtol=1e-6)


def test_jit_matches_eager():
    toy = Toy(6, mod=13, seed=7)
    init = toy.init_state(H0)
    search = jax.jit(functools.partial(beam_search, toy.step_fn, beam_size=3, max_len=6))
    jitted, eager = search(init), beam_search(toy.step_fn, init, beam_size=3, max_len=6)
    assert isinstance(jitted, Beams)
    for got, want in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    greedy = jax.jit(functools.partial(greedy_search, toy.step_fn, max_len=6))(init)
    np.testing.assert_array_equal(greedy.sequences, greedy_search(toy.step_fn, init, max_len=6).sequences)


def test_memory_in_closure_is_not_tiled():
    batch, beam, src, dim, vocab = 2, 3, 7, 11, 5
    memory = jax.random.normal(jax.random.PRNGKey(0), (batch, src, dim))  # [batch, src, dim]
    embed = jax.random.normal(jax.random.PRNGKey(1), (vocab, dim))
    out = jax.random.normal(jax.random.PRNGKey(2), (dim, vocab))

    def step_fn(tokens, state):
        assert memory.shape == (batch, src, dim)
        assert tokens.shape == (batch, beam) and state.shape == (batch, beam, dim)
        query = state + embed[tokens]  # [batch, beam, dim]
        weights = jax.nn.softmax(jnp.einsum("bkd,bsd->bks", query, memory), axis=-1)
        context = jnp.einsum("bks,bsd->bkd", weights, memory)  # [batch, beam, dim]
        new_state = jnp.tanh(query + context)
        return jax.nn.log_softmax(new_state @ out, axis=-1), new_state

    init = jnp.zeros((batch, dim))
    search = functools.partial(beam_search, step_fn, beam_size=beam, max_len=4)
    beams = jax.jit(search)(init)
    assert beams.sequences.shape == (batch, beam, 4)

    tiled = {(batch * beam, src, dim), (batch, beam, src, dim), (beam, batch, src, dim)}
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else [p]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(search)(init).jaxpr)
    assert (batch, beam, src) in shapes  # attention weights were seen: the walk reached the loop
    assert not shapes & tiled


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_top_k_one_is_greedy():
    toy = Toy(6, mod=13, seed=9)
    init = toy.init_state(H0)
    greedy = greedy_search(toy.step_fn, init, max_len=7)
    samples = sample_search(toy.step_fn, init, jax.random.PRNGKey(0), max_len=7, top_k=1,
                            temperature=0.7, num_samples=2)
    for k in range(2):
        np.testing.assert_array_equal(samples.sequences[:, k], greedy.sequences[:, 0])
        np.testing.assert_allclose(samples.scores[:, k], greedy.scores[:, 0], rtol=1e-6)


def test_sampling_deterministic_and_scored():
    toy = Toy(6, mod=13, seed=10, eos_bias=0.5)
    init = toy.init_state(H0)
    sample = functools.partial(sample_search, toy.step_fn, init, max_len=8, num_samples=4,
                               temperature=1.3, top_k=4)
    a, b, c = sample(jax.random.PRNGKey(1)), sample(jax.random.PRNGKey(1)), sample(jax.random.PRNGKey(2))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.sequences, c.sequences)
    assert a.sequences.shape == (3, 4, 8)
    check_well_formed(a, 8)
    np.testing.assert_allclose(a.scores, teacher_forced_sums(toy.step_fn, init, a), rtol=1e-5)
    jitted = jax.jit(functools.partial(sample_search, toy.step_fn, max_len=8, num_samples=4,
                                       temperature=1.3, top_k=4))(init, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(jitted.sequences, a.sequences)


def test_sampling_distribution_follows_temperature():
    toy = Toy(5, seed=12)
    init, temperature, n = toy.init_state([0]), 0.5, 4000
    beams = sample_search(toy.step_fn, init, jax.random.PRNGKey(3), max_len=1,
                          temperature=temperature, num_samples=n)
    freq = np.bincount(np.asarray(beams.sequences)[0, :, 0], minlength=5) / n
    logp, _ = toy.np_step(0, BOS)
    p = np.exp(logp / temperature) * np.isin(np.arange(5), [PAD, BOS], invert=True)  # never drawn
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


# --------------------------------------------------------------------------------------------
# PAD and BOS are never generated, whatever the model prefers
# --------------------------------------------------------------------------------------------

SPECIAL_BIAS = [6.0, 4.0, 0.0, 2.0, -1.0]  # prefers PAD, then BOS, then word 3, then EOS, word 4


def special_toy():
    return Toy(5, seed=13, scale=1.0, bias=SPECIAL_BIAS)


@pytest.mark.parametrize("beam_size,n_best", [(1, 1), (2, 2), (3, 2), (4, 3), (5**4, 6)])
def test_beam_never_emits_pad_or_bos(beam_size, n_best):
    toy, max_len = special_toy(), 4
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=beam_size, max_len=max_len,
                        n_best=n_best)
    check_well_formed(beams, max_len)
    for b, h0 in enumerate(H0):
        got = as_list(beams, b)
        assert_same_ranking(got, reference_beam(toy, h0, beam_size, max_len, n_best, 0.6, "bound"))
        if beam_size == 5**max_len:  # wide: exact over every sequence without PAD / BOS
            assert_same_ranking(got, brute_force(toy, h0, max_len, 0.6)[:n_best])


def test_greedy_never_emits_pad_or_bos():
    toy, max_len = special_toy(), 6
    init = toy.init_state(H0)
    greedy = greedy_search(toy.step_fn, init, max_len=max_len)
    check_well_formed(greedy, max_len)
    for b, h0 in enumerate(H0):
        assert as_list(greedy, b)[0][1] == np_greedy(toy, h0, max_len)
    np.testing.assert_allclose(np.asarray(greedy.scores), teacher_forced_sums(toy.step_fn, init, greedy),
                               rtol=1e-5)
    beam1 = beam_search(toy.step_fn, init, beam_size=1, max_len=max_len, alpha=0.0)
    for got, want in zip(beam1, greedy):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("temperature,top_k", [(0.3, 0), (3.0, 0), (3.0, 2)])
def test_sampling_never_emits_pad_or_bos(temperature, top_k):
    toy, max_len, n = special_toy(), 5, 2000
    init = toy.init_state([0])
    beams = sample_search(toy.step_fn, init, jax.random.PRNGKey(4), max_len=max_len,
                          temperature=temperature, top_k=top_k, num_samples=n)
    check_well_formed(beams, max_len)
    np.testing.assert_allclose(beams.scores, teacher_forced_sums(toy.step_fn, init, beams), rtol=1e-5)
    # First token ~ softmax(logp / temperature) over the allowed tokens' top_k.
    logp, _ = toy.np_step(0, BOS)
    p = np.exp(logp / temperature) * np.isin(np.arange(5), [PAD, BOS], invert=True)
    if top_k:
        p[np.argsort(p)[:-top_k]] = 0.0
    freq = np.bincount(np.asarray(beams.sequences)[0, :, 0], minlength=5) / n
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.05)


def test_pad_id_equal_to_bos_id():
    toy, max_len = special_toy(), 6  # token 1 is an ordinary word here, the model's favourite
    init = toy.init_state(H0)
    greedy = greedy_search(toy.step_fn, init, max_len=max_len, bos_id=PAD, pad_id=PAD)
    beam1 = beam_search(toy.step_fn, init, beam_size=1, max_len=max_len, alpha=0.0, bos_id=PAD,
                        pad_id=PAD)
    for got, want in zip(beam1, greedy):
        np.testing.assert_array_equal(got, want)
    for b, h0 in enumerate(H0):
        seq = as_list(greedy, b)[0][1]
        assert seq == np_greedy(toy, h0, max_len, bos=PAD, pad=PAD) and 1 in seq and PAD not in seq


def test_vocab_of_special_tokens_only():
    logp = jax.nn.log_softmax(jnp.array([3.0, 2.0, 0.0]))  # PAD, BOS, EOS: only EOS is allowed

    def step_fn(tokens, state):
        return jnp.broadcast_to(logp, tokens.shape + (3,)), state

    init, key = jnp.zeros((2, 1)), jax.random.PRNGKey(0)
    beams = beam_search(step_fn, init, beam_size=2, max_len=3, alpha=0.0)
    np.testing.assert_array_equal(beams.lengths, [[1, 0]] * 2)
    np.testing.assert_array_equal(beams.sequences, [[[EOS, PAD, PAD], [PAD] * 3]] * 2)
    np.testing.assert_allclose(beams.scores, [[logp[EOS], NEG_INF]] * 2)
    for result in (greedy_search(step_fn, init, max_len=3),
                   sample_search(step_fn, init, key, max_len=3, num_samples=3)):
        np.testing.assert_array_equal(result.lengths, 1)
        np.testing.assert_array_equal(result.sequences[..., 0], EOS)
        np.testing.assert_allclose(result.scores, logp[EOS], rtol=1e-6)
    # min_len forbids the only allowed token at step 1: no hypothesis exists, every slot is empty.
    empty = greedy_search(step_fn, init, max_len=3, min_len=2)
    np.testing.assert_array_equal(empty.lengths, 0)
    np.testing.assert_array_equal(empty.scores, NEG_INF)


# --------------------------------------------------------------------------------------------
# Edge cases and errors
# --------------------------------------------------------------------------------------------


def test_empty_slots_and_minus_inf_from_model():
    def step_fn(tokens, state):  # a model that masks PAD and BOS with -inf
        logits = jnp.array([-jnp.inf, -jnp.inf, 0.0, 1.0])
        return jnp.broadcast_to(jax.nn.log_softmax(logits), tokens.shape + (4,)), state

    beams = beam_search(step_fn, jnp.zeros((2, 1)), beam_size=4, max_len=1, alpha=0.0)
    assert np.all(np.isfinite(np.asarray(beams.scores)))
    np.testing.assert_array_equal(beams.lengths, [[1, 1, 0, 0]] * 2)
    np.testing.assert_array_equal(beams.sequences[:, :, 0], [[3, 2, PAD, PAD]] * 2)
    np.testing.assert_array_equal(beams.scores[:, 2:], NEG_INF)


def test_bad_arguments():
    toy = Toy(5)
    init = toy.init_state(H0)
    cases = [
        (dict(beam_size=0, max_len=3), "beam_size"),
        (dict(beam_size=2.0, max_len=3), "beam_size"),
        (dict(beam_size=2, max_len=0), "max_len"),
        (dict(beam_size=2, max_len=3, n_best=3), "n_best must be <= beam_size"),
        (dict(beam_size=2, max_len=3, n_best=0), "n_best"),
        (dict(beam_size=2, max_len=3, alpha=-0.1), "alpha"),
        (dict(beam_size=2, max_len=3, length_penalty="wu"), "length_penalty"),
        (dict(beam_size=2, max_len=3, stop_early=True), "stop_early"),
        (dict(beam_size=2, max_len=3, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(beam_size=2, max_len=3, min_len=-1), "min_len"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            beam_search(toy.step_fn, init, **kwargs)
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(toy.step_fn, init, max_len=0)
    key = jax.random.PRNGKey(0)
    searches = [functools.partial(beam_search, beam_size=2), greedy_search,
                functools.partial(sample_search, rng=key)]
    id_cases = [(dict(eos_id=PAD), "eos_id must differ"), (dict(eos_id=BOS), "eos_id must differ"),
                (dict(pad_id=EOS), "eos_id must differ"), (dict(bos_id=-1), "bos_id must be an integer"),
                (dict(pad_id=0.0), "pad_id must be an integer")]
    for search in searches:
        for ids, message in id_cases:
            with pytest.raises(ValueError, match=message):
                search(toy.step_fn, init, max_len=3, **ids)
    with pytest.raises(ValueError, match="temperature"):
        sample_search(toy.step_fn, init, key, max_len=3, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        sample_search(toy.step_fn, init, key, max_len=3, num_samples=0)
    with pytest.raises(ValueError, match="top_k"):
        sample_search(toy.step_fn, init, key, max_len=3, top_k=-1)
    with pytest.raises(ValueError, match="init_state"):
        beam_search(toy.step_fn, {}, beam_size=2, max_len=3)
    with pytest.raises(ValueError, match=r"\[B, K, V\]"):
        beam_search(lambda tok, s: (jnp.zeros(tok.shape), s), init, beam_size=2, max_len=3)
    with pytest.raises(ValueError, match="pair"):
        beam_search(lambda tok, s: jnp.zeros(tok.shape + (5,)), init, beam_size=2, max_len=3)
    with pytest.raises(ValueError, match="structure"):
        beam_search(lambda tok, s: (jnp.zeros(tok.shape + (5,)), s["h"]), init, beam_size=2, max_len=3)


def constant_step_fn(log_probs):
    """A model whose log-probs are `log_probs` [V] at every step, for every hypothesis."""
    def step_fn(tokens, state):
        return jnp.broadcast_to(jnp.asarray(log_probs), tokens.shape + (len(log_probs),)), state
    return step_fn


def all_three_searches(step_fn, init, max_len, **kwargs):
    """Beam (K = 3), greedy and sampling (tempered below 1, nucleus) results of one step_fn."""
    return [beam_search(step_fn, init, beam_size=3, max_len=max_len, **kwargs),
            greedy_search(step_fn, init, max_len=max_len, **kwargs),
            sample_search(step_fn, init, jax.random.PRNGKey(0), max_len=max_len, num_samples=4,
                          temperature=0.5, top_p=0.9, **kwargs)]


@pytest.mark.parametrize("min_len", [0, 2])
def test_model_without_a_usable_log_prob_still_gives_hypotheses(min_len):
    """Row 0 all NaN, row 1 all -inf: every token the search allows is an extension at NEG_INF."""
    def step_fn(tokens, state):
        rows = jnp.array([np.nan, -np.inf])[:, None, None]  # [batch, 1, 1]
        return jnp.broadcast_to(rows, tokens.shape + (5,)), state

    max_len = 4
    beams, greedy, samples = all_three_searches(step_fn, jnp.zeros((2, 1)), max_len, min_len=min_len)
    for result in (beams, greedy, samples):
        check_well_formed(result, max_len)
        assert np.all(np.asarray(result.lengths) >= max(min_len, 1))
        assert np.all(np.asarray(result.scores) <= NEG_INF)
    np.testing.assert_array_equal(greedy.sequences[:, 0, :2], [[EOS, PAD] if min_len == 0 else [3, EOS]] * 2)


def test_model_without_a_usable_log_prob_in_some_rows_only():
    """From step 2 on, row 0 gets all NaN and row 1 all -inf; row 2 decodes as it would alone."""
    toy, max_len = Toy(5, seed=2), 5

    def step_fn(tokens, state):
        log_probs, state = toy.step_fn(tokens, state)  # [batch, beam, vocab]
        broken = jnp.array([np.nan, -np.inf, 0.0])[:, None, None]  # [batch, 1, 1]
        late = (jnp.arange(3) < 2)[:, None, None] & (state["aux"][..., :1] >= 2)  # [batch, beam, 1]
        return jnp.where(late, broken, log_probs), state

    results = all_three_searches(step_fn, toy.init_state([0, 1, 3]), max_len)
    for result in results:
        check_well_formed(result, max_len)
        assert np.all(np.asarray(result.lengths) >= 1)
    alone = all_three_searches(toy.step_fn, toy.init_state([3]), max_len)[:2]  # beam, greedy
    for result, want in zip(results, alone):
        for got_part, want_part in zip(result, want):
            np.testing.assert_array_equal(got_part[2], want_part[0])


def test_integer_log_probs_and_unfillable_beams_are_refused():
    init, key = jnp.zeros((2, 1)), jax.random.PRNGKey(0)
    integer = constant_step_fn(np.array([-1, -1, -2, -3, -4], np.int32))
    for search in (functools.partial(beam_search, beam_size=2), greedy_search,
                   functools.partial(sample_search, rng=key)):
        with pytest.raises(TypeError, match="step_fn must return floating-point log_probs"):
            search(integer, init, max_len=3)
    vocab5 = constant_step_fn(jax.nn.log_softmax(jnp.arange(5.0)))
    beam_search(vocab5, init, beam_size=5**2, max_len=2)  # every sequence fits: allowed
    with pytest.raises(ValueError, match=r"beam_size=26 .* 5 \*\* max_len = 25"):
        beam_search(vocab5, init, beam_size=5**2 + 1, max_len=2)


# --------------------------------------------------------------------------------------------
# The top-k in chunks (large vocabularies): ops.top_k, tested in tests/test_ops.py
# --------------------------------------------------------------------------------------------


def test_narrow_beam_on_a_large_vocabulary_equals_reference():
    """A vocabulary large enough for the top-k in chunks: same ranking as the literal search."""
    toy = Toy(1024, mod=3, seed=8, eos_bias=4.0, scale=3.0)
    beams = beam_search(toy.step_fn, toy.init_state(H0), beam_size=3, max_len=5, alpha=0.6, n_best=2)
    check_well_formed(beams, 5)
    for b, h0 in enumerate(H0):
        assert_same_ranking(as_list(beams, b), reference_beam(toy, h0, 3, 5, 2, 0.6, "bound"))
