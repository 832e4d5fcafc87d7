"""Scoring given translations (issue 20, item 8): `Translator.score` and `python -m s2s_jax.score`,
on the session's tiny model (synthetic reverse task, whose id texts tokenize back to the same ids).

Contracts: a beam hypothesis's score equals the raw log-probability the search reported for it
(alpha 0) within 1e-4; summed over the dev set, the scores equal the teacher-forced dev loss of
training times the pieces; an ensemble of a model with itself scores like the model.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from s2s_jax import configuration, data, files
from s2s_jax.translate import Translator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["4 5 6 7", "9 8 7 6 5 4 12", "10 11", "4 4 19 5 6 7 8 9 10"]


@pytest.fixture(scope="module")
def translator(tiny_workdir):
    return Translator.from_workdir(tiny_workdir)


def test_a_beam_hypothesis_scores_its_raw_search_score(translator):
    results = translator.hypotheses(SENTENCES, search="beam", beam_size=4, n_best=3, alpha=0.0)
    pairs = [(sentence, hyp) for sentence, hyps in zip(SENTENCES, results) for hyp in hyps]
    assert len(pairs) == 3 * len(SENTENCES)
    by_ids = translator.score([s for s, _ in pairs], [h.ids for _, h in pairs])
    by_text = translator.score([s for s, _ in pairs], [h.text for _, h in pairs])
    for (_, hyp), scored, again in zip(pairs, by_ids, by_text):
        assert abs(scored.log_prob - hyp.score) <= 1e-4, (hyp, scored)
        assert scored.pieces == len(hyp.ids) + 1 and again == scored  # id texts tokenize back to the ids
        assert scored.nll_per_piece == pytest.approx(-hyp.score / scored.pieces, abs=1e-4)


def test_dev_scores_sum_to_the_teacher_forced_dev_loss_times_the_pieces(tiny_workdir, translator):
    config = configuration.load(tiny_workdir)
    corpus = data.load_corpus(config.data, tiny_workdir)  # synthetic: regenerated, nothing written
    scores = translator.score(corpus.dev_src_text, corpus.dev_tgt_text)
    pieces = sum(s.pieces for s in scores)
    assert pieces == sum(len(t) + 1 for t in corpus.dev_tgt)
    summary = files.read_json(os.path.join(tiny_workdir, "summary.json"))  # the best (= last) step's
    assert -sum(s.log_prob for s in scores) / pieces == pytest.approx(summary["dev_loss"], rel=1e-5)


def test_an_ensemble_of_a_model_with_itself_scores_like_the_model(tiny_workdir, translator):
    pair = Translator.from_workdirs([tiny_workdir, tiny_workdir])
    single = translator.score(SENTENCES, ["7 6 5 4"] * len(SENTENCES))
    double = pair.score(SENTENCES, ["7 6 5 4"] * len(SENTENCES))
    np.testing.assert_allclose([s.log_prob for s in double], [s.log_prob for s in single], atol=1e-5)


def test_bad_targets_are_one_line_errors(translator):
    with pytest.raises(ValueError, match="4 sources but 3 targets"):
        translator.score(SENTENCES, ["4"] * 3)
    with pytest.raises(ValueError, match=r"line 2: target ids \[99\] outside the target vocabulary"):
        translator.score(SENTENCES[:2], [[4], [99]])


def _score(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "s2s_jax.score", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), timeout=300)


def test_score_command_scores_and_reranks(tiny_workdir, translator, tmp_path):
    source, target, nbest = tmp_path / "src", tmp_path / "tgt", tmp_path / "nbest"
    source.write_text("".join(s + "\n" for s in SENTENCES))
    reversed_ = [" ".join(s.split()[::-1]) for s in SENTENCES]
    target.write_text("".join(t + "\n" for t in reversed_))
    nbest.write_text("".join(f"{s}\t{t}\t4\n" for s, t in zip(SENTENCES, reversed_)))  # the right one 2nd
    scored = _score(f"--workdir={tiny_workdir}", f"--source={source}", f"--target={target}")
    assert scored.returncode == 0, scored.stderr
    want = translator.score(SENTENCES, reversed_)
    for line, s in zip(scored.stdout.splitlines(), want, strict=True):
        log_prob, pieces, nll = line.split("\t")
        assert float(log_prob) == pytest.approx(s.log_prob, abs=1e-5) and int(pieces) == s.pieces
        assert float(nll) == pytest.approx(s.nll_per_piece, abs=1e-5)
    reranked = _score(f"--workdir={tiny_workdir},{tiny_workdir}", f"--source={source}", f"--nbest={nbest}")
    assert reranked.returncode == 0, reranked.stderr
    assert [line.split("\t")[0] for line in reranked.stdout.splitlines()] == reversed_
    target.write_text("7 6 5 4\n")
    short = _score(f"--workdir={tiny_workdir}", f"--source={source}", f"--target={target}")
    assert short.returncode == 1 and short.stdout == ""
    assert short.stderr.strip() == (f"score: {target}: 1 lines, but --source={source} has 4: "
                                    "give one --target line per source line")
