"""Attention scores (dot, general, concat, scaled_dot), padding masks and context vectors.

Everything here is a pure function of arrays. The parameters are declared by `AttentionParams`
(a linen module), so the decoder can read them once and use them inside `lax.scan`.

Shapes: queries [B, Q, Hd] (Q = beams while decoding, 1 in the training scan),
memory [B, S, He], keys [B, S, Hk] (computed once per batch by `project_keys`), mask [B, S].
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax import NEG_INF, initializers

SCORES = ("dot", "general", "concat", "scaled_dot")


class Memory(NamedTuple):
    """What the decoder attends to; built once per batch, never tiled per beam."""
    values: jax.Array  # [B, S, He] encoder outputs
    keys: jax.Array    # [B, S, Hk] decoder-independent part of the score
    mask: jax.Array    # [B, S] True at real source positions


class AttentionParams(nn.Module):
    """Declares the parameters of one attention score; returns them as a dict."""
    score: str
    query_dim: int
    memory_dim: int
    attention_dim: int
    init_scale: float = 0.1  # s2s_jax.initializers

    @nn.compact
    def __call__(self) -> dict:
        init = initializers.matrix(self.init_scale)
        if self.score in ("dot", "scaled_dot"):
            return {}
        if self.score == "general":
            return {"w": self.param("w", init, (self.memory_dim, self.query_dim))}
        if self.score == "concat":
            return {
                "w_memory": self.param("w_memory", init, (self.memory_dim, self.attention_dim)),
                "w_query": self.param("w_query", init, (self.query_dim, self.attention_dim)),
                "bias": self.param("bias", nn.initializers.zeros, (self.attention_dim,)),
                "v": self.param("v", initializers.vector(self.init_scale, self.attention_dim),
                                (self.attention_dim,)),
            }
        raise ValueError(f"unknown attention score {self.score!r}; expected one of {SCORES}")


def source_mask(lengths: jax.Array, max_len: int) -> jax.Array:
    """[B] lengths -> [B, S] bool, True where the position holds a real token."""
    return jnp.arange(max_len)[None, :] < lengths[:, None]


def project_keys(score: str, params: dict, values: jax.Array) -> jax.Array:
    """The part of the score that does not depend on the decoder: once per batch."""
    if score in ("dot", "scaled_dot"):
        return values                                   # [B, S, He]
    if score == "general":
        return values @ params["w"]                     # [B, S, Hd]: (W h_s)
    if score == "concat":
        return values @ params["w_memory"] + params["bias"]  # [B, S, A]
    raise ValueError(f"unknown attention score {score!r}; expected one of {SCORES}")


def scores(score: str, params: dict, queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Unnormalised scores [B, Q, S] of queries [B, Q, Hd] against keys [B, S, Hk]."""
    if score in ("dot", "general"):
        return jnp.einsum("bqh,bsh->bqs", queries, keys)
    if score == "scaled_dot":
        return jnp.einsum("bqh,bsh->bqs", queries, keys) / jnp.sqrt(queries.shape[-1])
    if score == "concat":
        projected = queries @ params["w_query"]                          # [B, Q, A]
        hidden = jnp.tanh(projected[:, :, None, :] + keys[:, None, :, :])  # [B, Q, S, A]
        return hidden @ params["v"]                                      # [B, Q, S]
    raise ValueError(f"unknown attention score {score!r}; expected one of {SCORES}")


def attend(score: str, params: dict, queries: jax.Array, memory: Memory):
    """Softmax over real source positions; returns (context [B, Q, He], weights [B, Q, S])."""
    logits = scores(score, params, queries, memory.keys)
    logits = jnp.where(memory.mask[:, None, :], logits, NEG_INF)  # a fully padded row stays finite
    # Softmax in at least float32 (bfloat16 logits are upcast; float64 stays float64).
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    context = jnp.einsum("bqs,bsh->bqh", weights.astype(memory.values.dtype), memory.values)
    return context, weights
