"""Numeric pieces shared by the model (`models`), the fused output layer (`output_layer`) and the
search (`decoding`): the matmul in a compute dtype, the token ids that are never targets, and an
exact top-k / argmax over large vocabularies."""
from typing import Any

import jax
import jax.numpy as jnp

from s2s_jax import BOS_ID, PAD_ID

# Ids that are never a target token: label smoothing puts no mass on them.
NEVER_TARGETS = (PAD_ID, BOS_ID)


def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w computed in `dtype` (e.g. bfloat16 on accelerators), result in float32 (float64 if
    `dtype` is float64)."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype),
                      preferred_element_type=jnp.promote_types(dtype, jnp.float32))


def chunk_width(n: int, k: int) -> int:
    """The chunk width of `top_k` over n entries (a divisor of n in [32, 128], nearest 64), or 0
    when a plain top-k is as good (n too small for k, or no such divisor)."""
    widths = sorted((w for w in range(32, 129) if n % w == 0), key=lambda w: abs(w - 64))
    return widths[0] if widths and n // widths[0] > 4 * k else 0


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` of x [..., n] (no NaN) on its last axis, exactly (ties: lower index first).

    For large n, in two cheap passes instead of one partial sort: the k largest entries lie in the
    k chunks (of `chunk_width` entries) with the largest maxima, ties to the lower chunk, so a top-k
    of the chunk maxima picks those chunks and a top-k over their entries, kept in index order,
    picks the k entries (XLA:CPU's top-k over [64, 5, 8000] costs ~6x the two passes)."""
    n, width = x.shape[-1], chunk_width(x.shape[-1], k)
    if not width:
        return jax.lax.top_k(x, k)
    blocks = x.reshape(x.shape[:-1] + (n // width, width))                 # [..., chunks, width]
    _, chunks = jax.lax.top_k(jnp.max(blocks, axis=-1), k)                 # [..., k]
    chunks = jnp.sort(chunks, axis=-1)  # in index order, so equal entries keep their order
    entries = jnp.take_along_axis(blocks, chunks[..., None], axis=-2)      # [..., k, width]
    values, position = jax.lax.top_k(entries.reshape(x.shape[:-1] + (k * width,)), k)  # [..., k]
    return values, jnp.take_along_axis(chunks, position // width, axis=-1) * width + position % width


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first maximum) of x without NaN, in `top_k`'s two cheap passes:
    XLA:CPU's argmax, one reduction over (value, index) pairs, costs 9-20x as much over [64 or
    512, 8000] logits. With NaN: some index in range."""
    return top_k(x, 1)[1][..., 0]
