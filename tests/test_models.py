"""Tests for s2s_jax.models against independent references.

References: a float64 numpy LSTM (gate order i, f, g, o; forget-gate bias is just a parameter),
a numpy bidirectional / multi-layer encoder that slices each sentence to its length (so padding
cannot matter by construction), a numpy Luong decoder with input feeding, central finite
differences in float64, and the model's own one-token `decode_step` for teacher forcing.
Parameters are random normal (not the initialisers), so zero-initialised biases are exercised.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import BOS_ID, PAD_ID
from s2s_jax.models import Encoder, Seq2Seq, lstm_cell, reverse_padded

SRC_V, TGT_V, E, HE, HD, A = 11, 13, 6, 4, 8, 5  # vocabularies, embed, encoder/dir, decoder, concat


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_params(init_fn, *args, seed):
    """Parameters with the module's structure (from jax.eval_shape: nothing is compiled), filled
    with random normal values: biases that are zero at init are exercised too."""
    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0), *args)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    scale = lambda shape: shape[0] ** -0.5 if len(shape) == 2 else 0.3  # noqa: E731
    leaves = [jnp.asarray(scale(x.shape) * rng.normal(size=x.shape), jnp.float32) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


def np64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ----------------------------------------------------------------------------- numpy references
def np_cell(z, h, c):
    """z = W_i x + W_h h + b [4H] -> (h, c)."""
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def np_lstm(xs, p):
    """xs [L, D] (real tokens only) -> outputs [L, H], final h [H]."""
    hidden = p["w_h"].shape[0]
    h = c = np.zeros(hidden)
    outputs = []
    for x in xs:
        h, c = np_cell(x @ p["w_i"] + h @ p["w_h"] + p["bias"], h, c)
        outputs.append(h)
    return np.stack(outputs), h


def np_encoder(p, src_row, length, num_layers, bidirectional, reverse_source):
    """One sentence -> memory [length, out], final [out] (last layer: fw last h, bw last h)."""
    x = p["Embed_0"]["embedding"][src_row[:length]]
    if reverse_source:
        x = x[::-1]
    for layer in range(num_layers):
        forward, h_fw = np_lstm(x, p[f"layer{layer}_fw"])
        outputs, finals = [forward], [h_fw]
        if bidirectional:
            backward, h_bw = np_lstm(x[::-1], p[f"layer{layer}_bw"])
            outputs.append(backward[::-1])
            finals.append(h_bw)
        x = np.concatenate(outputs, -1)
    if reverse_source:
        x = x[::-1]
    return x, np.concatenate(finals)


def np_score(kind, p, q, keys_raw):
    """Scores [S] of one query [Hd] against memory values [S, He]."""
    if kind == "dot":
        return keys_raw @ q
    if kind == "scaled_dot":
        return keys_raw @ q / np.sqrt(len(q))
    if kind == "general":
        return keys_raw @ p["w"] @ q
    if kind == "concat":
        return np.tanh(q @ p["w_query"] + keys_raw @ p["w_memory"] + p["bias"]) @ p["v"]
    raise AssertionError(kind)


def np_decoder_logits(p, memory, final, tgt_row, *, layers, attention, input_feeding):
    """Luong decoder with input feeding, teacher forced on tgt_row: log-probs [T, V]."""
    hidden = p["w_h0"].shape[0]
    hc = np.tanh(final @ p["bridge"]["kernel"] + p["bridge"]["bias"]).reshape(2, layers, hidden)
    h, c = list(hc[0]), list(hc[1])
    feed = np.zeros(hidden)
    out = []
    for token in tgt_row:
        z = p["embedding"][token] @ p["w_embed"] + p["bias0"]
        if input_feeding and attention != "none":
            z = z + feed @ p["w_feed"]
        x = None
        for layer in range(layers):
            if layer > 0:
                z = x @ p[f"w_i{layer}"] + p[f"bias{layer}"]
            h[layer], c[layer] = np_cell(z + h[layer] @ p[f"w_h{layer}"], h[layer], c[layer])
            x = h[layer]
        if attention == "none":
            vector = x
        else:
            e = np_score(attention, p.get("attention_params", {}), x, memory)
            weights = np.exp(e - e.max())
            weights /= weights.sum()
            vector = np.tanh(np.concatenate([weights @ memory, x]) @ p["w_combine"])
        feed = vector
        logits = vector @ p["w_out"] + p["b_out"]
        out.append(logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    return np.stack(out)


# ----------------------------------------------------------------------------- lstm_cell
def test_lstm_cell_matches_numpy():
    rng = np.random.default_rng(0)
    gates_in, h, c = rng.normal(size=(3, 16)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    w_h = rng.normal(size=(4, 16))
    h_new, c_new = lstm_cell(*(jnp.asarray(a, jnp.float32) for a in (gates_in, h, c, w_h)), jnp.float32)
    ref_h, ref_c = np_cell(gates_in + h @ w_h, h, c)
    np.testing.assert_allclose(np.asarray(h_new), ref_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c_new), ref_c, rtol=1e-5, atol=1e-6)


def test_lstm_cell_gradient_matches_finite_differences_float64():
    rng = np.random.default_rng(1)
    args = [rng.normal(size=(2, 12)), rng.normal(size=(2, 3)), rng.normal(size=(2, 3)),
            rng.normal(size=(3, 12))]
    r_h, r_c = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    eps = 1e-6
    with jax.enable_x64(True):
        @jax.jit
        def loss(gates_in, h, c, w_h):
            h_new, c_new = lstm_cell(gates_in, h, c, w_h, jnp.float64)
            return jnp.sum(h_new * r_h) + jnp.sum(c_new * r_c)

        jargs = [jnp.asarray(a, jnp.float64) for a in args]
        assert loss(*jargs).dtype == jnp.float64
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*jargs)
        for k, (arg, grad) in enumerate(zip(args, grads)):
            fd = np.zeros_like(arg)
            for index in np.ndindex(arg.shape):
                step = np.zeros_like(arg)
                step[index] = eps
                plus = [jnp.asarray(arg + step) if i == k else a for i, a in enumerate(jargs)]
                minus = [jnp.asarray(arg - step) if i == k else a for i, a in enumerate(jargs)]
                fd[index] = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
            np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-8, err_msg=f"argument {k}")


# ----------------------------------------------------------------------------- reverse_padded
def test_reverse_padded_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    lengths = np.array([6, 3, 0, 1])
    expected = x.copy()
    for b, n in enumerate(lengths):
        expected[b, :n] = x[b, :n][::-1]
    np.testing.assert_array_equal(np.asarray(reverse_padded(jnp.asarray(x), jnp.asarray(lengths))), expected)
    # Also on [B, S] integer arrays, and it is its own inverse.
    ids = jnp.asarray(rng.integers(4, 20, size=(4, 6)))
    once = reverse_padded(ids, jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(reverse_padded(once, jnp.asarray(lengths))), np.asarray(ids))


# ----------------------------------------------------------------------------- encoder
def random_source(rng, lengths, width, vocab=SRC_V, pad_garbage=True):
    """[B, width] ids; padding positions hold random real-looking tokens unless pad_garbage=False."""
    src = rng.integers(4, vocab, size=(len(lengths), width))
    if not pad_garbage:
        src[np.arange(width)[None, :] >= np.asarray(lengths)[:, None]] = PAD_ID
    return src.astype(np.int32)


def init_encoder(num_layers, bidirectional, reverse_source, seed=0):
    enc = Encoder(SRC_V, E, HE, num_layers, bidirectional, reverse_source)
    dummy = jnp.ones((1, 3), jnp.int32)
    return enc, random_params(enc.init, dummy, jnp.ones((1,), jnp.int32), seed=seed + 100)


@functools.lru_cache(maxsize=None)
def encoder_apply(num_layers, bidirectional, reverse_source):
    """Jitted Encoder.apply, shared by the tests (one compilation per setting and shape)."""
    return jax.jit(Encoder(SRC_V, E, HE, num_layers, bidirectional, reverse_source).apply)


ENCODERS = [(1, True, False), (2, True, False), (1, False, False),
            (1, True, True), (2, True, True), (1, False, True)]
ENC_LENGTHS = np.array([5, 2, 1, 4])


@pytest.mark.parametrize("num_layers,bidirectional,reverse_source", ENCODERS)
def test_encoder_matches_numpy_reference_and_ignores_padding(num_layers, bidirectional, reverse_source):
    _, params = init_encoder(num_layers, bidirectional, reverse_source)
    apply = encoder_apply(num_layers, bidirectional, reverse_source)
    rng = np.random.default_rng(3)
    src = random_source(rng, ENC_LENGTHS, 5)  # padding positions hold random real-looking tokens
    memory, final = apply({"params": params}, jnp.asarray(src), jnp.asarray(ENC_LENGTHS))
    out = HE * (2 if bidirectional else 1)
    assert memory.shape == (4, 5, out) and final.shape == (4, out)
    p = np64(params)
    for b, n in enumerate(ENC_LENGTHS):
        ref_memory, ref_final = np_encoder(p, src[b], n, num_layers, bidirectional, reverse_source)
        np.testing.assert_allclose(np.asarray(memory[b, :n]), ref_memory, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(final[b]), ref_final, rtol=2e-5, atol=2e-6)
        assert np.all(np.asarray(memory[b, n:]) == 0.0), "memory must be zero at padding"

    # Four more padding columns of garbage: nothing changes at real positions (carry frozen).
    longer = np.concatenate([src, rng.integers(4, SRC_V, size=(4, 4)).astype(np.int32)], axis=1)
    memory_long, final_long = apply({"params": params}, jnp.asarray(longer), jnp.asarray(ENC_LENGTHS))
    np.testing.assert_allclose(np.asarray(memory_long[:, :5]), np.asarray(memory), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(final_long), np.asarray(final), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(memory_long[:, 5:]) == 0.0)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, True), (2, True), (1, False)])
def test_reverse_source_aligns_memory_with_source_order(num_layers, bidirectional):
    """reverse_source=True on src == reverse_source=False on the reversed src, un-reversed."""
    _, params = init_encoder(num_layers, bidirectional, True, seed=2)  # same params for both
    rev, plain = encoder_apply(num_layers, bidirectional, True), encoder_apply(num_layers, bidirectional, False)
    rng = np.random.default_rng(5)
    lengths = jnp.asarray(ENC_LENGTHS)
    src = jnp.asarray(random_source(rng, ENC_LENGTHS, 5, pad_garbage=False))
    memory, final = rev({"params": params}, src, lengths)
    memory_ref, final_ref = plain({"params": params}, reverse_padded(src, lengths), lengths)
    np.testing.assert_allclose(np.asarray(memory), np.asarray(reverse_padded(memory_ref, lengths)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(final), np.asarray(final_ref), rtol=1e-6, atol=1e-7)
    # And the two settings really differ (the source is read in another order).
    memory_plain, _ = plain({"params": params}, src, lengths)
    assert not np.allclose(np.asarray(memory_plain[0]), np.asarray(memory[0]), atol=1e-3)


# ----------------------------------------------------------------------------- Seq2Seq
# Models and jitted entry points are cached so that tests sharing a model share its compilations.
@functools.lru_cache(maxsize=None)
def make_seq2seq(attention, decoder_layers=1, input_feeding=True, seed=0):
    model = Seq2Seq(SRC_V, TGT_V, embed_dim=E, encoder_hidden=HE, encoder_layers=1,
                    bidirectional=True, decoder_hidden=HD, decoder_layers=decoder_layers,
                    attention=attention, attention_dim=A, input_feeding=input_feeding)
    dummy = jnp.ones((1, 3), jnp.int32)
    return model, random_params(functools.partial(model.init, fast_path_only=True), dummy,
                                jnp.ones((1,), jnp.int32), dummy, seed=seed + 200)


def _sampled_method(m, src, src_len, tgt_in, ratio, rng):
    """Decoder.scheduled_sampling itself, bypassing the lax.cond router."""
    memory, state = m.encode(src, src_len)
    return m.decoder.scheduled_sampling(tgt_in, state, memory, ratio, rng, False)


@functools.lru_cache(maxsize=None)
def entry(model, kind):
    """Jitted model.apply variants: teacher forced, routed (lax.cond), sampled, encode, step."""
    if kind == "teacher_forced":
        return jax.jit(functools.partial(model.apply, fast_path_only=True))
    if kind == "routed":
        return jax.jit(lambda v, src, src_len, tgt_in, ratio, key: model.apply(
            v, src, src_len, tgt_in, tf_ratio=ratio, sampling_rng=key))
    if kind == "sampled":
        return jax.jit(functools.partial(model.apply, method=_sampled_method))
    if kind == "encode":
        return jax.jit(functools.partial(model.apply, method=Seq2Seq.encode))
    if kind == "step":
        return jax.jit(functools.partial(model.apply, method=Seq2Seq.decode_step))
    raise AssertionError(kind)


def teacher_forced(model, params, src, src_len, tgt_in):
    return entry(model, "teacher_forced")({"params": params}, src, src_len, tgt_in)


def routed(model, params, src, src_len, tgt_in, ratio, key):
    return entry(model, "routed")({"params": params}, src, src_len, tgt_in, jnp.float32(ratio), key)


def sampled_path(model, params, src, src_len, tgt_in, ratio, key):
    return entry(model, "sampled")({"params": params}, src, src_len, tgt_in, jnp.float32(ratio), key)


def seq2seq_batch(seed=0, batch=6, src_width=5, tgt_width=6):
    rng = np.random.default_rng(seed)
    src_len = np.array([5, 2, 3, 1, 4, 5][:batch])
    src = random_source(rng, src_len, src_width, pad_garbage=False)
    tgt_in = rng.integers(4, TGT_V, size=(batch, tgt_width)).astype(np.int32)
    tgt_in[:, 0] = BOS_ID
    return jnp.asarray(src), jnp.asarray(src_len), jnp.asarray(tgt_in)


# (attention, decoder layers, input feeding, also check the lax.cond router at ratio 1)
MODELS = [("none", 1, True, True), ("dot", 1, True, False), ("general", 1, True, True),
          ("concat", 1, True, False), ("scaled_dot", 1, True, False), ("concat", 2, True, True),
          ("none", 2, True, False), ("general", 1, False, False)]


@pytest.mark.parametrize("attention,decoder_layers,input_feeding,route", MODELS)
def test_teacher_forced_logits_equal_stepwise_decoding(attention, decoder_layers, input_feeding, route):
    model, params = make_seq2seq(attention, decoder_layers, input_feeding)
    src, src_len, tgt_in = seq2seq_batch()
    variables = {"params": params}
    out = teacher_forced(model, params, src, src_len, tgt_in)
    logits, weights = np.asarray(out["logits"]), np.asarray(out["attention"])
    B, T = tgt_in.shape
    assert logits.shape == (B, T, TGT_V) and weights.shape == (B, T, src.shape[1])
    np.testing.assert_array_equal(np.asarray(out["fed_tokens"]), np.asarray(tgt_in))

    # Independent path 1: encode once, then one decode_step per gold token (K = 1 hypothesis).
    memory, state = entry(model, "encode")(variables, src, src_len)
    state = jax.tree.map(lambda x: x[:, None], state)
    log_softmax = np.asarray(jax.nn.log_softmax(out["logits"]))
    for t in range(T):
        log_probs, state = entry(model, "step")(variables, memory, tgt_in[:, t:t + 1], state)
        np.testing.assert_allclose(np.asarray(log_probs[:, 0]), log_softmax[:, t], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {t}")

    # Independent path 2: the numpy Luong decoder on the numpy encoder's memory.
    p = np64(params)
    for b in range(B):
        n = int(src_len[b])
        mem, final = np_encoder(p["encoder"], np.asarray(src[b]), n, 1, True, False)
        ref = np_decoder_logits(p["decoder"], mem, final, np.asarray(tgt_in[b]), layers=decoder_layers,
                                attention=attention, input_feeding=input_feeding)
        np.testing.assert_allclose(log_softmax[b], ref, rtol=1e-4, atol=1e-4, err_msg=f"row {b}")

    # Attention weights: a distribution over the real source positions, zero on padding.
    real = np.broadcast_to((np.arange(src.shape[1])[None, :] < np.asarray(src_len)[:, None])[:, None],
                           weights.shape)
    if attention == "none":
        assert np.all(weights == 0.0)
    else:
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
        assert np.all(weights[~real] == 0.0)

    if route:  # the traced-ratio entry point (lax.cond) picks the same fast path at ratio 1
        out_routed = routed(model, params, src, src_len, tgt_in, 1.0, jax.random.PRNGKey(0))
        np.testing.assert_allclose(np.asarray(out_routed["logits"]), logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out_routed["fed_tokens"]), np.asarray(tgt_in))


def test_dot_attention_needs_matching_sizes():
    model = Seq2Seq(SRC_V, TGT_V, embed_dim=E, encoder_hidden=HE, decoder_hidden=HD + 1, attention="dot")
    dummy = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="dot"):
        jax.eval_shape(functools.partial(model.init, fast_path_only=True), jax.random.PRNGKey(0), dummy,
                       jnp.ones((1,), jnp.int32), dummy)


@pytest.mark.parametrize("init_scale", [0.1, 0.0])
def test_weight_initialisation(init_scale):
    """U(-s, s) for every weight (s > 0), else Glorot with orthogonal recurrent weights; biases
    zero with forget-gate bias 1 either way."""
    model = Seq2Seq(SRC_V, TGT_V, embed_dim=E, encoder_hidden=HE, decoder_hidden=HD, attention="concat",
                    attention_dim=A, init_scale=init_scale)
    dummy = jnp.ones((1, 3), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), dummy, jnp.ones((1,), jnp.int32), dummy,
                        fast_path_only=True)["params"]
    flat = {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(params)}
    biases = {name: x for name, x in flat.items() if name.rsplit("/", 1)[-1].startswith(("bias", "b_out"))}
    weights = {name: x for name, x in flat.items() if name not in biases}
    assert len(weights) >= 15 and len(biases) >= 5
    for name, x in biases.items():
        expected = np.zeros_like(x)
        if "attention" not in name and "bridge" not in name and name != "decoder/b_out":  # LSTM gates
            expected[len(x) // 4:len(x) // 2] = 1.0
        np.testing.assert_array_equal(x, expected, err_msg=name)
    for name, x in weights.items():
        if init_scale > 0:
            assert np.abs(x).max() <= init_scale and x.std() > 0.5 * init_scale / np.sqrt(3), name
    w_h = flat["decoder/w_h0"]
    is_orthogonal = np.allclose(w_h @ w_h.T, np.eye(w_h.shape[0]), atol=1e-5)
    assert is_orthogonal == (init_scale == 0)
    if init_scale == 0:
        limit = np.sqrt(6 / sum(flat["decoder/w_out"].shape))  # Glorot uniform
        assert np.abs(flat["decoder/w_out"]).max() <= limit


def test_scheduled_sampling_needs_rng():
    model, params = make_seq2seq("general")
    src, src_len, tgt_in = seq2seq_batch()
    with pytest.raises(ValueError, match="sampling_rng"):
        jax.eval_shape(lambda: model.apply({"params": params}, src, src_len, tgt_in, tf_ratio=0.5))


# ----------------------------------------------------------------------------- scheduled sampling
SAMPLED = [("none", 1), ("general", 1), ("concat", 2)]


@pytest.mark.parametrize("attention,decoder_layers", SAMPLED)
def test_sampled_path_at_ratio_one_is_teacher_forcing(attention, decoder_layers):
    model, params = make_seq2seq(attention, decoder_layers)
    src, src_len, tgt_in = seq2seq_batch(seed=1)
    logits, weights, fed = sampled_path(model, params, src, src_len, tgt_in, 1.0, jax.random.PRNGKey(3))
    fast = teacher_forced(model, params, src, src_len, tgt_in)
    np.testing.assert_array_equal(np.asarray(fed), np.asarray(tgt_in))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(fast["logits"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(fast["attention"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,decoder_layers", SAMPLED)
def test_ratio_zero_feeds_own_predictions(attention, decoder_layers):
    model, params = make_seq2seq(attention, decoder_layers)
    src, src_len, tgt_in = seq2seq_batch(seed=2)
    direct = sampled_path(model, params, src, src_len, tgt_in, 0.0, jax.random.PRNGKey(2))
    for out in (  # through the router (lax.cond) and the sampled path itself
            routed(model, params, src, src_len, tgt_in, 0.0, jax.random.PRNGKey(1)),
            dict(zip(("logits", "attention", "fed_tokens"), direct))):
        logits, fed = np.asarray(out["logits"]), np.asarray(out["fed_tokens"])
        assert fed.shape == tgt_in.shape and fed.dtype == np.asarray(tgt_in).dtype
        np.testing.assert_array_equal(fed[:, 0], BOS_ID)
        np.testing.assert_array_equal(fed[:, 1:], logits[:, :-1].argmax(-1))
        assert np.any(fed[:, 1:] != np.asarray(tgt_in)[:, 1:]), "test is vacuous: predictions == gold"
        # The logits are those of teacher forcing on the tokens actually fed.
        replay = teacher_forced(model, params, src, src_len, jnp.asarray(fed))
        np.testing.assert_allclose(logits, np.asarray(replay["logits"]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["attention"]), np.asarray(replay["attention"]),
                                   rtol=1e-5, atol=1e-6)


def test_ratio_half_feeds_gold_about_half_the_time():
    model, params = make_seq2seq("general")
    # Gold tokens come from a set the model can never predict (their output bias is -1e4), so
    # "fed == gold" happens exactly when the coin chose the ground truth.
    gold_set = np.array([5, 6, 7, 8])
    params = jax.tree.map(lambda x: x, params)  # a copy: the cached params stay as they are
    params["decoder"]["b_out"] = params["decoder"]["b_out"].at[gold_set].set(-1e4)
    rng = np.random.default_rng(4)
    batch, width = 256, 9
    src_len = rng.integers(1, 6, size=batch)
    src = jnp.asarray(random_source(rng, src_len, 5, pad_garbage=False))
    tgt_in = rng.choice(gold_set, size=(batch, width)).astype(np.int32)
    tgt_in[:, 0] = BOS_ID

    def fed_tokens(ratio, seed):
        out = routed(model, params, src, jnp.asarray(src_len), jnp.asarray(tgt_in), ratio,
                     jax.random.PRNGKey(seed))
        return np.asarray(out["fed_tokens"])

    for ratio, low, high in ((0.5, 0.44, 0.56), (0.2, 0.15, 0.25), (0.0, 0.0, 0.0)):
        fed = fed_tokens(ratio, 5)
        np.testing.assert_array_equal(fed[:, 0], BOS_ID)
        gold_fed = fed[:, 1:] == tgt_in[:, 1:]
        assert low <= gold_fed.mean() <= high, (ratio, gold_fed.mean())
        if ratio == 0.5:  # one coin per target token: rows and columns are mixed
            assert np.mean(gold_fed.any(1) & ~gold_fed.all(1)) > 0.9
            assert np.all(np.abs(gold_fed.mean(0) - 0.5) < 0.2)
    # Another key draws other coins.
    assert np.any(fed_tokens(0.5, 5) != fed_tokens(0.5, 6))
