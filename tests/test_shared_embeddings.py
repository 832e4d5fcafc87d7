"""Tied and shared embeddings (model.tie_embeddings, model.share_embeddings) and one joint
vocabulary (data.joint_vocab).

References: the untied model whose missing matrices are filled with the tied ones (the decoder's
output projection = its embedding transposed, the encoder's embedding = the decoder's), the numpy
Luong model of tests/test_models.py, and the chain rule: a shared matrix's gradient is the sum of
the gradients of the matrices it stands for. Parameter counts are the untied model's minus exactly
the matrices tying removes.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tiny
from s2s_jax import BOS_ID, EOS_ID, PAD_ID, UNK_ID, configuration, data, steps, training
from s2s_jax.configuration import ConfigError
from s2s_jax.models import Seq2Seq, make_model
from s2s_jax.translate import Translator
from tests.test_data import small_corpus
from tests.test_models import np64, np_decoder_logits, np_encoder, random_params, random_source

V, E, HE, HD = 13, 8, 4, 8  # one vocabulary; embed = decoder hidden (tying); encoder 4 per direction


def make(tie: bool, share: bool, chunk: int = 0, seed: int = 0):
    """A small model and random parameters (its own structure)."""
    model = Seq2Seq(V, V, embed_dim=E, encoder_hidden=HE, decoder_hidden=HD, attention="general",
                    output_chunk=chunk, tie_embeddings=tie, share_embeddings=share)
    dummy = jnp.ones((1, 3), jnp.int32)
    return model, random_params(functools.partial(model.init, fast_path_only=True), dummy,
                                jnp.ones((1,), jnp.int32), dummy, seed=seed)


def untied(params: dict) -> dict:
    """The parameters of the untied model that computes what the tied / shared model computes."""
    decoder, encoder = dict(params["decoder"]), dict(params["encoder"])
    decoder.setdefault("w_out", decoder["embedding"].T)
    encoder.setdefault("Embed_0", {"embedding": decoder["embedding"]})
    return dict(params, decoder=decoder, encoder=encoder)


def batch(seed=0) -> data.Batch:
    rng = np.random.default_rng(seed)
    src_len = np.array([5, 2, 3, 4], np.int32)
    src = random_source(rng, src_len, 5, vocab=V, pad_garbage=False)
    tgt = rng.integers(4, V, size=(4, 6)).astype(np.int32)
    tgt[1, 3:] = PAD_ID
    tgt_in = np.concatenate([np.full((4, 1), BOS_ID, np.int32), tgt[:, :-1]], axis=1)
    return data.Batch(src, src_len, tgt_in, tgt, np.arange(4, dtype=np.int32))


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def test_tying_and_sharing_remove_exactly_their_matrices():
    _, plain = make(False, False)
    _, tied = make(True, False)
    _, shared = make(False, True)
    _, both = make(True, True)
    assert "w_out" not in tied["decoder"] and "Embed_0" in tied["encoder"]
    assert "Embed_0" not in shared["encoder"] and "w_out" in shared["decoder"]
    assert "w_out" not in both["decoder"] and "Embed_0" not in both["encoder"]
    assert count(tied) == count(plain) - HD * V
    assert count(shared) == count(plain) - V * E
    assert count(both) == count(plain) - HD * V - V * E


@pytest.mark.parametrize("tie, share, parameters", [
    (False, False, 8_580_416), (True, False, 8_580_416 - 256 * 8000), (True, True, 8_580_416 - 2 * 256 * 8000)])
def test_parameter_counts_of_the_default_config(tie, share, parameters):
    """Shapes only: configs/default.py (8,000-piece vocabularies; embeddings 256 = decoder 256)."""
    config = default.get_config()
    config.model.tie_embeddings, config.model.share_embeddings = tie, share
    config.data.joint_vocab = share
    configuration.check(config)
    model = make_model(config.model, 8000, 8000)
    shapes = jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed))
    assert count(shapes.params) == parameters


@pytest.mark.parametrize("tie, share, chunk", [(True, True, 4), (True, False, 0)])
def test_the_model_computes_the_untied_model_with_those_matrices_and_sums_their_gradients(tie, share, chunk):
    model, params = make(tie, share, chunk, seed=5)
    reference, _ = make(False, False, chunk)
    b = batch()

    def loss(m, p):  # the training objective's sum (label smoothing on), through the fused layer if chunk
        return steps.teacher_forced_losses(m, {"params": p}, b, 0.1)[1]

    got, grads = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(params)
    want, ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, reference)))(untied(params))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    expected = ref_grads["decoder"]["embedding"]
    if tie:
        expected = expected + ref_grads["decoder"]["w_out"].T
    if share:
        expected = expected + ref_grads["encoder"]["Embed_0"]["embedding"]
    np.testing.assert_allclose(grads["decoder"]["embedding"], expected, rtol=1e-5, atol=1e-7)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        if "embedding" not in jax.tree_util.keystr(path):
            want_leaf = functools.reduce(lambda node, key: node[key.key], path, ref_grads)
            np.testing.assert_allclose(leaf, want_leaf, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_tied_and_shared_model_matches_the_numpy_reference():
    model, params = make(True, True, seed=7)
    b = batch(1)
    logits = model.apply({"params": params}, b.src, b.src_len, b.tgt_in, fast_path_only=True)["logits"]
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    p = np64(untied(params))
    for row in range(len(b.src)):
        memory, final = np_encoder(p["encoder"], b.src[row], int(b.src_len[row]), 1, True, False)
        ref = np_decoder_logits(p["decoder"], memory, final, b.tgt_in[row], layers=1, attention="general",
                                input_feeding=True)
        np.testing.assert_allclose(log_probs[row], ref, rtol=1e-4, atol=1e-4)


def test_unequal_sizes_are_refused_naming_both():
    config = tiny.get_config()  # embed_dim 32, decoder_hidden 64
    config.model.tie_embeddings = True
    with pytest.raises(ConfigError) as info:
        configuration.check(config)
    assert str(info.value).startswith("config: model.tie_embeddings=True needs model.embed_dim (32) == "
                                      "model.decoder_hidden (64): ")
    model = make_model(config.model, 20, 20)
    with pytest.raises(ValueError, match=r"tie_embeddings needs embed_dim \(32\) == decoder hidden \(64\)"):
        jax.eval_shape(lambda: steps.init_state(model, config.optimizer, 10, 0))


def test_sharing_needs_one_vocabulary():
    config = default.get_config()
    config.model.share_embeddings = True
    with pytest.raises(ConfigError, match=r"^config: model.share_embeddings=True needs data.joint_vocab=True: "):
        configuration.check(config)
    config.data.joint_vocab = True
    configuration.check(config)
    synthetic = tiny.get_config()  # one id vocabulary for both sides already
    synthetic.model.share_embeddings = True
    configuration.check(synthetic)
    model = make_model(config.model, 100, 120)
    with pytest.raises(ValueError, match="the source has 100 pieces and the target 120"):
        jax.eval_shape(lambda: steps.init_state(model, config.optimizer, 10, 0))


@pytest.mark.parametrize("key", ["model.tie_embeddings", "model.share_embeddings", "data.joint_vocab"])
def test_each_is_a_shape_key_on_resume(tmp_path, key):
    config = default.get_config()
    configuration.save(config, str(tmp_path))
    group, name = key.split(".")
    saved = config[group][name]
    config[group][name] = not saved
    with pytest.raises(ConfigError, match=f"another model shape or vocabulary \\({key}: {saved} there, {not saved} here\\)"):
        configuration.check_workdir(config, str(tmp_path))


def test_joint_vocabulary_is_one_model_of_both_sides(tmp_path):
    cfg = small_corpus(tmp_path, joint_vocab=True, vocab_size=300)
    workdir = tmp_path / "w"
    corpus = data.load_corpus(cfg, str(workdir))
    assert corpus.src_tokenizer.model_proto() == corpus.tgt_tokenizer.model_proto()
    separate = data.load_corpus(small_corpus(tmp_path, vocab_size=300), str(tmp_path / "separate"))
    assert separate.src_tokenizer.model_proto() != separate.tgt_tokenizer.model_proto()
    # Words of both languages need no unknown piece; a side's own model lacks the other's letters.
    sentences = ["Y dijo Dios: Sea la luz; y fue la luz.", "And God said, Let there be light: and there was light."]
    for ids in corpus.src_tokenizer.encode(sentences):
        assert UNK_ID not in ids and EOS_ID not in ids
    data.save_tokenizers(corpus, str(workdir))
    folder = workdir / "tokenizers"
    assert (folder / "src.model").read_bytes() == (folder / "tgt.model").read_bytes()
    assert json.loads((folder / "provenance.json").read_text())["joint_vocab"] is True
    assert data.load_corpus(cfg, str(workdir)).src_tokenizer.model_proto() == corpus.src_tokenizer.model_proto()


def test_a_run_with_all_three_trains_saves_and_translates(tmp_path):
    """A few steps of a files run with a joint vocabulary, tied and shared embeddings: the summary
    counts the parameters without the two matrices, and Translator loads and decodes the model."""
    config = default.get_config()
    config.data.update(small_corpus(tmp_path, joint_vocab=True, vocab_size=300, max_dev_pairs=8))
    config.data.bucket_boundaries = (65,)
    config.data.batch_size = 16
    config.model.update(embed_dim=32, encoder_hidden=16, decoder_hidden=32, tie_embeddings=True,
                        share_embeddings=True)
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
    config.eval.update(batch_size=8, max_decode_len=8)
    workdir = str(tmp_path / "w")
    summary = training.train_and_evaluate(config, workdir)
    corpus_vocab = data.Tokenizer.load(os.path.join(workdir, "tokenizers", "src.model")).vocab_size
    untied_config = config.copy_and_resolve_references()
    untied_config.model.update(tie_embeddings=False, share_embeddings=False)
    untied_model = make_model(untied_config.model, corpus_vocab, corpus_vocab)
    plain = jax.eval_shape(lambda: steps.init_state(untied_model, config.optimizer, 4, 0))
    assert summary["parameters"] == count(plain.params) - 2 * 32 * corpus_vocab
    translator = Translator.from_workdir(workdir)
    assert "w_out" not in translator.params["decoder"] and "Embed_0" not in translator.params["encoder"]
    assert len(translator.translate(["Y dijo Dios: Sea la luz."], search="greedy")) == 1
