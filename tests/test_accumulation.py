"""Gradient accumulation (optimizer.accumulate_steps): k micro-batches in one jitted step give the
update of k = 1 on the same batch. Reference: the same steps with k = 1 (label smoothing and
scheduled sampling on, so the micro-batches must get the whole batch's sampling coins and the
loss must be normalised over the whole batch's tokens)."""
import functools

import jax
import numpy as np
import pytest

from configs import tiny
from s2s_jax import configuration, data, steps
from s2s_jax.models import make_model
from s2s_jax.schedules import make_schedule

VOCAB, ROWS, LENGTH, STEPS = 20, 16, 8, 4


@pytest.fixture(scope="module")
def setup():
    config = tiny.get_config()
    config.optimizer.warmup_steps = 0  # the full rate from the first step: the parameters move
    config.optimizer.learning_rate = 3e-3  # far enough for the checks below
    model = make_model(config.model, VOCAB, VOCAB)
    src, tgt = data.synthetic_task("reverse", ROWS * 2, VOCAB, 2, LENGTH - 1, seed=0)
    # Rows of different lengths: the micro-batches hold different numbers of target tokens.
    batches = [data.make_batch(src, tgt, list(range(i * ROWS, (i + 1) * ROWS)), batch_size=ROWS, length=LENGTH)
               for i in range(2)]
    return config, model, batches


def run(setup, k: int, mode: str):
    """The state after STEPS steps (label smoothing 0.1, scheduled sampling from ratio 0.6)."""
    config, model, batches = setup
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=make_schedule("linear", start=0.6, end=0.2, decay_steps=10),
        fast_path_only=False, label_smoothing=0.1, base_rng=jax.random.PRNGKey(0), tf_mode=mode,
        accumulate_steps=k))
    state = steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)
    sums = []
    for i in range(STEPS):
        state, metrics = step(state, batches[i % 2])
        assert bool(metrics["finite"])
        sums.append((float(metrics["smoothed_loss_sum"]), float(metrics["tokens"])))
    return state, sums


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup, 1, "sequential")


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_update_equals_one_batch(setup, reference, k):
    want, want_sums = reference
    got, got_sums = run(setup, k, "sequential")
    assert [n for _, n in got_sums] == [n for _, n in want_sums]
    np.testing.assert_allclose([s for s, _ in got_sums], [s for s, _ in want_sums], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # The parameters moved: equality is not that of two untouched states.
    init = steps.init_state(setup[1], setup[0].optimizer, 1, setup[0].seed)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got.params),
                                                          jax.tree.leaves(init.params))) > 1e-2


def test_micro_batches_take_strided_rows():
    rows = np.arange(12)[:, None] * 10 + np.arange(3)          # [12, 3], row r holds 10 r + column
    parts = np.asarray(steps.micro_batches(rows, 3))           # [3, 4, 3]
    assert parts.shape == (3, 4, 3)
    assert [list(part[:, 0] // 10) for part in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_batch_size_must_divide_by_the_micro_batches():
    config = tiny.get_config()
    config.optimizer.accumulate_steps = 3
    with pytest.raises(configuration.ConfigError, match=r"data.batch_size=32 .* optimizer.accumulate_steps=3"):
        configuration.check(config)
    config.optimizer.accumulate_steps = 0
    with pytest.raises(configuration.ConfigError, match="optimizer.accumulate_steps=0 must be a positive integer"):
        configuration.check(config)
