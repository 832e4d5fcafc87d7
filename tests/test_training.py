"""Tests for s2s_jax.training and s2s_jax.checkpoints.

References: a float64 numpy cross-entropy (with and without label smoothing), exact leaf-by-leaf
comparison of saved and restored train states, and an uninterrupted run as the reference for a
resumed one. Thresholds for the tiny reverse task are the ones configs/tiny.py promises.
"""
import functools
import json
import logging
import os

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from s2s_jax import BOS_ID, PAD_ID, checkpoints, configuration, data, steps, training
from s2s_jax.models import make_model
from s2s_jax.schedules import make_schedule

VOCAB = 20  # tiny config: synthetic_vocab_size (ids are the tokens)


# ----------------------------------------------------------------------------- helpers
def flat_state(state) -> dict:
    """{'params/decoder/w_out': array, 'opt_state/1/0/mu/...': array, 'step': ...}; no None fields
    (ema_params of a state without a moving average)."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(state), sep="/")
    return {k: np.asarray(v) for k, v in flat.items() if v is not None}


def assert_states_identical(a, b, equal_nan=False):
    """Every leaf (step, params, optimizer state) has the same shape, dtype and bits."""
    fa, fb = flat_state(a), flat_state(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        x, y = fa[name], fb[name]
        assert x.shape == y.shape, name
        if name == "step":  # a Python int in a fresh state, int32 after a jitted step: compare values
            assert int(x) == int(y)
            continue
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y, equal_nan=equal_nan and np.issubdtype(x.dtype, np.floating)), name


def schedule_count(state) -> int:
    """The learning-rate schedule's count in the optimizer state (optax.adam's ScaleByScheduleState)."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    counts = [int(node.count) for node in jax.tree.leaves(state.opt_state, is_leaf=is_schedule) if is_schedule(node)]
    assert len(counts) == 1
    return counts[0]


def without_counters(state):
    """The state with its step counters (state.step, the schedule's count) set to 0."""
    return state.replace(step=0, opt_state=steps._schedule_at(state.opt_state, 0))


def tiny_config():
    """A fresh configs/tiny.py config (imported here: the repo root must be on sys.path, as with
    `python -m pytest` run from it)."""
    from configs import tiny
    return tiny.get_config()


def small_config():
    config = tiny_config()
    config.optimizer.warmup_steps = 1  # learn from the first step
    config.optimizer.learning_rate = 3e-3  # the fixed-batch checks below are written for this rate
    return config


@pytest.fixture(scope="module")
def setup():
    """The tiny model, a fresh state, a fixed batch and a jitted train_step (compiled once)."""
    config = small_config()
    model = make_model(config.model, VOCAB, VOCAB)
    state = steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)
    src, tgt = data.synthetic_task("reverse", 16, VOCAB, 2, 6, seed=0)
    batch = data.make_batch(src, tgt, list(range(16)), batch_size=16, length=8)
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=make_schedule("constant"), fast_path_only=True,
        label_smoothing=0.0, base_rng=jax.random.PRNGKey(0)))
    return dict(config=config, model=model, state=state, batch=batch, step=step)


@pytest.fixture(scope="module")
def trained(setup):
    """(state after 30 steps on the fixed batch, the per-step mean losses)."""
    state, losses = setup["state"], []
    for _ in range(30):
        state, metrics = setup["step"](state, setup["batch"])
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
    return state, losses


# ----------------------------------------------------------------------------- cross_entropy
def np_cross_entropy(logits, targets, eps):
    """float64 reference: (NLL sum, smoothed sum, count). The smoothed target puts 1 - eps on the
    gold token and eps uniformly over the ids that can be targets (all but PAD and BOS)."""
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    vocab = logits.shape[-1]
    nll, smoothed, count = 0.0, 0.0, 0
    for b, t in np.ndindex(targets.shape):
        if targets[b, t] == PAD_ID:
            continue
        q = np.full(vocab, eps / (vocab - 2))
        q[[PAD_ID, BOS_ID]] = 0.0
        q[targets[b, t]] += 1.0 - eps
        nll += -log_p[b, t, targets[b, t]]
        smoothed += -(q * log_p[b, t]).sum()
        count += 1
    return nll, smoothed, count


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy(eps):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 5, 7)) * 3).astype(np.float32)
    targets = rng.integers(2, 7, size=(3, 5)).astype(np.int32)
    targets[0, 3:] = PAD_ID
    targets[2, 1:] = PAD_ID
    nll_sum, smoothed_sum, tokens = steps.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), eps)
    ref_nll, ref_smoothed, ref_count = np_cross_entropy(logits, targets, eps)
    assert float(tokens) == ref_count == 15 - 2 - 4
    assert float(nll_sum) == pytest.approx(ref_nll, rel=1e-5)
    assert float(smoothed_sum) == pytest.approx(ref_smoothed, rel=1e-5)
    # Logits at PAD positions do not matter.
    noisy = logits.copy()
    noisy[targets == PAD_ID] = rng.normal(size=noisy[targets == PAD_ID].shape) * 100
    _, noisy_smoothed, _ = steps.cross_entropy(jnp.asarray(noisy), jnp.asarray(targets), eps)
    assert float(noisy_smoothed) == pytest.approx(float(smoothed_sum), rel=1e-6)


def test_label_smoothing_puts_no_mass_on_pad_and_bos():
    """The smoothed loss's gradient pushes PAD and BOS logits down only through the softmax: it
    equals softmax - q with q zero on PAD and BOS (optax.smooth_labels would give them eps / V)."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 1, 6)), jnp.float32)
    targets = jnp.asarray([[4]], jnp.int32)
    grad = jax.grad(lambda x: steps.cross_entropy(x, targets, 0.3)[1])(logits)[0, 0]
    q = np.array([0.0, 0.0, 0.075, 0.075, 0.775, 0.075])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(logits[0, 0])) - q, atol=1e-6)


def test_cross_entropy_all_padding_is_zero():
    nll_sum, smoothed_sum, tokens = steps.cross_entropy(jnp.ones((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), 0.1)
    assert float(nll_sum) == float(smoothed_sum) == float(tokens) == 0.0


# ----------------------------------------------------------------------------- train_step
def test_train_step_lowers_loss_on_a_fixed_batch(setup, trained):
    state, losses = trained
    assert int(state.step) == 30
    # Mean token loss falls by more than half in 30 Adam steps at lr 3e-3 on one batch of 16.
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # The parameters moved and stayed finite.
    before, after = flat_state(setup["state"]), flat_state(state)
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("params/"))
    assert all(np.all(np.isfinite(v)) for v in after.values())


def test_nan_params_give_finite_false_and_leave_state_unchanged(setup, trained):
    state, _ = trained
    params = jax.tree.map(lambda x: x, state.params)
    params["decoder"]["w_out"] = params["decoder"]["w_out"].at[0, 0].set(jnp.nan)
    bad = state.replace(params=params)
    new_state, metrics = setup["step"](bad, setup["batch"])
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss_sum"]))
    assert int(new_state.step) == int(bad.step) + 1  # the counter still advances
    assert_states_identical(without_counters(new_state), without_counters(bad), equal_nan=True)


def test_nan_batch_gives_finite_false_and_leaves_state_unchanged(setup, trained):
    state, _ = trained
    batch = setup["batch"]
    src = batch.src.copy()
    src[0, 0] = 10 ** 6  # an id outside the vocabulary: the embedding lookup gives NaN
    bad_batch = batch._replace(src=src)
    new_state, metrics = setup["step"](state, bad_batch)
    assert not np.isfinite(float(metrics["loss_sum"])), "precondition: this batch must give NaN"
    assert not bool(metrics["finite"])
    assert_states_identical(without_counters(new_state), without_counters(state))
    # Training goes on normally with the next good batch.
    newer_state, metrics = setup["step"](new_state, batch)
    assert bool(metrics["finite"])
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(newer_state.params),
                                                         jax.tree.leaves(state.params))]
    assert any(changed)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(newer_state.params))


# ----------------------------------------------------------------------------- end to end
def test_tiny_model_overfits_reverse_task(tiny_workdir):
    """configs/tiny.py promises: train loss well under 1 after 300 steps, dev BLEU > 50.
    Thresholds here: final train_loss < 0.5 and dev_bleu > 50."""
    with open(os.path.join(tiny_workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(tiny_workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(50, 301, 50))
    assert train_rows[-1]["train_loss"] < 0.5, train_rows[-1]
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    dev_rows = [r for r in rows if "dev_bleu" in r]
    assert dev_rows and dev_rows[-1]["step"] == 300
    assert summary["steps"] == 300
    assert summary["dev_bleu"] > 50, summary
    assert summary["dev_bleu"] == dev_rows[-1]["dev_bleu"]


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_save_restore_is_exact(setup, trained, tmp_path):
    state, _ = trained  # nonzero Adam moments and step count
    meta = dict(step=int(state.step), window=dict(loss_sum=1.5, tokens=3.0, steps=1, grad_norm_sum=0.5),
                param_shapes=checkpoints.param_shapes(state.params))
    store = checkpoints.Checkpoints(str(tmp_path), 2)
    store.save(int(state.step), state, meta)
    store.close()

    target = setup["state"]  # fresh init: different values, same structure
    assert any(not np.array_equal(flat_state(target)[k], v) for k, v in flat_state(state).items())
    store = checkpoints.Checkpoints(str(tmp_path), 2)
    restored, restored_meta = store.restore_latest(target)
    store.close()
    assert {k: restored_meta[k] for k in meta} == meta  # the store may add records of its own
    assert_states_identical(restored, state)
    # The restored parameters and optimizer state train exactly like the originals. (Passed as host
    # arrays, with the original step object: restored arrays are committed to a device and the
    # restored counter is not weakly typed, which would only cost another train_step compilation.)
    a, ma = setup["step"](state, setup["batch"])
    b, mb = setup["step"](jax.tree.map(np.asarray, restored).replace(step=state.step), setup["batch"])
    assert float(ma["loss_sum"]) == float(mb["loss_sum"])
    assert_states_identical(a, b)


@pytest.mark.parametrize("change", ["encoder_hidden", "vocabulary"])
def test_checkpoint_of_another_model_shape_is_refused(setup, tmp_path, change):
    state = setup["state"]
    store = checkpoints.Checkpoints(str(tmp_path), 2)
    store.save(1, state, dict(param_shapes=checkpoints.param_shapes(state.params)))
    store.close()

    config = small_config()
    vocab = VOCAB
    if change == "encoder_hidden":
        config.model.encoder_hidden = 16
    else:
        vocab = VOCAB + 5
    other = jax.eval_shape(lambda: steps.init_state(make_model(config.model, vocab, vocab), config.optimizer, config.num_train_steps, config.seed))
    ours, theirs = checkpoints.param_shapes(state.params), checkpoints.param_shapes(other.params)
    differing = [name for name in ours if ours[name] != theirs.get(name)]
    assert differing

    store = checkpoints.Checkpoints(str(tmp_path), 2)
    with pytest.raises(checkpoints.CheckpointError) as error:
        store.restore_latest(other)
    store.close()
    assert any(name in str(error.value) for name in differing), str(error.value)


# ----------------------------------------------------------------------------- resume
def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def resume_config(num_train_steps):
    config = tiny_config()
    config.num_train_steps = num_train_steps
    config.checkpoint_every_steps = 50
    config.data.synthetic_dev_size = 16   # cheap dev evaluation
    config.eval.batch_size = 16
    config.data.bucket_boundaries = (12,)  # one batch shape: one train_step compilation per run
    return config


def latest_state(workdir, target):
    store = checkpoints.Checkpoints(workdir, 2)
    try:
        steps = store.steps()
        state, meta = store.restore_latest(target)
    finally:
        store.close()
    return steps, state, meta


def test_resume_continues_at_the_checkpoint_and_matches_an_uninterrupted_run(setup, tmp_path, caplog):
    resumed, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    target = setup["state"]  # same model shapes as resume_config's (vocabulary 20)

    training.train_and_evaluate(resume_config(100), resumed)
    first_rows = read_rows(resumed)
    assert [r["step"] for r in first_rows if "train_loss" in r] == [50, 100]
    steps, _, meta = latest_state(resumed, target)
    assert steps[-1] == 100 and meta["step"] == 100

    with caplog.at_level(logging.INFO, logger="s2s_jax.training"):
        summary = training.train_and_evaluate(resume_config(150), resumed)
    assert any("resumed" in r.getMessage() and "step 100" in r.getMessage() for r in caplog.records)
    rows = read_rows(resumed)
    assert rows[:len(first_rows)] == first_rows  # history up to step 100 kept as it was
    new_rows = rows[len(first_rows):]
    assert [r["step"] for r in new_rows] == [150, 150]  # one train row, one dev row, nothing else
    assert [r["step"] for r in rows if "train_loss" in r] == [50, 100, 150]
    assert summary["steps"] == 150
    with open(os.path.join(resumed, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == 150

    training.train_and_evaluate(resume_config(150), fresh)
    fresh_rows = read_rows(fresh)
    assert [r["step"] for r in fresh_rows if "train_loss" in r] == [50, 100, 150]

    # Exact resume: the same final state, bit for bit, and the same logged numbers.
    steps_a, state_a, _ = latest_state(resumed, target)
    steps_b, state_b, _ = latest_state(fresh, target)
    assert steps_a[-1] == steps_b[-1] == 150 and int(state_a.step) == 150
    assert_states_identical(state_a, state_b)
    for key in ("train_loss", "grad_norm"):
        assert new_rows[0][key] == fresh_rows[-2][key], key
    for key in ("dev_loss", "dev_bleu"):
        assert new_rows[1][key] == fresh_rows[-1][key], key

    # A workdir made with another model shape is refused before anything runs, naming the key.
    other = resume_config(200)
    other.model.encoder_hidden = 16
    with pytest.raises(configuration.ConfigError, match="encoder_hidden"):
        training.train_and_evaluate(other, resumed)


def test_a_workdir_of_an_older_version_loads_and_resumes(tmp_path, caplog):
    """A config.json without the keys added since (each at its older value in this run) loads with
    them filled in, and the run resumes from its checkpoint."""
    workdir = str(tmp_path / "older")
    config = resume_config(50)
    config.model.output_chunk = 0  # the older value of every later key, like tiny's init_scale
    training.train_and_evaluate(config, workdir)
    config.distributed.heartbeat_timeout_s = 30  # its older value (the default is 60 since)
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key, row in configuration.KEYS.items():
        if row.older is not None:
            *groups, name = key.split(".")
            functools.reduce(dict.__getitem__, groups, saved).pop(name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f)

    loaded = configuration.load(workdir)
    assert configuration.to_json(loaded) == configuration.to_json(config)
    loaded.num_train_steps = 100
    with caplog.at_level(logging.INFO, logger="s2s_jax.training"):
        summary = training.train_and_evaluate(loaded, workdir)
    assert any("resumed" in r.getMessage() and "step 50" in r.getMessage() for r in caplog.records)
    assert summary["steps"] == 100


# ----------------------------------------------------------------------------- optimizer
def opt_config(decay, warmup=10, peak=1e-2, clip_norm=0.0):
    from configs import default
    config = default.get_config().optimizer
    config.update(learning_rate=peak, warmup_steps=warmup, decay=decay, b1=0.9, b2=0.999, clip_norm=clip_norm,
                  label_smoothing=0.0)
    return config


@pytest.mark.parametrize("decay", ["constant", "cosine", "rsqrt", "wsd"])
@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_learning_rate_is_finite_at_every_step_python_int_or_traced(decay, warmup):
    """The loop calls the schedule with Python ints from step 0 (rsqrt used to divide by zero)."""
    schedule = steps.make_learning_rate(opt_config(decay, warmup), 100)
    for step in range(0, 101):
        value = float(schedule(step))
        assert np.isfinite(value) and 0.0 <= value <= 1e-2 + 1e-9, (step, value)
        assert value == pytest.approx(float(jax.jit(schedule)(jnp.int32(step))), rel=1e-6)


@pytest.mark.parametrize("decay", ["constant", "cosine", "rsqrt", "wsd"])
def test_learning_rate_shapes(decay):
    peak, warmup, total = 1e-2, 10, 110
    schedule = steps.make_learning_rate(opt_config(decay, warmup, peak), total)
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(peak / 2)          # linear warmup
    assert lr(warmup) == pytest.approx(peak)         # reaches the peak at the end of warmup
    if decay == "constant":
        assert lr(total) == pytest.approx(peak)
    elif decay == "cosine":
        assert lr(warmup + (total - warmup) // 2) == pytest.approx(peak * 0.55)  # halfway down to 10%
        assert lr(total) == pytest.approx(peak * 0.1)
    elif decay == "wsd":
        cooldown = round(steps.WSD_COOLDOWN * total)                  # 22 steps
        assert lr(total - cooldown) == pytest.approx(peak)            # stable up to the cooldown
        assert lr(total - cooldown // 2) == pytest.approx(peak / 2)   # halfway down
        assert lr(total) == 0.0
    else:
        assert lr(4 * warmup) == pytest.approx(peak / 2)  # peak * sqrt(warmup / step)
        assert lr(100 * warmup) == pytest.approx(peak / 10)


def test_gradient_clipping_matches_a_numpy_clip_then_adam():
    """Three updates with gradients of global norm 50, 0.3 and 7 against a float64 numpy
    reference of clip_by_global_norm(1.0) followed by Adam."""
    lr, b1, b2, eps, clip = 1e-2, 0.9, 0.999, 1e-8, 1.0
    tx, _ = steps.make_optimizer(opt_config("constant", warmup=0, peak=lr, clip_norm=clip), 100)
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    opt_state = tx.init(params)
    m = {k: np.zeros(v.shape) for k, v in params.items()}
    v = {k: np.zeros(v.shape) for k, v in params.items()}
    for t, norm in enumerate([50.0, 0.3, 7.0], start=1):
        grads = {k: rng.normal(size=x.shape) for k, x in params.items()}
        scale = norm / np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        grads = {k: g * scale for k, g in grads.items()}
        updates, opt_state = tx.update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, opt_state)
        factor = min(1.0, clip / norm)
        for k, g in grads.items():
            g = g * factor
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g ** 2
            expected = -lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=2e-4, atol=1e-7)


def test_skipped_updates_keep_the_schedule_on_state_step(setup):
    """Three skipped (non-finite) steps, then a good one: the schedule follows state.step, so the
    good step applies the warmup rate of step 3, computed here by hand: peak * 3 / warmup. Adam's
    first real update moves every parameter with a nonzero gradient by the rate (m/sqrt(v) = ±1)."""
    config = small_config()
    config.optimizer.update(learning_rate=1e-2, warmup_steps=10, decay="constant", clip_norm=0.0)
    state = steps.init_state(setup["model"], config.optimizer, config.num_train_steps, config.seed)
    batch = setup["batch"]
    src = batch.src.copy()
    src[0, 0] = 10 ** 6  # an id outside the vocabulary: NaN loss
    for _ in range(3):
        state, metrics = setup["step"](state, batch._replace(src=src))
        assert not bool(metrics["finite"])
    assert int(state.step) == schedule_count(state) == 3
    new_state, metrics = setup["step"](state, batch)
    assert bool(metrics["finite"])
    moved = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                            zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))])
    assert np.max(moved) == pytest.approx(1e-2 * 3 / 10, rel=1e-3)
    assert float(steps.make_learning_rate(config.optimizer, config.num_train_steps)(3)) == pytest.approx(3e-3)


# ----------------------------------------------------------------------------- train_step variants
def variant_step(setup, *, dropout=0.0, smoothing=0.0, schedule=None, dtype="float32", seed=0):
    config = small_config()
    config.model.dropout = dropout
    config.model.dtype = dtype
    model = make_model(config.model, VOCAB, VOCAB)
    tf_schedule = schedule or make_schedule("constant")
    return jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=tf_schedule, fast_path_only=schedule is None,
        label_smoothing=smoothing, base_rng=jax.random.PRNGKey(seed)))


def test_train_step_with_dropout_is_random_per_seed_and_reproducible(setup):
    state, batch = setup["state"], setup["batch"]
    _, m0 = setup["step"](state, batch)
    dropped = variant_step(setup, dropout=0.3)
    _, a = dropped(state, batch)
    _, b = dropped(state, batch)
    _, c = variant_step(setup, dropout=0.3, seed=1)(state, batch)
    assert bool(a["finite"])
    assert float(a["loss_sum"]) == float(b["loss_sum"])           # same seed, same step: same mask
    assert float(a["loss_sum"]) != float(c["loss_sum"])           # another seed: another mask
    assert float(a["loss_sum"]) != float(m0["loss_sum"])          # dropout changed the forward pass


def test_train_step_with_label_smoothing_logs_plain_nll(setup, trained):
    state, batch = trained[0], setup["batch"]  # a confident model: smoothing costs it loss
    _, plain = setup["step"](state, batch)
    _, smooth = variant_step(setup, smoothing=0.2)(state, batch)
    # train_loss stays the NLL whatever the smoothing; the objective is reported on its own.
    assert float(smooth["loss_sum"]) == pytest.approx(float(plain["loss_sum"]), rel=1e-6)
    assert float(smooth["smoothed_loss_sum"]) > 1.2 * float(smooth["loss_sum"])
    assert float(plain["smoothed_loss_sum"]) == float(plain["loss_sum"])


def test_train_step_with_decaying_scheduled_sampling(setup):
    """Linear decay from 1 to 0 over 4 steps: ratio 1 at step 0 (teacher-forced), then below 1
    (predictions fed back), and the losses differ from teacher forcing once the ratio drops."""
    schedule = make_schedule("linear", start=1.0, end=0.0, decay_steps=4)
    step = variant_step(setup, schedule=schedule)
    state, batch = setup["state"], setup["batch"]
    ratios = []
    tf_state = state
    for _ in range(4):
        new_state, m = step(state, batch)
        tf_state, tf_m = setup["step"](tf_state, batch)
        ratios.append(float(m["tf_ratio"]))
        assert bool(m["finite"])
        if ratios[-1] == 1.0:
            assert float(m["loss_sum"]) == pytest.approx(float(tf_m["loss_sum"]), rel=1e-5)
        state = new_state
    assert ratios == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert float(m["loss_sum"]) != pytest.approx(float(tf_m["loss_sum"]), rel=1e-3)


def test_train_step_in_bfloat16_stays_close_to_float32(setup):
    """bfloat16 matmuls, float32 parameters: loss within 2% of float32 over 5 steps; params float32."""
    state, batch = setup["state"], setup["batch"]
    bf16 = variant_step(setup, dtype="bfloat16")
    s32, s16 = state, state
    for _ in range(5):
        s32, m32 = setup["step"](s32, batch)
        s16, m16 = bf16(s16, batch)
        assert float(m16["loss_sum"]) == pytest.approx(float(m32["loss_sum"]), rel=2e-2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))


def test_seq2seq_call_with_default_arguments(setup):
    """Teacher forcing by default: no sampling key needed."""
    model, batch = setup["model"], setup["batch"]
    out = model.apply({"params": setup["state"].params}, batch.src, batch.src_len, batch.tgt_in)
    assert out["logits"].shape == batch.tgt_in.shape + (VOCAB,)


def test_compile_stats_count_only_their_own_compilations():
    from s2s_jax import logbook
    first = logbook.CompileStats()
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(7))
    before_second = first.count
    second = logbook.CompileStats()
    assert before_second >= 1 and second.count == 0 and second.seconds == 0.0
    jax.jit(lambda x: x * 5 - 2)(jnp.ones(9))
    assert second.count >= 1 and first.count == before_second + second.count
