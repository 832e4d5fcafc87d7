"""Fused, chunked output layer: projection, log-softmax and cross-entropy without [N, V] logits
(and `argmax`, the projection's argmax per token, likewise chunked).

`cross_entropy(vectors, w, b, targets, label_smoothing, chunk, dtype)` returns what
`steps.cross_entropy(matmul(vectors, w) + b, targets, label_smoothing)` returns, (nll_sum,
smoothed_sum, token_count), with gradients w.r.t. vectors, w and b equal to autodiff of that plain
version (to float tolerance). A `lax.scan` runs over chunks of `chunk` tokens, so only [chunk, V]
logits exist at a time, in the forward pass and in the backward pass.

The backward pass costs no recomputation. With p = softmax(z) of a token with target t, the
gradient of its losses w.r.t. its logits z is, for cotangents g_nll of nll_sum and g_s of
smoothed_sum,

    dz = (g_nll + g_s) (p - onehot(t)) + eps g_s (onehot(t) - u)

where u is uniform (1 / (V - 2)) over the ids that can be targets. Only the first term needs
[N, V] work: the forward pass (which sees p chunk by chunk anyway) forms q = p - onehot(t) in
float32 and stores q @ w^T [N, H], x^T @ q [H, V] and the column sums of q [V]; the backward pass
scales them by the cotangent and adds the second term, which is gathers, scatters and rank-one
products. Three big matmuls in all, as for the unfused layer. q, not p, goes into the (maybe
bfloat16) matmuls: rounding p(target) ~ 0.999 to 1 before subtracting the one-hot would lose
the gradient of confident tokens.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from s2s_jax import PAD_ID, ops
from s2s_jax.ops import NEVER_TARGETS, matmul


def cross_entropy(vectors: jax.Array, w: jax.Array, b: jax.Array, targets: jax.Array,
                  label_smoothing: float = 0.0, chunk: int = 512, dtype: Any = jnp.float32):
    """vectors [..., H], w [H, V], b [V], targets [...] -> (nll_sum, smoothed_sum, token_count).

    PAD targets count for nothing. `chunk` (static) tokens per step of the scan; `dtype` is the
    matmul compute dtype (as `ops.matmul`).
    """
    x = _chunks(vectors.reshape(-1, vectors.shape[-1]), chunk, 0)              # [C, chunk, H]
    y = _chunks(targets.reshape(-1), chunk, PAD_ID)                          # [C, chunk]
    return _fused(float(label_smoothing), jnp.dtype(dtype), x, w, b, y)


def argmax(vectors: jax.Array, w: jax.Array, b: jax.Array, chunk: int = 512, dtype: Any = jnp.float32,
           needed: jax.Array | None = None) -> jax.Array:
    """vectors [..., H] -> argmax of (vectors @ w + b) [...] (int32), `chunk` tokens at a time, so
    only [chunk, V] logits exist: parallel scheduled sampling's prediction pass.

    `needed` [...] bool: only these tokens are projected (the others read 0). They are gathered to
    the front, and the loop stops after the last chunk that holds one of them, so the cost follows
    their count, not the batch's size."""
    rows = vectors.reshape(-1, vectors.shape[-1])                               # [N, H]
    if needed is None:
        needed = jnp.ones(rows.shape[0], bool)
    order = jnp.argsort(~needed.reshape(-1), stable=True)                     # needed rows first
    x = _chunks(rows[order], chunk, 0)                                          # [C, c, H]
    chunks_needed = -(-jnp.sum(needed) // x.shape[1])
    best = jax.lax.fori_loop(0, chunks_needed,
                             lambda i, best: best.at[i].set(ops.argmax(matmul(x[i], w, dtype) + b)),
                             jnp.zeros(x.shape[:2], jnp.int32))                 # [C, c]
    unsorted = jnp.zeros(rows.shape[0], jnp.int32).at[order].set(best.reshape(-1)[:rows.shape[0]])
    return jnp.where(needed.reshape(-1), unsorted, 0).reshape(vectors.shape[:-1])


def _chunks(rows: jax.Array, chunk: int, fill) -> jax.Array:
    """rows [N, ...] -> [C, min(chunk, N), ...], the last chunk padded with `fill`."""
    size = min(chunk, rows.shape[0])
    pad = [(0, -rows.shape[0] % size)] + [(0, 0)] * (rows.ndim - 1)
    return jnp.pad(rows, pad, constant_values=fill).reshape(-1, size, *rows.shape[1:])


def _chunk_losses(x, w, b, y, label_smoothing, dtype):
    """One chunk: x [c, H], y [c] -> summed (nll, smoothed), mask [c], probabilities p [c, V]."""
    logits = matmul(x, w, dtype) + b                                      # [c, V]
    mask = (y != PAD_ID).astype(logits.dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)                               # [c]
    nll = lse - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    smoothed = nll
    if label_smoothing > 0:
        count = logits.shape[-1] - len(NEVER_TARGETS)
        never = sum(logits[:, i] for i in NEVER_TARGETS)
        uniform = lse - (jnp.sum(logits, axis=-1) - never) / count        # -mean log p over targets
        smoothed = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    p = jnp.exp(logits - lse[:, None])
    return jnp.sum(nll * mask), jnp.sum(smoothed * mask), mask, p


def _gold_residual(p, y, mask):
    """p [c, V] float32, y [c], mask [c] -> (p - onehot(y)) * mask [c, V], before any rounding."""
    return p.at[jnp.arange(y.shape[0]), y].add(-1.0) * mask[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(label_smoothing, dtype, x, w, b, y):
    """x [C, chunk, H], y [C, chunk] -> (nll_sum, smoothed_sum, token_count)."""
    def step(sums, xy):
        nll, smoothed, _, _ = _chunk_losses(xy[0], w, b, xy[1], label_smoothing, dtype)
        return (sums[0] + nll, sums[1] + smoothed), None

    zero = jnp.zeros((), jnp.promote_types(dtype, jnp.float32))
    (nll, smoothed), _ = jax.lax.scan(step, (zero, zero), (x, y))
    return nll, smoothed, jnp.sum(y != PAD_ID).astype(zero.dtype)


def _fused_fwd(label_smoothing, dtype, x, w, b, y):
    """The losses, and the q terms of the gradient (module docstring), chunk by chunk."""
    def step(carry, xy):
        nll_sum, smoothed_sum, q_w, q_b = carry
        x_c, y_c = xy
        nll, smoothed, mask, p = _chunk_losses(x_c, w, b, y_c, label_smoothing, dtype)
        q = _gold_residual(p, y_c, mask)                                  # [c, V], PAD rows zero
        q_x = matmul(q, w.T, dtype)                                       # [c, H]
        carry = (nll_sum + nll, smoothed_sum + smoothed, q_w + matmul(x_c.T, q, dtype), q_b + q.sum(0))
        return carry, q_x

    out_dtype = jnp.promote_types(dtype, jnp.float32)
    zero = jnp.zeros((), out_dtype)
    init = (zero, zero, jnp.zeros(w.shape, out_dtype), jnp.zeros(b.shape, out_dtype))
    (nll, smoothed, q_w, q_b), q_x = jax.lax.scan(step, init, (x, y))
    tokens = jnp.sum(y != PAD_ID).astype(out_dtype)
    return (nll, smoothed, tokens), (x, w, b, y, q_x, q_w, q_b)


def _fused_bwd(label_smoothing, dtype, residuals, cotangents):
    x, w, b, y, q_x, q_w, q_b = residuals
    g_nll, g_smoothed, _ = cotangents                                     # token_count: constant
    g_q = g_nll + g_smoothed                       # dz = g_q q + g_uniform (onehot - u)
    g_uniform = label_smoothing * g_smoothed
    vocab = w.shape[1]
    mask = (y != PAD_ID).astype(q_x.dtype)[..., None]                     # [C, chunk, 1]
    u = jnp.ones((vocab,), q_x.dtype).at[jnp.array(NEVER_TARGETS)].set(0.0) / (vocab - len(NEVER_TARGETS))
    x_masked = (x * mask).reshape(-1, x.shape[-1])                        # [N, H]
    flat_y = y.reshape(-1)                                                # [N]
    dx = g_q * q_x + g_uniform * mask * (w.T[y] - w @ u)                  # [C, chunk, H]
    dw = g_q * q_w + g_uniform * (jnp.zeros_like(q_w).at[:, flat_y].add(x_masked.T)
                                  - jnp.outer(x_masked.sum(0), u))        # [H, V]
    gold_counts = jnp.zeros_like(q_b).at[flat_y].add(mask.reshape(-1))   # [V]
    db = g_q * q_b + g_uniform * (gold_counts - mask.sum() * u)
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
