"""The model side of decoding: one jitted function from source batch to `decoding.Beams`.

The encoder runs once per batch; its memory and attention keys stay in `step_fn`'s closure with
shape [B, S, ...] and are never tiled per beam (DESIGN.md section 2).
"""
import functools

import jax

from s2s_jax import decoding
from s2s_jax.models import Seq2Seq


def step_fn_for(model: Seq2Seq, params, src: jax.Array, src_len: jax.Array):
    """Encodes the batch; returns (step_fn, init_state) fitting `decoding.beam_search`."""
    memory, init_state = model.apply({"params": params}, src, src_len, method=Seq2Seq.encode)

    def step_fn(tokens, state):
        return model.apply({"params": params}, memory, tokens, state, method=Seq2Seq.decode_step)

    return step_fn, init_state


@functools.partial(jax.jit, static_argnames=("model", "search", "beam_size", "max_len", "alpha", "n_best"))
def decode_batch(model: Seq2Seq, params, src: jax.Array, src_len: jax.Array, *, search: str = "greedy",
                 beam_size: int = 5, max_len: int = 100, alpha: float = 0.6,
                 n_best: int | None = None) -> decoding.Beams:
    """src [B, S], src_len [B] -> Beams(sequences [B, N, max_len], scores [B, N], lengths [B, N])."""
    step_fn, init_state = step_fn_for(model, params, src, src_len)
    if search == "greedy":
        return decoding.greedy_search(step_fn, init_state, max_len=max_len)
    if search == "beam":
        return decoding.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_len,
                                    alpha=alpha, n_best=n_best)
    raise ValueError(f"unknown search {search!r}; expected 'greedy' or 'beam'")


def max_decode_len(source_length: int, cap: int) -> int:
    """Output length limit for a source bucket of `source_length` positions."""
    return min(cap, 2 * source_length + 10)
