"""The encoder's LSTM recurrence as one `lax.scan` with its own backward pass (issue 22 item 2).

`lstm_cell` is the one LSTM step of the package (gate order i, f, g, o).
`lstm_scan(gates_in, valid, w_h, reverse, dtype)` returns what a plain scan of `lstm_cell` with
a frozen carry past each row's length returns, and its gradients equal plain autodiff's up to the
order of float sums. What it saves: autodiff adds the recurrent weight's gradient h_{t-1}^T dgates_t
into a carry at every step of the backward scan ([B, H] x [B, 4H] matmuls, one per step); here the
backward scan produces only the gate cotangents dgates [S, B, 4H] and carries (dh, dc), and
dW_h = h_prev^T dgates is one [H, S*B] x [S*B, 4H] matmul after it. The input projection is
hoisted out of the scan by the caller, so d(gates_in) is dgates itself.

The forward scan keeps what the backward needs: each step's previous (h, c) and its gate
activations (i, f, g, o after their sigmoid / tanh) and tanh(c).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from s2s_jax.ops import matmul


def lstm_cell(gates_in: jax.Array, h: jax.Array, c: jax.Array, w_h: jax.Array, dtype: Any):
    """One LSTM step (the decoder's, differentiated by autodiff); `gates_in` [..., 4H] already
    holds W_i x + b. Returns (h, c) [..., H]."""
    h, c, _, _ = _cell(gates_in, h, c, w_h, dtype)
    return h, c


def _cell(gates_in, h, c, w_h, dtype):
    """One LSTM step: (h_new, c_new [..., H], activations [..., 4H], tanh(c_new) [..., H])."""
    gates = gates_in + matmul(h, w_h, dtype)                              # [..., 4H]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    return o * tanh_c, c_new, jnp.concatenate([i, f, g, o], -1), tanh_c


def _forward(gates_in, valid, w_h, reverse, dtype):
    """The scan: outputs [S, B, H] (zero past each length), final (h, c) [B, H], residuals."""
    def step(carry, xs):
        gates_t, valid_t = xs                                             # [B, 4H], [B]
        h, c = carry
        h_new, c_new, acts, tanh_c = _cell(gates_t, h, c, w_h, dtype)
        keep = valid_t[:, None]
        carry = (jnp.where(keep, h_new, h), jnp.where(keep, c_new, c))
        return carry, (jnp.where(keep, h_new, 0.0), (h, c, acts, tanh_c))

    zeros = jnp.zeros(gates_in.shape[1:-1] + (w_h.shape[0],), gates_in.dtype)  # [B, H]
    final, (outputs, saved) = jax.lax.scan(step, (zeros, zeros), (gates_in, valid), reverse=reverse)
    return outputs, final, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lstm_scan(gates_in: jax.Array, valid: jax.Array, w_h: jax.Array, reverse: bool = False,
              dtype: Any = jnp.float32):
    """gates_in [S, B, 4H] (W_i x + b, time-major), valid [S, B] bool, w_h [H, 4H] -> (outputs
    [S, B, H], zero where not valid; final (h, c) [B, H], the carry at each row's last valid step).
    The carry starts at zeros and stays unchanged over invalid steps; `reverse` scans from S-1 down
    to 0. `reverse` and `dtype` (the matmul compute dtype, `ops.matmul`) are static."""
    outputs, final, _ = _forward(gates_in, valid, w_h, reverse, dtype)
    return outputs, final


def _lstm_scan_fwd(gates_in, valid, w_h, reverse, dtype):
    outputs, final, saved = _forward(gates_in, valid, w_h, reverse, dtype)
    return (outputs, final), (valid, w_h, saved)


def _cell_backward(dh_new, dc_new, c, acts, tanh_c):
    """Cotangents of one step's (h_new, c_new) [B, H] -> (dgates [B, 4H], the cell's share of dc)."""
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    dc = dc_new + dh_new * o * (1.0 - tanh_c * tanh_c)
    dgates = jnp.concatenate([dc * g * i * (1.0 - i), dc * c * f * (1.0 - f),
                              dc * i * (1.0 - g * g), dh_new * tanh_c * o * (1.0 - o)], -1)
    return dgates, dc * f


def _lstm_scan_bwd(reverse, dtype, residuals, cotangents):
    """Backward scan over the steps in the opposite order: only dgates [S, B, 4H] comes out; then
    dW_h = one einsum over all steps."""
    valid, w_h, (h_prev, c_prev, acts, tanh_c) = residuals
    d_outputs, (dh_final, dc_final) = cotangents

    def step(carry, xs):
        dh, dc = carry                                                    # of this step's carry out
        d_out, valid_t, c, acts_t, tanh_t = xs
        keep = valid_t[:, None]
        dgates, dc_cell = _cell_backward(jnp.where(keep, dh + d_out, 0.0), jnp.where(keep, dc, 0.0),
                                         c, acts_t, tanh_t)
        dh_prev = jnp.where(keep, matmul(dgates, w_h.T, dtype), dh)       # [B, H]
        return (dh_prev, jnp.where(keep, dc_cell, dc)), dgates

    xs = (d_outputs, valid, c_prev, acts, tanh_c)
    _, dgates = jax.lax.scan(step, (dh_final, dc_final), xs, reverse=not reverse)  # [S, B, 4H]
    dw_h = jnp.einsum("sbh,sbg->hg", h_prev.astype(dtype), dgates.astype(dtype),
                      preferred_element_type=jnp.promote_types(dtype, jnp.float32))  # [H, 4H]
    return dgates, None, dw_h.astype(w_h.dtype)


lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)
