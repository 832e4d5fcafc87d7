"""The encoder's custom-VJP LSTM recurrence (s2s_jax.recurrence.lstm_scan) against plain autodiff.

Reference: the scan it replaced, `plain_scan` (lstm_cell stepped by lax.scan, carry frozen past
each row's length, differentiated by JAX), in float64. Rows of different lengths (one of them
empty), both directions, and the whole encoder (bidirectional, several layers, reversed sources)
with the plain scan patched in; a central finite-difference check on a tiny case.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from s2s_jax import recurrence
from s2s_jax.models import Encoder

LENGTHS = (5, 2, 0, 4)  # S = 5: a full row, padded rows, an empty row


def plain_scan(gates_in, valid, w_h, reverse=False, dtype=jnp.float32):
    """The recurrence as the encoder ran it before lstm_scan: autodiff through every step."""
    def step(carry, xs):
        gates_t, valid_t = xs
        h, c = recurrence.lstm_cell(gates_t, *carry, w_h, dtype)
        keep = valid_t[:, None]
        carry = (jnp.where(keep, h, carry[0]), jnp.where(keep, c, carry[1]))
        return carry, jnp.where(keep, h, 0.0)

    zeros = jnp.zeros(gates_in.shape[1:-1] + (w_h.shape[0],), gates_in.dtype)
    final, outputs = jax.lax.scan(step, (zeros, zeros), (gates_in, valid), reverse=reverse)
    return outputs, final


def inputs(hidden=3, lengths=LENGTHS, seed=0):
    """(gates_in [S, B, 4H], valid [S, B], w_h [H, 4H]) float64, and random cotangent weights."""
    rng = np.random.default_rng(seed)
    steps, batch = max(lengths), len(lengths)
    gates_in = jnp.asarray(rng.normal(size=(steps, batch, 4 * hidden)))
    valid = jnp.arange(steps)[:, None] < jnp.asarray(lengths)[None, :]
    w_h = jnp.asarray(0.5 * rng.normal(size=(hidden, 4 * hidden)))
    weights = [jnp.asarray(rng.normal(size=s)) for s in ((steps, batch, hidden), (batch, hidden), (batch, hidden))]
    return gates_in, valid, w_h, weights


def objective(scan, weights, reverse):
    """A scalar that reads every output and both final states, through `scan`."""
    def f(gates_in, valid, w_h):
        outputs, (h, c) = scan(gates_in, valid, w_h, reverse, jnp.float64)
        return jnp.sum(outputs * weights[0]) + jnp.sum(h * weights[1]) + jnp.sum(c * weights[2])
    return f


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_scan_matches_plain_autodiff_float64(reverse):
    with jax.enable_x64(True):
        gates_in, valid, w_h, weights = inputs()
        ours, plain = (jax.value_and_grad(objective(scan, weights, reverse), argnums=(0, 2))(gates_in, valid, w_h)
                       for scan in (recurrence.lstm_scan, plain_scan))
        out_ours = recurrence.lstm_scan(gates_in, valid, w_h, reverse, jnp.float64)
        out_plain = plain_scan(gates_in, valid, w_h, reverse, jnp.float64)
    for a, b in zip(jax.tree.leaves((ours, out_ours)), jax.tree.leaves((plain, out_plain))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not np.any(ours[1][0][:, 2]), "the empty row's gates get no gradient"


def test_lstm_scan_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        gates_in, valid, w_h, weights = inputs(hidden=2, lengths=(3, 1), seed=1)
        f = objective(recurrence.lstm_scan, weights, True)
        check_grads(lambda g, w: f(g, valid, w), (gates_in, w_h), order=1, modes=["rev"], eps=1e-6)


def test_lstm_scan_float32_matches_plain_autodiff():
    gates_in, valid, w_h, weights = jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype != bool else x, inputs(hidden=8, seed=2))
    def grads(scan):
        return jax.grad(lambda g, w: jnp.sum(scan(g, valid, w)[0] * weights[0]), (0, 1))(gates_in, w_h)

    for a, b in zip(jax.tree.leaves(grads(recurrence.lstm_scan)), jax.tree.leaves(grads(plain_scan))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers,bidirectional,reverse_source", [(1, True, False), (2, True, True), (2, False, False)])
def test_encoder_gradients_match_plain_autodiff(monkeypatch, layers, bidirectional, reverse_source):
    """The whole encoder: parameters' and embeddings' gradients with lstm_scan equal those with the
    plain scan patched in (float64), on padded rows."""
    encoder = Encoder(vocab_size=9, embed_dim=5, hidden=3, num_layers=layers, bidirectional=bidirectional,
                      reverse_source=reverse_source, dtype=jnp.float64)
    src = jnp.asarray([[3, 4, 5, 6, 7], [8, 2, 0, 0, 0], [5, 5, 6, 0, 0]])
    src_len = jnp.asarray([5, 2, 3])
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), encoder.init(jax.random.PRNGKey(0), src, src_len))
        rng = np.random.default_rng(3)
        weight = jnp.asarray(rng.normal(size=(3, 5, encoder.output_dim)))

        def loss(params):
            memory, final = encoder.apply(params, src, src_len)
            return jnp.sum(memory * weight) + jnp.sum(final ** 2)

        ours = jax.grad(loss)(params)
        monkeypatch.setattr(recurrence, "lstm_scan", plain_scan)
        plain = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
