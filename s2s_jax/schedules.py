"""Teacher-forcing ratio schedules for scheduled sampling (Bengio et al. 2015).

A schedule maps the training step to the probability of feeding the ground-truth token.
All schedules move from `start` towards `end` and work on Python ints and traced arrays alike:

  constant         start
  linear           start - (start - end) * min(1, step / decay_steps)   (stays at end after)
  exponential      end + (start - end) * k ** step                 (0 < k < 1)
  inverse_sigmoid  end + (start - end) * k / (k + exp(step / k))   (k >= 1)

In a config, k = AUTO_K (0) sizes k to the run for exponential and inverse_sigmoid: the ratio passes
the midpoint between start and end at step num_train_steps / 2, i.e. k ** (N / 2) = 1/2 for
exponential and k * ln(k) = N / 2 for inverse_sigmoid (k = 884 for N = 12,000: ratio 0.999 at step
0). An explicit k is used as given. from_config(tf_cfg, num_train_steps) builds the schedule of
a training config's teacher_forcing group.
"""
import math
from collections.abc import Callable

import jax.numpy as jnp

SCHEDULES = ("constant", "linear", "exponential", "inverse_sigmoid")
# teacher_forcing.k that means "sized to num_train_steps" (see auto_k).
AUTO_K = 0.0


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


def auto_k(kind: str, num_train_steps: int) -> float:
    """The k of an exponential or inverse_sigmoid schedule at its midpoint at num_train_steps / 2."""
    half = num_train_steps / 2
    if kind == "exponential":
        return 0.5 ** (1 / half)
    if kind != "inverse_sigmoid":
        raise ValueError(f"only exponential and inverse_sigmoid schedules have a k, not {kind!r}")
    # Newton's method on f(k) = k ln k - half from k = half + 1 >= the root; f is convex and
    # increasing for k >= 1, so the iterates fall monotonically onto the root.
    k = half + 1.0
    for _ in range(100):
        step = (k * math.log(k) - half) / (math.log(k) + 1.0)
        k -= step
        if step < 1e-9 * k:
            break
    return k


def uses_num_train_steps(tf_cfg) -> bool:
    """True when the k of config.teacher_forcing (`tf_cfg`) is sized to num_train_steps (AUTO_K)."""
    return tf_cfg.schedule in ("exponential", "inverse_sigmoid") and tf_cfg.k == AUTO_K


def from_config(tf_cfg, num_train_steps: int) -> Callable:
    """step -> teacher-forcing ratio of config.teacher_forcing (`tf_cfg`); num_train_steps sizes an
    AUTO_K k."""
    k = auto_k(tf_cfg.schedule, num_train_steps) if uses_num_train_steps(tf_cfg) else tf_cfg.k
    return make_schedule(tf_cfg.schedule, start=tf_cfg.start, end=tf_cfg.end, decay_steps=tf_cfg.decay_steps,
                         k=k)
