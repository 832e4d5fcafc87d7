"""The pure, jittable side of training: optimizer, loss, `train_step`, `eval_step`, `init_state`.

`train_step(state, batch, *, model, ...)` and `eval_step(params, batch, *, model)` are module-level
pure functions; static arguments are bound with functools.partial, as in the Flax examples. Both
return sums plus a token count, never means, so windows of steps and sharded batches add up.

Weight averaging: with `optimizer.ema_decay` > 0 the state also holds `ema_params`, an exponential
moving average of the parameters updated inside the step; `inference_params(state)` is what dev
evaluation, translation and export decode with. Gradient accumulation: `accumulate_steps` = k runs
the batch as k micro-batches in a `lax.scan` and applies one update, equal to k = 1's up to the
order of float sums.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from s2s_jax import PAD_ID, compiled, data, output_layer
from s2s_jax.models import Decoder, Seq2Seq
from s2s_jax.ops import NEVER_TARGETS


class TrainState(train_state.TrainState):
    """Flax TrainState: step, params, opt_state (and the optax transformation), and `ema_params`:
    the moving average of params when optimizer.ema_decay > 0, else None."""
    ema_params: Any = None


def inference_params(state: TrainState):
    """The weights to decode with: the moving average when the run keeps one, else the parameters."""
    return state.params if state.ema_params is None else state.ema_params


# ----------------------------------------------------------------------------- optimizer
# Fraction of num_train_steps over which the "wsd" learning rate falls linearly to 0.
WSD_COOLDOWN = 0.2


def make_learning_rate(opt_cfg, num_train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then (by `decay`):

      constant  peak
      cosine    cosine from the peak at the end of warmup to 10% of it at `num_train_steps`
      rsqrt     peak * sqrt(warmup / step) (the Transformer's inverse square root; 1 at the
                end of warmup, halved at 4x the warmup steps)
      wsd       warmup-stable-decay: the peak, then linear to 0 over the last WSD_COOLDOWN of
                `num_train_steps` (Hägele et al. 2024)
    """
    # Only cosine and wsd read num_train_steps: configuration._depends_on_num_train_steps relies on it.
    peak, warmup = float(opt_cfg.learning_rate), int(opt_cfg.warmup_steps)
    decay_steps = max(num_train_steps - warmup, 1)
    cooldown = max(round(WSD_COOLDOWN * num_train_steps), 1)
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1),
        # Called with the steps since the end of warmup (join_schedules), >= 0 where it is used.
        "rsqrt": lambda since: peak * jnp.sqrt(max(warmup, 1) / (jnp.maximum(since, 0) + max(warmup, 1))),
        "wsd": lambda since: peak * jnp.clip((decay_steps - jnp.asarray(since, jnp.float32)) / cooldown, 0.0, 1.0),
    }[opt_cfg.decay]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt_cfg, num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam on the learning-rate schedule, after global-norm clipping (when clip_norm > 0), its
    updates scaled by the plateau decay's current scale when plateau_factor > 0."""
    learning_rate = make_learning_rate(opt_cfg, num_train_steps)
    clip = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    plateau = [_scale_by_plateau(opt_cfg.plateau_factor)] if opt_cfg.plateau_factor > 0 else []
    tx = optax.chain(*clip, optax.adam(learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2), *plateau)
    return tx, learning_rate


def _scale_by_plateau(factor: float) -> optax.GradientTransformation:
    """Multiplies the updates by the scale of an `optax.contrib.reduce_on_plateau` state. The state
    is not advanced here: the training loop advances it after each dev evaluation
    (`stopping.Tracker`), with the dev metric instead of a training loss."""
    return optax.GradientTransformation(
        optax.contrib.reduce_on_plateau(factor=factor).init,
        lambda updates, state, params=None: (optax.tree.scale(state.scale, updates), state))


def _is_plateau(node) -> bool:
    return isinstance(node, optax.contrib.ReduceLROnPlateauState)


def plateau_states(opt_state) -> list:
    """The reduce_on_plateau states inside an optimizer state (none when the decay is off)."""
    return [node for node in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(node)]


def replace_plateau(opt_state, update):
    """opt_state with every reduce_on_plateau state replaced by update(state)."""
    return jax.tree.map(lambda node: update(node) if _is_plateau(node) else node, opt_state, is_leaf=_is_plateau)


def init_state(model: Seq2Seq, opt_cfg, num_train_steps: int, seed: int) -> TrainState:
    """Fresh parameters (from `seed`), the optimizer state of `opt_cfg` (config.optimizer) and, when
    opt_cfg.ema_decay > 0, their moving average (a copy of the parameters)."""
    tx, _ = make_optimizer(opt_cfg, num_train_steps)
    params = compiled.jit(functools.partial(fresh_params, model=model))(jax.random.PRNGKey(seed))
    ema = jax.tree.map(jnp.copy, params) if opt_cfg.ema_decay > 0 else None
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, ema_params=ema)


def fresh_params(rng: jax.Array, *, model: Seq2Seq):
    """The model's initial parameters from `rng`. Jitted (`init_state`), initialisation is one cached
    executable instead of ~70 small functions compiled op by op at every start; the bits are the same."""
    dummy = jnp.ones((1, 1), jnp.int32)  # parameter shapes do not depend on the lengths
    return model.init(rng, dummy, jnp.ones((1,), jnp.int32), dummy, fast_path_only=True)["params"]


def ema_update(ema, params, decay: float, step: jax.Array):
    """One step of the moving average: decay_t * ema + (1 - decay_t) * params, where decay_t =
    min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage with num_updates:
    the early average follows the parameters instead of keeping their initial values)."""
    step = jnp.asarray(step, jnp.float32)
    decay_t = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: decay_t * e + (1.0 - decay_t) * p, ema, params)


# ----------------------------------------------------------------------------- loss
def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Token cross-entropy summed over non-PAD targets: (nll_sum, smoothed_sum, token_count).

    logits [B, T, V], targets [B, T]. `nll_sum` is the plain negative log-likelihood (comparable
    across runs whatever their smoothing); `smoothed_sum` is the training objective: the target
    distribution puts 1 - eps on the gold token and spreads eps uniformly over the V - 2 ids that
    can be targets (every id but PAD and BOS). It equals nll_sum when eps = 0.
    """
    mask = (targets != PAD_ID).astype(jnp.float32)                       # [B, T]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))  # [B, T, V]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
    if label_smoothing > 0:
        vocab = log_probs.shape[-1]
        never = sum(log_probs[..., i] for i in NEVER_TARGETS)            # [B, T]
        uniform = -(jnp.sum(log_probs, axis=-1) - never) / (vocab - len(NEVER_TARGETS))
        smoothed = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    else:
        smoothed = nll
    return jnp.sum(nll * mask), jnp.sum(smoothed * mask), jnp.sum(mask)


def teacher_forced_losses(model: Seq2Seq, variables: dict, batch: data.Batch, label_smoothing: float,
                          **apply_kwargs):
    """The teacher-forced forward and its (nll_sum, smoothed_sum, tokens): through the fused
    output layer when `model.output_chunk` > 0, else through logits and `cross_entropy`."""
    apply = functools.partial(model.apply, variables, batch.src, batch.src_len, batch.tgt_in,
                              fast_path_only=True, **apply_kwargs)
    if model.output_chunk > 0:
        out = apply(return_vectors=True)
        return output_layer.cross_entropy(out["vectors"], *out["projection"], batch.tgt_out,
                                          label_smoothing, model.output_chunk, model.dtype)
    return cross_entropy(apply()["logits"], batch.tgt_out, label_smoothing)


# ----------------------------------------------------------------------------- steps
def train_step(state: TrainState, batch: data.Batch, *, model: Seq2Seq, tf_schedule,
               fast_path_only: bool, label_smoothing: float, base_rng: jax.Array,
               tf_mode: str = "sequential", tf_passes: int = 1, accumulate_steps: int = 1,
               ema_decay: float = 0.0):
    """One optimizer step on the smoothed loss. Returns (new_state, metrics), sums not means:
    loss_sum (plain NLL), smoothed_loss_sum, tokens, grad_norm, tf_ratio, finite.

    Scheduled sampling (unless `fast_path_only`) as config.teacher_forcing's mode and passes say:
    "sequential" decodes step by step; "parallel" mixes the inputs in `tf_passes` teacher-forced
    passes, then computes the loss like teacher forcing (fused output layer included).

    `accumulate_steps` = k > 1: the gradient is summed over k micro-batches (`_accumulated`), each
    normalised by the whole batch's target tokens, so the update is k = 1's on the same batch
    (the same scheduled-sampling coins per row; dropout masks are drawn per micro-batch).
    `ema_decay` > 0: state.ema_params moves towards the updated parameters (`ema_update`).

    A non-finite loss, gradient or updated parameter leaves params, their average and the optimizer
    state unchanged, except the step counters: state.step and the learning-rate schedule's count
    advance (the schedule follows state.step: the rate logged for a step is the rate applied);
    Adam's moments and bias-correction count stay. `metrics["finite"]` tells the loop, which stops
    or goes on as configured.
    """
    step_rng = jax.random.fold_in(base_rng, state.step)
    dropout_rng, sampling_rng = jax.random.split(step_rng)
    tf_ratio = tf_schedule(state.step)
    losses = functools.partial(_losses, model=model, tf_ratio=tf_ratio, fast_path_only=fast_path_only,
                               label_smoothing=label_smoothing, tf_mode=tf_mode, tf_passes=tf_passes)
    tokens = jnp.sum((batch.tgt_out != PAD_ID).astype(jnp.float32))
    if accumulate_steps == 1:
        grads, sums = _gradient(losses, state.params, tokens, batch, dropout_rng, sampling_rng, None)
    else:
        coins = None if fast_path_only else Decoder.gold_coins(sampling_rng, tf_ratio, batch.tgt_in.shape)
        grads, sums = _accumulated(losses, state.params, tokens, batch, dropout_rng, sampling_rng, coins,
                                   accumulate_steps)
    nll_sum, smoothed_sum, tokens = sums
    new_state, grad_norm, finite = _update(state, grads, jnp.isfinite(smoothed_sum), ema_decay)
    return new_state, dict(loss_sum=nll_sum, smoothed_loss_sum=smoothed_sum, tokens=tokens,
                           grad_norm=grad_norm, tf_ratio=tf_ratio, finite=finite)


def _losses(params, batch: data.Batch, dropout_rng, sampling_rng, coins, *, model: Seq2Seq, tf_ratio,
            fast_path_only: bool, label_smoothing: float, tf_mode: str, tf_passes: int):
    """(nll_sum, smoothed_sum, tokens) of the training forward on `batch`; `coins` [B, T]: the
    scheduled-sampling draw to use (None: drawn from `sampling_rng`)."""
    if fast_path_only or tf_mode == "parallel":
        sampling = {} if fast_path_only else dict(tf_ratio=tf_ratio, sampling_rng=sampling_rng,
                                                  parallel_passes=tf_passes, gold_coins=coins)
        return teacher_forced_losses(model, {"params": params}, batch, label_smoothing, train=True,
                                     rngs={"dropout": dropout_rng}, **sampling)
    out = model.apply({"params": params}, batch.src, batch.src_len, batch.tgt_in, train=True,
                      tf_ratio=tf_ratio, sampling_rng=sampling_rng, gold_coins=coins,
                      rngs={"dropout": dropout_rng})
    return cross_entropy(out["logits"], batch.tgt_out, label_smoothing)


def _gradient(losses, params, tokens: jax.Array, batch: data.Batch, dropout_rng, sampling_rng, coins):
    """(gradient of smoothed_sum / tokens, the sums of `losses`) on `batch`; `tokens` counts the
    target tokens of the whole batch (a micro-batch's gradient is its share of the batch's)."""
    def objective(params):
        sums = losses(params, batch, dropout_rng, sampling_rng, coins)
        return sums[1] / jnp.maximum(tokens, 1.0), sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums


def micro_batches(tree, k: int):
    """Leaves [B, ...] -> [k, B / k, ...]. Micro-batch i holds rows i, k + i, 2k + i, ...: with
    B / devices divisible by k, each device's block of rows splits into k without moving data."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), tree)


def _accumulated(losses, params, tokens: jax.Array, batch: data.Batch, dropout_rng, sampling_rng, coins,
                 k: int):
    """`_gradient` summed over the k micro-batches of `batch` in a lax.scan (T5X's num_microbatches).
    Each micro-batch gets its rows of the whole batch's coins [B, T] and keys folded with its index
    (its dropout masks; its coins do not depend on them)."""
    def body(grad_sum, xs):
        index, part, part_coins = xs
        grads, sums = _gradient(losses, params, tokens, part, jax.random.fold_in(dropout_rng, index),
                                jax.random.fold_in(sampling_rng, index), part_coins)
        return jax.tree.map(jnp.add, grad_sum, grads), sums

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(k), micro_batches(batch, k), None if coins is None else micro_batches(coins, k))
    grads, sums = jax.lax.scan(body, zeros, xs)                        # sums: each [k]
    return grads, tuple(jnp.sum(s) for s in sums)


def _update(state: TrainState, grads, loss_finite: jax.Array, ema_decay: float):
    """(new state, gradient norm, finite): Adam's update and the moving average, both kept out when
    the loss, the gradient or the updated parameters are not finite."""
    grad_norm = optax.tree.norm(grads)
    updated = state.apply_gradients(grads=grads)
    # Finite loss and gradient can still overflow the parameters (an absurd learning rate).
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(updated.params)]))
    finite = loss_finite & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, updated.params, state.params)
    new_state = updated.replace(params=params, opt_state=_schedule_at(
        jax.tree.map(keep, updated.opt_state, state.opt_state), updated.step))
    if ema_decay > 0:
        ema = ema_update(state.ema_params, params, ema_decay, updated.step)
        new_state = new_state.replace(ema_params=jax.tree.map(keep, ema, state.ema_params))
    return new_state, grad_norm, finite


def _schedule_at(opt_state, step: jax.Array):
    """opt_state with every learning-rate schedule's count set to `step`."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda node: optax.ScaleByScheduleState(count=jnp.asarray(step, node.count.dtype))
                        if is_schedule(node) else node, opt_state, is_leaf=is_schedule)


def eval_step(params, batch: data.Batch, *, model: Seq2Seq):
    """Teacher-forced dev loss: (nll_sum, token_count)."""
    nll_sum, _, tokens = teacher_forced_losses(model, {"params": params}, batch, 0.0)
    return nll_sum, tokens
