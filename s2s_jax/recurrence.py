"""The encoder's LSTM recurrence as one `lax.scan` with its own backward pass (issue 22 item 2).

`lstm_cell` / `lstm_update` are the one LSTM step of the package (gate order i, f, g, o).
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
    return lstm_update(gates_in + matmul(h, w_h, dtype), c)


def lstm_update(gates: jax.Array, c: jax.Array):
    """The LSTM's update from all its gate pre-activations [..., 4H] and cell c [..., H] -> (h, c)."""
    h, c, _, _ = _activate(gates, c)
    return h, c


def _activate(gates, c):
    """Gate pre-activations [..., 4H], c [..., H] -> (h_new, c_new [..., H], activations [..., 4H],
    tanh(c_new) [..., H])."""
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
        h_new, c_new, acts, tanh_c = _activate(gates_t + matmul(h, w_h, dtype), c)  # [B, H], .., [B, 4H]
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


# ----------------------------------------------------------------------------- hoisted weight gradients
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_hoisted(step, big: dict, rest, consts, carry, xs):
    """`lax.scan` of `step` over xs (leading axis: time) whose big weights' gradients are one einsum
    each after the backward scan instead of a [B, in] x [B, out] matmul added up at every step.

    step(big, rest, consts, carry, x_t, probes) -> (carry, y_t, sites): `big` {name: [in, out]};
    for each name, `sites[name]` [..., in] is the input of the step's one matmul with big[name],
    and when `probes` is not None, probes[name] [..., out] (zeros) is added to that matmul's
    output. `rest`: the other differentiable inputs (small weights, memory); `consts`: inputs with
    no gradient (masks). Returns (final carry, ys) as lax.scan. Backward: the forward scan keeps
    each step's `jax.vjp` (big held constant) and its sites; the backward scan runs the stored
    vjps (the probes' cotangents are the matmul outputs' cotangents dy_t) and
    d big[name] = sum_t sites_t^T dy_t, one einsum over all steps.
    """
    def body(carry, x_t):
        carry, y_t, _ = step(big, rest, consts, carry, x_t, None)
        return carry, y_t
    return jax.lax.scan(body, carry, xs)


def _scan_hoisted_fwd(step, big, rest, consts, carry, xs):
    x0 = jax.tree.map(lambda x: x[0], xs)
    sites = jax.eval_shape(lambda: step(big, rest, consts, carry, x0, None)[2])
    probes = {name: jnp.zeros(site.shape[:-1] + big[name].shape[-1:], site.dtype) for name, site in sites.items()}
    invariant = jax.tree.leaves((big, rest, consts))
    layout = []  # the pullback's structure, found while the body is traced

    def body(carry, x_t):
        def f(rest, carry, x_t, probes):
            carry, y_t, sites = step(big, rest, consts, carry, x_t, probes)
            return (carry, y_t), sites
        (carry, y_t), pullback, sites = jax.vjp(f, rest, carry, x_t, probes, has_aux=True)
        stepwise, rebuild = _split_invariant(pullback, invariant)
        layout.append(rebuild)
        return carry, (y_t, stepwise, sites)

    carry, (ys, stepwise, sites) = jax.lax.scan(body, carry, xs)
    return (carry, ys), (big, rest, consts, stepwise, sites, jax.tree_util.Partial(layout[0]))


def _split_invariant(pullback, invariant: list):
    """A step's pullback -> (its leaves that change with the step, rebuild(invariant, stepwise)).
    Leaves that are one of the scan's loop-invariant inputs (the weights, the memory) are not
    stored once per step: the rebuild puts the inputs back."""
    leaves, treedef = jax.tree.flatten(pullback)
    shared = [next((i for i, v in enumerate(invariant) if v is leaf), None) for leaf in leaves]

    def rebuild(invariant, stepwise):
        stepwise = iter(stepwise)
        return treedef.unflatten([next(stepwise) if i is None else invariant[i] for i in shared])
    return [leaf for leaf, i in zip(leaves, shared) if i is None], rebuild


def _scan_hoisted_bwd(step, residuals, cotangents):
    big, rest, consts, stepwise, sites, rebuild = residuals
    invariant = jax.tree.leaves((big, rest, consts))
    d_carry, d_ys = cotangents

    def body(acc, xs):
        d_carry, d_rest = acc
        stepwise_t, d_y = xs
        d_rest_t, d_carry, d_x, d_probes = rebuild(invariant, stepwise_t)((d_carry, d_y))
        return (d_carry, jax.tree.map(jnp.add, d_rest, d_rest_t)), (d_x, d_probes)

    zeros = jax.tree.map(jnp.zeros_like, rest)
    (d_carry, d_rest), (d_xs, d_probes) = jax.lax.scan(body, (d_carry, zeros), (stepwise, d_ys), reverse=True)
    d_big = {name: jnp.einsum("...i,...o->io", sites[name], d_probes[name]).astype(big[name].dtype)
             for name in big}                                             # [in, out], over all steps
    return d_big, d_rest, None, d_carry, d_xs


scan_hoisted.defvjp(_scan_hoisted_fwd, _scan_hoisted_bwd)
