"""Tests for s2s_jax.attention against an independent float64 numpy reference.

The reference implements each score from its textbook formula (Luong dot / general / scaled dot,
Bahdanau concat), a softmax over the real source positions only (padding gets weight exactly 0,
no masking constant involved) and the weighted sum of the memory values.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import attention as attn

B, Q, S, HD, HE, A = 3, 2, 6, 5, 4, 7  # batch, queries, source, query dim, memory dim, concat dim
LENGTHS = np.array([6, 3, 1])           # one full row, one half padded, one with a single token


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Compare float32 maths with float64 references: no TF32 / bf16-pass matmuls on GPUs."""
    with jax.default_matmul_precision("highest"):
        yield


def dims(score):
    """(query_dim, memory_dim): dot products need equal sizes."""
    return (HE, HE) if score in ("dot", "scaled_dot") else (HD, HE)


def init_params(score, seed=0):
    qd, md = dims(score)
    params = attn.AttentionParams(score, qd, md, A).init(jax.random.PRNGKey(seed)).get("params", {})
    if score == "concat":  # a nonzero bias, so that a bias that is never added would be caught
        params = dict(params, bias=jnp.asarray(np.random.default_rng(seed).normal(size=A), jnp.float32))
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def random_inputs(score, seed=0, lengths=LENGTHS, length=S):
    rng = np.random.default_rng(seed)
    qd, md = dims(score)
    queries = rng.normal(size=(len(lengths), Q, qd))
    values = rng.normal(size=(len(lengths), length, md))
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    return queries, values, mask


def ref_scores(score, p, q, v):
    """[B, Q, S] from the formulas, float64."""
    if score == "dot":
        return np.einsum("bqh,bsh->bqs", q, v)
    if score == "scaled_dot":
        return np.einsum("bqh,bsh->bqs", q, v) / np.sqrt(q.shape[-1])
    if score == "general":  # q^T W h_s with W [memory_dim, query_dim]
        return np.einsum("bqh,bsm,mh->bqs", q, v, p["w"])
    if score == "concat":   # v^T tanh(W_q q + W_m h_s + b)
        out = np.zeros(q.shape[:2] + v.shape[1:2])
        for b in range(q.shape[0]):
            for i in range(q.shape[1]):
                for s in range(v.shape[1]):
                    hidden = np.tanh(q[b, i] @ p["w_query"] + v[b, s] @ p["w_memory"] + p["bias"])
                    out[b, i, s] = hidden @ p["v"]
        return out
    raise AssertionError(score)


def ref_attend(score, p, q, v, mask):
    """(context, weights): softmax over real positions only, exact zeros elsewhere."""
    e = ref_scores(score, p, q, v)
    weights = np.zeros_like(e)
    for b in range(e.shape[0]):
        real = np.flatnonzero(mask[b])
        for i in range(e.shape[1]):
            x = e[b, i, real]
            x = np.exp(x - x.max())
            weights[b, i, real] = x / x.sum()
    return np.einsum("bqs,bsh->bqh", weights, v), weights


def run_attend(score, p, q, v, mask, dtype=jnp.float32):
    p = {k: jnp.asarray(x, dtype) for k, x in p.items()}
    values = jnp.asarray(v, dtype)
    memory = attn.Memory(values, attn.project_keys(score, p, values), jnp.asarray(mask))
    return attn.attend(score, p, jnp.asarray(q, dtype), memory)


@pytest.mark.parametrize("score", attn.SCORES)
def test_attend_matches_numpy_reference(score):
    p = init_params(score)
    q, v, mask = random_inputs(score, seed=1)
    context, weights = run_attend(score, p, q, v, mask)
    ref_context, ref_weights = ref_attend(score, p, q, v, mask)
    assert context.shape == (B, Q, HE) and weights.shape == (B, Q, S)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(context), ref_context, rtol=1e-5, atol=1e-5)
    # The unnormalised scores, too (the part before the mask).
    keys = attn.project_keys(score, {k: jnp.asarray(x, jnp.float32) for k, x in p.items()},
                             jnp.asarray(v, jnp.float32))
    e = attn.scores(score, {k: jnp.asarray(x, jnp.float32) for k, x in p.items()},
                    jnp.asarray(q, jnp.float32), keys)
    np.testing.assert_allclose(np.asarray(e), ref_scores(score, p, q, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", attn.SCORES)
def test_weights_sum_to_one_on_real_positions_and_are_zero_on_padding(score):
    p = init_params(score)
    q, v, mask = random_inputs(score, seed=2)
    q = q * 3.0  # sharper distributions
    _, weights = run_attend(score, p, q, v, mask)
    weights = np.asarray(weights)
    real = np.broadcast_to(mask[:, None, :], weights.shape)
    np.testing.assert_allclose((weights * real).sum(-1), 1.0, rtol=1e-6)
    assert np.all(weights[~real] == 0.0), "padding must get weight exactly 0"
    assert np.all(weights[real] > 0.0)
    # A row of length 1 puts all its weight on that position.
    np.testing.assert_array_equal(weights[2, :, 0], 1.0)


@pytest.mark.parametrize("score", attn.SCORES)
def test_extra_padding_changes_nothing_at_real_positions(score):
    p = init_params(score)
    q, v, mask = random_inputs(score, seed=3)
    context, weights = run_attend(score, p, q, v, mask)
    extra = 5
    garbage = np.random.default_rng(4).normal(size=(B, extra, v.shape[-1])) * 100.0
    v_long = np.concatenate([v, garbage], axis=1)          # padding holds large garbage values
    mask_long = np.concatenate([mask, np.zeros((B, extra), bool)], axis=1)
    context_long, weights_long = run_attend(score, p, q, v_long, mask_long)
    np.testing.assert_allclose(np.asarray(context_long), np.asarray(context), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights_long)[:, :, :S], np.asarray(weights), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(weights_long)[:, :, S:] == 0.0)


@pytest.mark.parametrize("score", attn.SCORES)
def test_fully_padded_row_stays_finite(score):
    p = init_params(score)
    lengths = np.array([4, 0])
    q, v, mask = random_inputs(score, seed=5, lengths=lengths)
    context, weights = run_attend(score, p, q, v, mask)
    assert np.all(np.isfinite(np.asarray(context))) and np.all(np.isfinite(np.asarray(weights)))
    # The real row is unaffected by its fully padded neighbour.
    ref_context, ref_weights = ref_attend(score, p, q[:1], v[:1], mask[:1])
    np.testing.assert_allclose(np.asarray(weights)[:1], ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(context)[:1], ref_context, rtol=1e-5, atol=1e-5)

    # Gradients through the fully padded row are finite too (no NaN from an all-masked softmax).
    pj = {k: jnp.asarray(x, jnp.float32) for k, x in p.items()}

    def loss(qj, vj):
        memory = attn.Memory(vj, attn.project_keys(score, pj, vj), jnp.asarray(mask))
        context, weights = attn.attend(score, pj, qj, memory)
        return jnp.sum(context ** 2) + jnp.sum(weights ** 2)

    gq, gv = jax.grad(loss, argnums=(0, 1))(jnp.asarray(q, jnp.float32), jnp.asarray(v, jnp.float32))
    assert np.all(np.isfinite(np.asarray(gq))) and np.all(np.isfinite(np.asarray(gv)))


def central_differences(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("score", attn.SCORES)
def test_attend_gradients_match_finite_differences_float64(score):
    p = init_params(score)
    q, v, mask = random_inputs(score, seed=6, lengths=np.array([5, 2]), length=5)
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        pj = {k: jnp.asarray(x, jnp.float64) for k, x in p.items()}
        mask_j = jnp.asarray(mask)
        r_context = jnp.asarray(rng.normal(size=(2, Q, v.shape[-1])))
        r_weights = jnp.asarray(rng.normal(size=(2, Q, v.shape[1])))

        @jax.jit
        def loss(qj, vj):
            memory = attn.Memory(vj, attn.project_keys(score, pj, vj), mask_j)
            context, weights = attn.attend(score, pj, qj, memory)
            return jnp.sum(context * r_context) + jnp.sum(weights * r_weights)

        qj, vj = jnp.asarray(q, jnp.float64), jnp.asarray(v, jnp.float64)
        assert loss(qj, vj).dtype == jnp.float64
        gq, gv = jax.grad(loss, argnums=(0, 1))(qj, vj)
        fd_q = central_differences(lambda x: float(loss(jnp.asarray(x), vj)), q)
        fd_v = central_differences(lambda x: float(loss(qj, jnp.asarray(x))), v)
    np.testing.assert_allclose(np.asarray(gq), fd_q, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gv), fd_v, rtol=1e-6, atol=1e-8)
    # Values at padding positions do not influence anything.
    assert np.all(np.asarray(gv)[1, 2:] == 0.0)


def test_source_mask():
    mask = np.asarray(attn.source_mask(jnp.array([3, 0, 5]), 5))
    expected = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_unknown_score_raises():
    with pytest.raises(ValueError, match="unknown attention score"):
        attn.project_keys("cosine", {}, jnp.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="unknown attention score"):
        attn.AttentionParams("cosine", 3, 3, 3).init(jax.random.PRNGKey(0))
