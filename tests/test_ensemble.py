"""Tests for ensembles: decoding.ensemble_step_fn (model-agnostic, against brute force on the
averaged distributions) and Translator.from_workdirs / --workdir=A,B on the session's tiny model.

The ensemble's distribution is the mean of its members' probabilities: log p = logsumexp_m(log p_m)
- log M, computed here independently in numpy float64.
"""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import BOS_ID, EOS_ID, PAD_ID, data, translate
from s2s_jax.decoding import beam_search, ensemble_step_fn, greedy_search
from s2s_jax.translate import Translator
from tests.test_decoding import H0, Toy, as_list, assert_same_ranking, brute_force, np_greedy
from tests.test_translate import _cli, reverse


class MeanToy:
    """Two toys as one numpy model for the brute force: the hash is the pair of hashes and the
    log-probs are the log of the members' mean probabilities (float64)."""

    def __init__(self, a, b):
        self.a, self.b, self.vocab = a, b, a.vocab

    def np_step(self, h, token):
        logp_a, h_a = self.a.np_step(h[0], token)
        logp_b, h_b = self.b.np_step(h[1], token)
        return np.logaddexp(logp_a, logp_b) - np.log(2.0), (h_a, h_b)


H0_B = [2, 6, 1]  # the second member's hashes start elsewhere


def test_ensemble_of_two_toys_equals_brute_force_on_averaged_distributions():
    a, b = Toy(5, seed=21, eos_bias=-0.5), Toy(5, mod=9, seed=22)
    mean, max_len = MeanToy(a, b), 4
    step_fn, init = ensemble_step_fn([a.step_fn, b.step_fn]), (a.init_state(H0), b.init_state(H0_B))
    search = jax.jit(functools.partial(beam_search, step_fn, beam_size=3**max_len, max_len=max_len, n_best=6))
    beams, greedy = search(init), greedy_search(step_fn, init, max_len=max_len)
    for row, h0 in enumerate(zip(H0, H0_B)):
        want = brute_force(mean, h0, max_len, 0.6)
        assert_same_ranking(as_list(beams, row), want[:6])
        assert as_list(greedy, row)[0][1] == np_greedy(mean, h0, max_len)
        for toy, h in ((a, h0[0]), (b, h0[1])):  # averaging matters: neither member alone ranks so
            assert [w[1] for w in want[:6]] != [w[1] for w in brute_force(toy, h, max_len, 0.6)[:6]]


def test_ensemble_step_fn_rejects_no_members():
    with pytest.raises(ValueError, match="ensemble_step_fn"):
        ensemble_step_fn([])


# ------------------------------------------------------------------------------ tiny model
LINES = ["4 5 6 7", "9 8 7 6 5", "12 13", "", "4 6 8 10 12 14 16"]


@pytest.fixture(scope="module")
def single(tiny_workdir):
    return Translator.from_workdir(tiny_workdir)


def test_ensemble_of_a_model_with_itself_equals_the_model(tiny_workdir, single):
    pair = Translator.from_workdirs([tiny_workdir, tiny_workdir])
    assert isinstance(pair.model, tuple) and len(pair.model) == 2
    assert Translator.from_workdirs([tiny_workdir]).model == single.model
    for options in (dict(beam_size=4, n_best=3, coverage=0.3), dict(search="greedy")):
        got = pair.hypotheses(LINES, return_attention=True, **options)
        want = single.hypotheses(LINES, return_attention=True, **options)
        for got_hyps, want_hyps in zip(got, want):
            assert [h.ids for h in got_hyps] == [h.ids for h in want_hyps]
            np.testing.assert_allclose([h.score for h in got_hyps], [h.score for h in want_hyps], atol=1e-5)
            for g, w in zip(got_hyps, want_hyps):
                if w.attention is not None:
                    np.testing.assert_allclose(g.attention, w.attention, atol=1e-6)
    weights, _, _ = pair.attention("4 5 6", "6 5 4")
    np.testing.assert_allclose(weights, single.attention("4 5 6", "6 5 4")[0], atol=1e-6)


def test_ensemble_of_two_different_models_greedy_is_the_averaged_argmax(single):
    """A second member with perturbed parameters: each greedy step picks the argmax of the two
    members' mean teacher-forced probabilities, and the score sums their log."""
    noise = jax.tree.map(lambda x: 0.3 * np.random.default_rng(x.size).normal(size=x.shape).astype(x.dtype),
                         single.params)
    other = jax.tree.map(lambda x, n: x + n, single.params, noise)
    pair = Translator(single.config, (single.model, single.model), (single.params, other),
                      single.src_tokenizer, single.tgt_tokenizer)
    sentences = [s for s in LINES if s]
    results = pair.hypotheses(sentences, search="greedy")
    for sentence, (hyp,) in zip(sentences, results):
        src = single.src_tokenizer.encode([sentence])[0] + [EOS_ID]
        tgt = [BOS_ID] + hyp.ids
        src_arr, tgt_arr = np.zeros((2, 1, 24), np.int32)
        src_arr[0, :len(src)], tgt_arr[0, :len(tgt)] = src, tgt
        log_probs = [np.asarray(translate._teacher_forced(single.model, p, src_arr, np.array([len(src)], np.int32),
                                                          tgt_arr)[0][0], np.float64) for p in (single.params, other)]
        mean = np.logaddexp(*log_probs) - np.log(2.0)                      # [T, V]
        mean[:, [PAD_ID, BOS_ID]] = -np.inf
        out = hyp.ids + [EOS_ID]
        assert [int(np.argmax(mean[t])) for t in range(len(out))] == out
        assert hyp.score == pytest.approx(sum(mean[t, tok] for t, tok in enumerate(out)), abs=1e-4)
    assert results != single.hypotheses(sentences, search="greedy"), "the perturbed member should matter"


def test_ensemble_refuses_different_tokenizers(tiny_workdir, single, monkeypatch):
    other = Translator(single.config, single.model, single.params, single.src_tokenizer,
                       data.IdTokenizer(30), "other_workdir")
    monkeypatch.setattr(Translator, "from_workdir", classmethod(
        lambda cls, workdir, decoding=None: other if workdir == "other_workdir" else single))
    with pytest.raises(ValueError) as error:
        Translator.from_workdirs([tiny_workdir, "other_workdir"])
    message = str(error.value)
    assert "\n" not in message and single.workdir in message and "other_workdir" in message
    assert "target 20" in message and "target 30" in message


def test_members_decode_in_the_first_workdirs_dtype(tiny_workdir, tmp_path):
    """config.eval.decode_dtype: the ensemble's, i.e. the first workdir's (or `decoding`'s), for every
    member, whatever the other members' configs say."""
    other = tmp_path / "bfloat16"
    shutil.copytree(tiny_workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["eval"]["decode_dtype"] = "bfloat16"
    (other / "config.json").write_text(json.dumps(config))
    dtypes = lambda workdirs, decoding=None: [m.dtype for m in Translator.from_workdirs(workdirs, decoding).model]  # noqa: E731
    assert dtypes([tiny_workdir, str(other)]) == [jnp.float32] * 2
    assert dtypes([str(other), tiny_workdir]) == [jnp.bfloat16] * 2
    assert dtypes([str(other), tiny_workdir], {"decode_dtype": "float32"}) == [jnp.float32] * 2


def test_cli_ensemble_with_coverage(tiny_workdir):
    result = _cli(f"--workdir={tiny_workdir},{tiny_workdir}", "--coverage=0.2", "--beam_size=3",
                  stdin="4 5 6 7\n12 13\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [reverse("4 5 6 7"), reverse("12 13")]
    result = _cli(f"--workdir={tiny_workdir}", "--search=greedy", "--coverage=0.2", stdin="4 5\n")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "coverage" in lines[0], result.stderr
