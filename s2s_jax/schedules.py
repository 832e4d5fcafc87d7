"""Teacher-forcing ratio schedules for scheduled sampling (Bengio et al. 2015).

A schedule maps the training step to the probability of feeding the ground-truth token.
All schedules move from `start` towards `end` and work on Python ints and traced arrays alike:

  constant         start
  linear           start - (start - end) * min(1, step / decay_steps)   (stays at end after)
  exponential      end + (start - end) * k ** step                 (0 < k < 1)
  inverse_sigmoid  end + (start - end) * k / (k + exp(step / k))   (k >= 1)
"""
from typing import Callable

import jax.numpy as jnp

SCHEDULES = ("constant", "linear", "exponential", "inverse_sigmoid")


def make_schedule(kind: str, *, start: float = 1.0, end: float = 0.0, decay_steps: int = 1,
                  k: float = 1.0) -> Callable:
    """Returns step -> teacher-forcing ratio for one of SCHEDULES."""
    if not 0.0 <= end <= 1.0 or not 0.0 <= start <= 1.0:
        raise ValueError(f"teacher forcing start/end must lie in [0, 1], got {start}, {end}")
    span = start - end
    if kind == "constant":
        return lambda step: jnp.asarray(start, jnp.float32) + 0.0 * step
    if kind == "linear":
        if decay_steps < 1:
            raise ValueError(f"linear schedule needs decay_steps >= 1, got {decay_steps}")
        # Clamp the progress, not the value: correct whether end is below or above start.
        return lambda step: start - span * jnp.minimum(jnp.asarray(step, jnp.float32) / decay_steps, 1.0)
    if kind == "exponential":
        if not 0.0 < k < 1.0:
            raise ValueError(f"exponential schedule needs 0 < k < 1, got {k}")
        return lambda step: end + span * jnp.power(k, jnp.asarray(step, jnp.float32))
    if kind == "inverse_sigmoid":
        if k < 1.0:
            raise ValueError(f"inverse_sigmoid schedule needs k >= 1, got {k}")
        return lambda step: end + span * k / (k + jnp.exp(jnp.asarray(step, jnp.float32) / k))
    raise ValueError(f"unknown teacher forcing schedule {kind!r}; expected one of {SCHEDULES}")


def is_always_one(kind: str, start: float) -> bool:
    """True when the ratio is 1 at every step, so only the fast teacher-forced path is compiled."""
    return kind == "constant" and start >= 1.0
