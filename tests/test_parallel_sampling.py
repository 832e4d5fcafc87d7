"""Parallel scheduled sampling (Duckworth et al. 2019): Seq2Seq(parallel_passes=k), train_step's
tf_mode / tf_passes and the teacher_forcing.mode / passes config keys.

References: the model's own teacher-forced pass (argmax shifted by one position), its sequential
scheduled sampling (the same coins), and gradients of teacher forcing on the fed tokens.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, tiny
from s2s_jax import BOS_ID, configuration, data, steps
from s2s_jax.configuration import ConfigError
from s2s_jax.models import Seq2Seq
from s2s_jax.schedules import make_schedule
from tests.test_models import (SRC_V, TGT_V, make_seq2seq, random_source, sampled_path, seq2seq_batch,
                               teacher_forced)


@functools.lru_cache(maxsize=None)
def parallel_entry(model, passes):
    return jax.jit(lambda v, src, src_len, tgt_in, ratio, key: model.apply(
        v, src, src_len, tgt_in, tf_ratio=ratio, sampling_rng=key, parallel_passes=passes))


def parallel(model, params, src, src_len, tgt_in, ratio, key, passes=1):
    out = parallel_entry(model, passes)({"params": params}, src, src_len, jnp.asarray(tgt_in),
                                        jnp.float32(ratio), key)
    return jax.tree.map(np.asarray, out)


def argmax_shifted(model, params, src, src_len, tokens):
    """What a teacher-forced pass on `tokens` predicts for each next position: [B, T - 1]."""
    logits = teacher_forced(model, params, src, src_len, jnp.asarray(tokens))["logits"]
    return np.asarray(logits)[:, :-1].argmax(-1)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("passes", [1, 2])
def test_ratio_one_is_teacher_forcing(passes):
    model, params = make_seq2seq("concat", 2)
    src, src_len, tgt_in = seq2seq_batch(seed=1)
    out = parallel(model, params, src, src_len, tgt_in, 1.0, jax.random.PRNGKey(3), passes)
    fast = teacher_forced(model, params, src, src_len, tgt_in)
    np.testing.assert_array_equal(out["fed_tokens"], np.asarray(tgt_in))
    np.testing.assert_array_equal(out["logits"], np.asarray(fast["logits"]))
    np.testing.assert_array_equal(out["attention"], np.asarray(fast["attention"]))


@pytest.mark.parametrize("attention,decoder_layers", [("none", 1), ("concat", 2)])
def test_ratio_zero_feeds_the_teacher_forced_argmax_of_the_previous_position(attention, decoder_layers):
    model, params = make_seq2seq(attention, decoder_layers)
    src, src_len, tgt_in = seq2seq_batch(seed=2)
    out = parallel(model, params, src, src_len, tgt_in, 0.0, jax.random.PRNGKey(1))
    fed = out["fed_tokens"]
    assert fed.shape == tgt_in.shape and fed.dtype == np.asarray(tgt_in).dtype
    np.testing.assert_array_equal(fed[:, 0], BOS_ID)
    np.testing.assert_array_equal(fed[:, 1:], argmax_shifted(model, params, src, src_len, tgt_in))
    assert np.any(fed[:, 1:] != np.asarray(tgt_in)[:, 1:]), "test is vacuous: predictions == gold"
    # The outputs are those of teacher forcing on the tokens fed.
    replay = teacher_forced(model, params, src, src_len, jnp.asarray(fed))
    np.testing.assert_allclose(out["logits"], np.asarray(replay["logits"]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 512])
def test_chunked_argmax_feeds_what_the_full_logits_feed(chunk):
    """model.output_chunk > 0: the prediction passes take the argmax chunk by chunk (a chunk that
    does not divide B x T, and one larger than it); the tokens fed are the same."""
    model, params = make_seq2seq("general", 2)
    chunked = model.clone(output_chunk=chunk)
    src, src_len, tgt_in = seq2seq_batch(seed=2)
    for passes in (1, 2):
        plain = parallel(model, params, src, src_len, tgt_in, 0.3, jax.random.PRNGKey(5), passes)["fed_tokens"]
        fed = parallel(chunked, params, src, src_len, tgt_in, 0.3, jax.random.PRNGKey(5), passes)["fed_tokens"]
        np.testing.assert_array_equal(fed, plain)
        assert np.any(fed != np.asarray(tgt_in)), "test is vacuous: nothing but gold fed"


def test_second_pass_reads_the_first_pass_mix():
    model, params = make_seq2seq("general")
    src, src_len, tgt_in = seq2seq_batch(seed=2)
    key = jax.random.PRNGKey(1)
    first = parallel(model, params, src, src_len, tgt_in, 0.0, key, passes=1)["fed_tokens"]
    second = parallel(model, params, src, src_len, tgt_in, 0.0, key, passes=2)["fed_tokens"]
    np.testing.assert_array_equal(second[:, 0], BOS_ID)
    np.testing.assert_array_equal(second[:, 1:], argmax_shifted(model, params, src, src_len, first))
    assert np.any(second != first), "test is vacuous: the second pass changed nothing"


def test_as_many_passes_as_positions_feed_what_sequential_sampling_feeds():
    """Same key, same coins: after T passes every position reads a prediction made on the inputs
    sequential sampling feeds (both without dropout)."""
    model, params = make_seq2seq("general")
    src, src_len, tgt_in = seq2seq_batch(seed=5)
    key = jax.random.PRNGKey(7)
    logits, _, fed = sampled_path(model, params, src, src_len, tgt_in, 0.5, key)
    out = parallel(model, params, src, src_len, tgt_in, 0.5, key, passes=tgt_in.shape[1])
    np.testing.assert_array_equal(out["fed_tokens"], np.asarray(fed))
    np.testing.assert_allclose(out["logits"], np.asarray(logits), rtol=1e-5, atol=1e-5)
    assert np.any(np.asarray(fed) != np.asarray(tgt_in)), "test is vacuous: only gold was fed"


def test_mixed_tokens_follow_the_coin():
    model, params = make_seq2seq("general")
    # Gold tokens come from a set the model can never predict (their output bias is -1e4), so
    # "fed == gold" happens exactly when the coin chose the ground truth.
    gold_set = np.array([5, 6, 7, 8])
    params = jax.tree.map(lambda x: x, params)  # a copy: the cached params stay as they are
    params["decoder"]["b_out"] = params["decoder"]["b_out"].at[gold_set].set(-1e4)
    rng = np.random.default_rng(4)
    batch, width = 256, 9
    src_len = rng.integers(1, 6, size=batch)
    src, src_len = jnp.asarray(random_source(rng, src_len, 5, pad_garbage=False)), jnp.asarray(src_len)
    tgt_in = rng.choice(gold_set, size=(batch, width)).astype(np.int32)
    tgt_in[:, 0] = BOS_ID
    for ratio, low, high in ((0.5, 0.46, 0.54), (0.2, 0.17, 0.23), (0.0, 0.0, 0.0)):
        key = jax.random.PRNGKey(5)
        fed = parallel(model, params, src, src_len, tgt_in, ratio, key)["fed_tokens"]
        np.testing.assert_array_equal(fed[:, 0], BOS_ID)
        gold_fed = fed[:, 1:] == tgt_in[:, 1:]
        assert low <= gold_fed.mean() <= high, (ratio, gold_fed.mean())
        # The coins of sequential sampling for the same key.
        sequential = np.asarray(sampled_path(model, params, src, src_len, jnp.asarray(tgt_in), ratio, key)[2])
        np.testing.assert_array_equal(gold_fed, sequential[:, 1:] == tgt_in[:, 1:])
    other = parallel(model, params, src, src_len, tgt_in, 0.5, jax.random.PRNGKey(6))["fed_tokens"]
    assert np.any(other != parallel(model, params, src, src_len, tgt_in, 0.5, key)["fed_tokens"])


def test_no_gradient_flows_through_the_prediction_passes():
    """The gradient is that of teacher forcing on the fed tokens, and finite."""
    model, params = make_seq2seq("general")
    src, src_len, tgt_in = seq2seq_batch(seed=2)
    key = jax.random.PRNGKey(1)

    def loss(params, tgt_in, passes):
        out = model.apply({"params": params}, src, src_len, tgt_in, tf_ratio=jnp.float32(0.5),
                          sampling_rng=key, parallel_passes=passes, fast_path_only=passes == 0)
        return jnp.sum(jax.nn.log_softmax(out["logits"])[..., 4]), out["fed_tokens"]

    grads, fed = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)(params, tgt_in, 2)
    assert np.any(np.asarray(fed) != np.asarray(tgt_in)), "test is vacuous: only gold was fed"
    reference, _ = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)(params, fed, 0)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_parallel_needs_rng():
    model, params = make_seq2seq("general")
    src, src_len, tgt_in = seq2seq_batch()
    with pytest.raises(ValueError, match="sampling_rng"):
        jax.eval_shape(lambda: model.apply({"params": params}, src, src_len, tgt_in, tf_ratio=0.5,
                                           fast_path_only=True, parallel_passes=1))


# ----------------------------------------------------------------------------- train_step
@functools.lru_cache(maxsize=None)
def _train_setup(output_chunk):
    model = Seq2Seq(SRC_V, TGT_V, embed_dim=6, encoder_hidden=4, decoder_hidden=8, dropout_rate=0.3,
                    output_chunk=output_chunk)
    opt = default.get_config().optimizer
    opt.update(learning_rate=1e-2, warmup_steps=0, decay="constant", b1=0.9, b2=0.999, clip_norm=1.0,
               label_smoothing=0.1)
    config = ml_collections.ConfigDict(dict(seed=0, num_train_steps=10, optimizer=opt,
                                            data=dict(bucket_boundaries=(6,))))
    src, src_len, tgt_in = seq2seq_batch(seed=3)
    tgt_out = np.roll(np.asarray(tgt_in), -1, axis=1)
    batch = data.Batch(src, src_len, tgt_in, jnp.asarray(tgt_out), jnp.arange(len(src_len)))
    return model, steps.init_state(model, config.optimizer, config.num_train_steps, config.seed), batch


# The teacher-forcing ratio is 1.0 at step 0 and 0.5 at step 1: one compiled step serves both.
RATIO_AT_STEP = {1.0: 0, 0.5: 1}


@functools.lru_cache(maxsize=None)
def _jit_step(model, fast_path_only, tf_mode="sequential", tf_passes=1):
    return jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=make_schedule("linear", start=1.0, end=0.0, decay_steps=2),
        fast_path_only=fast_path_only, label_smoothing=0.1, base_rng=jax.random.PRNGKey(9),
        tf_mode=tf_mode, tf_passes=tf_passes))


def _step(model, state, batch, ratio, **kwargs):
    return _jit_step(model, **kwargs)(state.replace(step=jnp.int32(RATIO_AT_STEP[ratio])), batch)


def test_train_step_at_ratio_one_is_the_teacher_forced_step():
    """With dropout and the fused output layer: the same update bit for bit."""
    model, state, batch = _train_setup(output_chunk=4)
    fast_state, fast = _step(model, state, batch, 1.0, fast_path_only=True)
    new_state, metrics = _step(model, state, batch, 1.0, fast_path_only=False, tf_mode="parallel")
    assert float(metrics["tf_ratio"]) == 1.0
    for key in ("loss_sum", "smoothed_loss_sum", "tokens", "grad_norm"):
        np.testing.assert_array_equal(np.asarray(metrics[key]), np.asarray(fast[key]), err_msg=key)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(fast_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_step_parallel_at_ratio_half():
    model, state, batch = _train_setup(output_chunk=4)
    # The same step (same dropout) on the teacher-forced path, which never mixes.
    _, fast = _step(model, state, batch, 0.5, fast_path_only=True)
    new_state, metrics = _step(model, state, batch, 0.5, fast_path_only=False, tf_mode="parallel")
    assert bool(metrics["finite"]) and float(metrics["tf_ratio"]) == 0.5
    assert float(metrics["tokens"]) == float(fast["tokens"])
    assert float(metrics["loss_sum"]) != float(fast["loss_sum"]), "the inputs were not mixed"
    assert any(np.any(np.asarray(a) != np.asarray(b))
               for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("key, value, message", [
    ("mode", "beam", "config: teacher_forcing.mode='beam' is not one of ('sequential', 'parallel')"),
    ("passes", 0, "config: teacher_forcing.passes=0 must be a positive integer"),
])
def test_mode_and_passes_are_checked(key, value, message):
    config = tiny.get_config()
    config.teacher_forcing[key] = value
    with pytest.raises(ConfigError) as info:
        configuration.check(config)
    assert str(info.value) == message


def test_defaults_are_sequential_with_one_pass():
    config = tiny.get_config()
    assert (config.teacher_forcing.mode, config.teacher_forcing.passes) == ("sequential", 1)
    config.teacher_forcing.update(mode="parallel", passes=3)
    configuration.check(config)


@pytest.mark.parametrize("key, value", [("mode", "parallel"), ("passes", 2)])
def test_mode_and_passes_change_the_trajectory(tmp_path, key, value):
    config = tiny.get_config()
    config.teacher_forcing.update(schedule="linear", start=0.9)
    configuration.save(config, str(tmp_path))
    assert not configuration._is_free(f"teacher_forcing.{key}", config)
    config.teacher_forcing[key] = value
    with pytest.raises(ConfigError, match=f"teacher_forcing.{key}: "):
        configuration.check_workdir(config, str(tmp_path))
