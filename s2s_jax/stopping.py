"""Early stopping and the plateau decay of the learning rate, both on one dev metric
(config.early_stopping.metric), decided on the host after each dev evaluation.

Early stopping: an evaluation improves when its metric beats the best so far by more than
`min_delta` (dev_bleu: higher, dev_loss: lower); after `patience` evaluations in a row without an
improvement the run stops (at that evaluation's step, after saving it).

Plateau decay (optimizer.plateau_factor > 0): optax's `contrib.reduce_on_plateau`, fed the dev
metric (negated for BLEU: it minimises) once per evaluation (accumulation_size 1, its atol =
min_delta, rtol 0): after `optimizer.plateau_patience` evaluations without improvement it multiplies
its scale by the factor. Its state lives in the optimizer state (`steps.make_optimizer` multiplies
every update by its scale inside the jitted step), so checkpoints hold it exactly.

The tracker's own state (best value and step, evaluations without improvement, why it stopped) is
a small dict saved in each checkpoint's meta: a resumed run stops at the same step as an
uninterrupted one (every evaluation is followed by a checkpoint).
"""
from __future__ import annotations

import jax
import numpy as np
import optax

from s2s_jax import steps

# optax refuses rtol = atol = 0; this atol stands for min_delta = 0 (below any printed change).
_SMALLEST_ATOL = 1e-9


class Tracker:
    """The early-stopping state of a run and the plateau decay's updates of the optimizer state."""

    def __init__(self, stop_cfg, opt_cfg, saved: dict | None = None):
        """stop_cfg, opt_cfg: config.early_stopping and config.optimizer; saved: `as_dict()` of a
        checkpoint (None: a fresh run)."""
        self.metric, self.patience, self.min_delta = stop_cfg.metric, stop_cfg.patience, stop_cfg.min_delta
        saved = saved or {}
        self.best: float | None = saved.get("best")
        self.best_step: int | None = saved.get("best_step")
        self.bad: int = saved.get("bad", 0)  # evaluations since the last improvement
        self.plateau = None
        if opt_cfg.plateau_factor > 0:
            self.plateau = optax.contrib.reduce_on_plateau(
                factor=opt_cfg.plateau_factor, patience=opt_cfg.plateau_patience, rtol=0.0,
                atol=max(self.min_delta, _SMALLEST_ATOL))

    def as_dict(self) -> dict:
        return dict(best=self.best, best_step=self.best_step, bad=self.bad)

    @property
    def stopped(self) -> str | None:
        """Why the run stops early (patience ran out), or None. Computed with this run's settings:
        a run resumed with a larger patience trains on."""
        if self.metric == "off" or self.bad < self.patience:
            return None
        return (f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} in {self.bad} "
                f"evaluations (best {self.best:.4f} at step {self.best_step})")

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.metric == "dev_loss":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, step: int, dev: dict, opt_state, put):
        """Records the evaluation at `step` (dev: its metrics); returns the optimizer state with
        the plateau decay advanced (its new state placed by `put`, e.g. replicated on the mesh)."""
        if self.metric == "off":
            return opt_state
        value = float(dev[self.metric])
        if self._improves(value):
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        if self.plateau is None:
            return opt_state
        minimised = value if self.metric == "dev_loss" else -value

        def advance(state):  # on the host, from this process's replica (every process holds the same)
            _, new = self.plateau.update({}, jax.tree.map(_local, state), value=np.float32(minimised))
            return put(new)
        return steps.replace_plateau(opt_state, advance)


def _local(value) -> np.ndarray:
    """This process's copy of a replicated array."""
    return np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value)


def plateau_scale(opt_state) -> float:
    """The learning-rate multiplier of the plateau decay (1.0 when it is off)."""
    states = steps.plateau_states(opt_state)
    return float(_local(states[0].scale)) if states else 1.0
