"""Scoring given translations: the log-probability a model (or an ensemble) gives each target,
teacher-forced, piece by piece up to and including EOS.

An ensemble's probability of a piece is the mean of its members' (`decoding.ensemble_step_fn`
combines them the same way while searching), so a hypothesis's score here equals the raw score
(alpha 0) the search reported for it, and a model's summed scores over a set equal its
teacher-forced loss there times the number of pieces (tests/test_scoring.py).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from s2s_jax import PAD_ID, inference
from s2s_jax.models import Seq2Seq


class Score(NamedTuple):
    """A target's score given its source."""
    log_prob: float  # summed log-probability of its pieces and EOS
    pieces: int      # its pieces, EOS included

    @property
    def nll_per_piece(self) -> float:
        """Mean negative log-likelihood per piece (EOS included): exp of it is the perplexity."""
        return -self.log_prob / self.pieces


@functools.partial(jax.jit, static_argnames=("model",))
def score_batch(model: Seq2Seq | tuple[Seq2Seq, ...], params, src, src_len, tgt_in, tgt_out) -> jax.Array:
    """src [B, S], src_len [B], tgt_in / tgt_out [B, T] -> float32[B]: each row's summed
    log-probability of its tgt_out pieces (PAD excluded); an ensemble's is of the mean probability."""
    gold = []
    for one, one_params in zip(*inference.members(model, params), strict=True):
        logits = one.apply({"params": one_params}, src, src_len, tgt_in, fast_path_only=True)["logits"]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))  # [B, T, V]
        gold.append(jnp.take_along_axis(log_probs, tgt_out[..., None], axis=-1)[..., 0])      # [B, T]
    members = jnp.stack(gold)                                                                   # [M, B, T]
    mixed = jax.nn.logsumexp(members, axis=0) - math.log(len(gold)) if len(gold) > 1 else members[0]
    return jnp.sum(jnp.where(tgt_out != PAD_ID, mixed, 0.0), axis=-1)
