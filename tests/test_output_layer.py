"""Tests for s2s_jax.output_layer: the fused, chunked projection + cross-entropy.

References: `steps.cross_entropy` of `ops.matmul` logits and its autodiff gradients (float64),
central finite differences, and a whole `steps.train_step` / `eval_step` with output_chunk = 0.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from s2s_jax import BOS_ID, PAD_ID, data, ops, output_layer, schedules, steps
from s2s_jax.models import make_model
from s2s_jax.ops import matmul


def random_layer(rng, n, hidden, vocab):
    """x [n, H], w [H, V], b [V], targets [n] with PAD (and BOS) among them."""
    x = jnp.asarray(rng.normal(size=(n, hidden)))
    w = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden))
    b = jnp.asarray(rng.normal(size=(vocab,)))
    targets = rng.integers(0, vocab, n)
    targets[::5] = PAD_ID
    targets[1] = BOS_ID
    return x, w, b, jnp.asarray(targets)


def weighted(loss_fn, label_smoothing, **kwargs):
    """x, w, b, targets -> 0.3 nll_sum + 0.7 smoothed_sum (both outputs get a cotangent)."""
    def f(x, w, b, targets):
        nll, smoothed, tokens = loss_fn(x, w, b, targets, label_smoothing, **kwargs)
        return 0.3 * nll + 0.7 * smoothed, (nll, smoothed, tokens)
    return f


def plain(x, w, b, targets, label_smoothing):
    return steps.cross_entropy(matmul(x, w, x.dtype) + b, targets, label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_matches_plain_autodiff_float64(label_smoothing):
    with jax.enable_x64(True):
        x, w, b, targets = random_layer(np.random.default_rng(0), 37, 8, 11)  # 37 = 2 x 16 + 5
        grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
        (_, want), want_grads = grad(weighted(plain, label_smoothing))(x, w, b, targets)
        fused = weighted(output_layer.cross_entropy, label_smoothing, chunk=16, dtype=jnp.float64)
        (_, got), got_grads = jax.jit(grad(fused))(x, w, b, targets)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert float(got[2]) == np.sum(np.asarray(targets) != PAD_ID)
        for g, r in zip(got_grads, want_grads):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_fused_accepts_batch_shapes_and_chunks_larger_than_the_batch():
    x, w, b, targets = random_layer(np.random.default_rng(1), 12, 4, 7)
    want = plain(x, w, b, targets, 0.1)
    got = output_layer.cross_entropy(x.reshape(3, 4, 4), w, b, targets.reshape(3, 4), 0.1, chunk=512)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_argmax_equals_the_argmax_of_the_logits(chunk):
    rng = np.random.default_rng(3)
    vectors = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32), jnp.asarray(rng.normal(size=(50,)), jnp.float32)
    best = output_layer.argmax(vectors, w, b, chunk)
    assert best.shape == (3, 7) and best.dtype == jnp.int32
    reference = (np.asarray(vectors, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)).argmax(-1)
    np.testing.assert_array_equal(np.asarray(best), reference)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_argmax_of_needed_tokens_only(chunk):
    """`needed`: those tokens get the logits' argmax, wherever they are; the others read 0 (the
    reference's argmax is never 0 here, so a token projected by mistake would show)."""
    rng = np.random.default_rng(4)
    vectors = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32), jnp.asarray(rng.normal(size=(50,)), jnp.float32)
    b = b.at[0].set(-1e4)
    reference = (np.asarray(vectors, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)).argmax(-1)
    for needed in (rng.random((3, 7)) < 0.4, np.zeros((3, 7), bool), np.ones((3, 7), bool)):
        best = np.asarray(jax.jit(output_layer.argmax, static_argnums=(3, 4))(vectors, w, b, chunk, jnp.float32,
                                                                          jnp.asarray(needed)))
        np.testing.assert_array_equal(best, np.where(needed, reference, 0))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_gradients_match_finite_differences(label_smoothing):
    with jax.enable_x64(True):
        x, w, b, targets = random_layer(np.random.default_rng(2), 7, 3, 6)
        loss = weighted(output_layer.cross_entropy, label_smoothing, chunk=3, dtype=jnp.float64)
        check_grads(lambda *p: loss(*p, targets)[0], (x, w, b), order=1, modes=["rev"], eps=1e-6)


# (attention, input feeding, bidirectional, encoder layers): each setting of each axis once. The
# fused layer sees only the decoder's output vectors; its own gradients are checked above.
MODELS = [("general", False, True, 1), ("concat", True, False, 2)]


@pytest.mark.parametrize("attention,input_feeding,bidirectional,encoder_layers", MODELS)
def test_train_step_fused_equals_plain(tiny_config, attention, input_feeding, bidirectional,
                                       encoder_layers):
    """One train step with dropout and label smoothing: same losses, nearly the same parameters."""
    config = tiny_config
    config.model.update(attention=attention, input_feeding=input_feeding, bidirectional=bidirectional,
                        encoder_layers=encoder_layers, dropout=0.3)
    vocab, batch_size, length = 24, 7, 12                                # 84 targets, chunk 40
    rng = np.random.default_rng(3)
    src_len = rng.integers(2, length + 1, batch_size)
    src = np.where(np.arange(length) < src_len[:, None], rng.integers(4, vocab, (batch_size, length)), PAD_ID)
    tgt = rng.integers(4, vocab, (batch_size, length + 1))
    tgt[:, 0] = BOS_ID
    tgt[np.arange(length + 1) > rng.integers(3, length + 1, batch_size)[:, None]] = PAD_ID
    batch = data.Batch(*(jnp.asarray(a, jnp.int32) for a in
                         (src, src_len, tgt[:, :-1], tgt[:, 1:], np.arange(batch_size))))
    results = []
    for chunk in (40, 0):
        config.model.output_chunk = chunk
        model = make_model(config.model, vocab, vocab)
        state = steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)
        train_step = jax.jit(functools.partial(
            steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant"),
            fast_path_only=True, label_smoothing=0.1, base_rng=jax.random.PRNGKey(5)))
        state, metrics = train_step(state, batch)
        dev = jax.jit(functools.partial(steps.eval_step, model=model))(state.params, batch)
        results.append((state.params, metrics, dev))
    (fused, fused_metrics, fused_dev), (want, want_metrics, want_dev) = results
    for key in ("loss_sum", "smoothed_loss_sum", "tokens", "grad_norm"):
        np.testing.assert_allclose(fused_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(fused_dev, want_dev, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), fused, want)


def confident_layer(rng, n, vocab):
    """x [n, V], w [V, V], b [V], targets [n] (some PAD) with p(target) > 0.997 for every token."""
    targets = rng.integers(len(ops.NEVER_TARGETS), vocab, n)
    targets[::7] = PAD_ID
    w = np.eye(vocab) + 0.05 * rng.normal(size=(vocab, vocab))
    x = 10.0 * np.eye(vocab)[targets] + 0.05 * rng.normal(size=(n, vocab))
    return (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.zeros((vocab,), jnp.float32),
            jnp.asarray(targets))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_bfloat16_gradients_on_confident_targets(label_smoothing):
    """bf16 matmuls round p(target) ~ 0.999 to 1; p - onehot must be taken before that rounding."""
    x, w, b, targets = confident_layer(np.random.default_rng(4), 64, 32)
    grad = functools.partial(jax.grad, argnums=(0, 1, 2), has_aux=True)
    want, _ = grad(weighted(plain, label_smoothing))(x, w, b, targets)
    fused = weighted(output_layer.cross_entropy, label_smoothing, chunk=16, dtype=jnp.bfloat16)
    got, _ = jax.jit(grad(fused))(x, w, b, targets)
    for name, g, r in zip(("x", "w", "b"), got, want):
        assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 0.1, name
