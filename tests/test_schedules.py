"""Tests for s2s_jax.schedules: values computed by hand from the formulas, in plain Python."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import schedules
from s2s_jax.schedules import make_schedule


def values(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_constant():
    schedule = make_schedule("constant", start=0.75, end=0.0)
    assert values(schedule, [0, 1, 10, 10_000]) == pytest.approx([0.75] * 4, abs=1e-7)
    assert float(make_schedule("constant")(123)) == 1.0  # default: always ground truth


def test_linear_decays_then_clamps_at_end():
    schedule = make_schedule("linear", start=1.0, end=0.2, decay_steps=100)
    # 1 - 0.8 * step / 100 until step 100, then 0.2 for ever.
    expected = [1.0, 1.0 - 0.8 * 0.01, 0.6, 1.0 - 0.8 * 0.75, 0.2, 0.2, 0.2]
    assert values(schedule, [0, 1, 50, 75, 100, 101, 1_000_000]) == pytest.approx(expected, abs=1e-6)


def test_linear_single_step_decay():
    schedule = make_schedule("linear", start=0.9, end=0.1, decay_steps=1)
    assert values(schedule, [0, 1, 2]) == pytest.approx([0.9, 0.1, 0.1], abs=1e-6)


def test_linear_moves_towards_a_larger_end():
    """"All schedules move from start towards end": an increasing ramp clamps at end too."""
    schedule = make_schedule("linear", start=0.2, end=0.8, decay_steps=10)
    assert values(schedule, [0, 5, 10, 20]) == pytest.approx([0.2, 0.5, 0.8, 0.8], abs=1e-6)


def test_exponential():
    k, start, end = 0.99, 0.9, 0.1
    schedule = make_schedule("exponential", start=start, end=end, k=k)
    steps = [0, 1, 10, 100, 1000]
    expected = [end + (start - end) * k ** step for step in steps]
    assert values(schedule, steps) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected[0] == pytest.approx(start) and expected[-1] == pytest.approx(end, abs=1e-4)


def test_inverse_sigmoid():
    k, start, end = 50.0, 1.0, 0.0
    schedule = make_schedule("inverse_sigmoid", start=start, end=end, k=k)
    steps = [0, 10, 100, 200, 400]
    expected = [end + (start - end) * k / (k + math.exp(step / k)) for step in steps]
    assert values(schedule, steps) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Monotone decreasing towards end; far out it reaches end without overflowing to NaN.
    assert all(a > b for a, b in zip(expected, expected[1:]))
    far = float(schedule(100_000))
    assert math.isfinite(far) and far == pytest.approx(end, abs=1e-6)


def test_inverse_sigmoid_with_nonzero_end():
    k, start, end = 10.0, 0.8, 0.3
    schedule = make_schedule("inverse_sigmoid", start=start, end=end, k=k)
    for step in (0, 5, 30, 60):
        assert float(schedule(step)) == pytest.approx(end + (start - end) * k / (k + math.exp(step / k)),
                                                      rel=1e-5)


@pytest.mark.parametrize("kind,kwargs", [
    ("constant", dict(start=0.6)),
    ("linear", dict(start=1.0, end=0.0, decay_steps=40)),
    ("exponential", dict(start=1.0, end=0.1, k=0.95)),
    ("inverse_sigmoid", dict(start=1.0, end=0.0, k=8.0)),
])
def test_jit_with_traced_step_matches_python(kind, kwargs):
    schedule = make_schedule(kind, **kwargs)
    jitted = jax.jit(schedule)
    for step in (0, 3, 17, 40, 90):
        traced = jitted(jnp.int32(step))
        assert traced.dtype == jnp.float32 and traced.shape == ()
        assert float(traced) == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-7)
    # Vectorised over an array of steps, too.
    steps = jnp.arange(0, 60, 7)
    np.testing.assert_allclose(np.asarray(jax.jit(schedule)(steps)), values(schedule, np.asarray(steps)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,kwargs,match", [
    ("cosine", dict(), "unknown"),
    ("constant", dict(start=1.5), "start/end"),
    ("linear", dict(start=1.0, end=-0.1, decay_steps=10), "start/end"),
    ("exponential", dict(start=float("nan")), "start/end"),
    ("linear", dict(decay_steps=0), "decay_steps"),
    ("linear", dict(decay_steps=-5), "decay_steps"),
    ("exponential", dict(k=1.0), "0 < k < 1"),
    ("exponential", dict(k=0.0), "0 < k < 1"),
    ("exponential", dict(k=1.5), "0 < k < 1"),
    ("inverse_sigmoid", dict(k=0.5), "k >= 1"),
])
def test_bad_parameters_raise(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(kind, **kwargs)


def test_is_always_one():
    assert schedules.is_always_one("constant", 1.0)
    assert not schedules.is_always_one("constant", 0.9)
    assert not schedules.is_always_one("linear", 1.0)


def _config(schedule, k, num_train_steps=1000, start=1.0, end=0.0, decay_steps=100):
    from configs import tiny
    config = tiny.get_config()
    config.num_train_steps = num_train_steps
    config.teacher_forcing.update(schedule=schedule, k=k, start=start, end=end, decay_steps=decay_steps)
    return config


@pytest.mark.parametrize("num_train_steps", [1, 2, 10, 300, 12_000, 10**9])
def test_auto_k_solves_its_equations(num_train_steps):
    half = num_train_steps / 2
    k = schedules.auto_k("inverse_sigmoid", num_train_steps)
    assert k > 1.0 and k * math.log(k) == pytest.approx(half, rel=1e-9)
    assert schedules.auto_k("exponential", num_train_steps) ** half == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("schedule", ["exponential", "inverse_sigmoid"])
@pytest.mark.parametrize("num_train_steps", [300, 12_000])
def test_from_config_auto_k_is_halfway_at_half_the_run(schedule, num_train_steps):
    config = _config(schedule, schedules.AUTO_K, num_train_steps, start=0.8, end=0.2)
    assert schedules.uses_num_train_steps(config.teacher_forcing)
    ratio = schedules.from_config(config.teacher_forcing, config.num_train_steps)
    assert float(ratio(num_train_steps // 2)) == pytest.approx(0.5, abs=1e-4)
    assert float(ratio(0)) == pytest.approx(0.8, abs=0.015)
    assert float(ratio(num_train_steps)) < 0.36  # exponential: a quarter of the span left; sigmoid less


@pytest.mark.parametrize("schedule, k, kwargs", [
    ("inverse_sigmoid", 500.0, dict(k=500.0)),
    ("exponential", 0.99, dict(k=0.99)),
    ("linear", 0.0, dict(decay_steps=100)),
    ("constant", 0.0, dict()),
])
def test_from_config_honours_an_explicit_k_and_ignores_num_train_steps(schedule, k, kwargs):
    config = _config(schedule, k, start=0.8, end=0.2)
    assert not schedules.uses_num_train_steps(config.teacher_forcing)
    expected = make_schedule(schedule, start=0.8, end=0.2, **kwargs)
    for num_train_steps in (1000, 50):
        ratio = schedules.from_config(config.teacher_forcing, num_train_steps)
        assert values(ratio, [0, 10, 400]) == values(expected, [0, 10, 400])
