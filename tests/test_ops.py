"""ops: the exact top-k in chunks and the argmax built on it, against jax.lax.top_k and
jnp.argmax (ties, masked rows, vocabularies without a chunk width)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import decoding, ops
from s2s_jax.decoding import NEG_INF


@pytest.mark.parametrize("n,k", [(8000, 1), (8000, 5), (4096, 8), (4000, 5), (4099, 3), (640, 5)])
def test_top_k_in_chunks_equals_lax_top_k(n, k):
    """Same values and indices as jax.lax.top_k, ties (lower index first) included: many equal
    entries (few distinct values), distinct ones, and _EMPTY / NEG_INF blocks."""
    rng = np.random.default_rng(n + k)
    ties = rng.integers(0, 4, size=(3, 2, n)).astype(np.float32)
    distinct = rng.normal(size=(3, 2, n)).astype(np.float32)
    masked = np.where(rng.random((3, 2, n)) < 0.98, decoding._EMPTY, distinct).astype(np.float32)
    masked[0, 0] = decoding._EMPTY  # a row of nothing but empty slots
    masked[1, 1, : n // 2] = NEG_INF
    top_k = jax.jit(ops.top_k, static_argnums=1)
    for x in (ties, distinct, masked):
        want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
        got_values, got_ids = top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
        np.testing.assert_array_equal(np.asarray(got_values), np.asarray(want_values))


def test_chunk_width():
    assert ops.chunk_width(8000, 5) == 64
    assert ops.chunk_width(4000, 5) in (50, 80)
    assert ops.chunk_width(4099, 3) == 0  # prime: a plain top-k
    assert ops.chunk_width(640, 5) == 0   # 10 chunks: too few for k = 5


@pytest.mark.parametrize("n", [8000, 4000, 4099, 640, 7])
def test_argmax_equals_jnp_argmax(n):
    """The first maximum, as jnp.argmax: rows of many ties, distinct values, -inf and NEG_INF
    stretches, a row of one value; with NaN only an index in range is promised."""
    rng = np.random.default_rng(n)
    ties = rng.integers(0, 3, size=(4, 64, n)).astype(np.float32)
    ties[0, 0] = 1.0                                   # every entry a maximum: index 0
    ties[0, 1, n // 2:] = 9.0                          # the maximum starts halfway
    distinct = rng.normal(size=(4, 64, n)).astype(np.float32)
    distinct[1, :, : n - 1] = -np.inf                  # only the last entry is finite
    distinct[2, :, : n // 2] = NEG_INF
    argmax = jax.jit(ops.argmax)
    for x in (ties, distinct):
        np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), np.asarray(jnp.argmax(x, -1)))
    nan = distinct.copy()
    nan[0, :, 3] = np.nan
    nan[3, 5] = np.nan
    got = np.asarray(argmax(jnp.asarray(nan)))
    assert got.min() >= 0 and got.max() < n
    np.testing.assert_array_equal(got[1:3], np.argmax(distinct[1:3], -1))  # rows without NaN
