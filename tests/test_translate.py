"""Tests for s2s_jax.translate (Translator and the command line) and s2s_jax.plotting.

All use the session's trained tiny model (configs/tiny.py: reverse sequences of 2..10 symbols).
References are independent of the code under test: the reversed source, greedy search, one
sentence at a time, and the model's own teacher-forced log-probs for the beam scores.
"""
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from s2s_jax import BOS_ID, EOS_ID, data, inference, metrics, translate
from s2s_jax.checkpoints import CheckpointError
from s2s_jax.options import SearchOptions
from s2s_jax.translate import Translator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def translator(tiny_workdir):
    return Translator.from_workdir(tiny_workdir)


@pytest.fixture(scope="module")
def sentences(translator):
    """40 dev-like sources (a seed the training and dev sets did not use), both length buckets,
    in random length order, with an empty line in the middle."""
    cfg = translator.config.data
    src, _ = data.synthetic_task("reverse", 40, cfg.synthetic_vocab_size, cfg.synthetic_min_len,
                                 cfg.synthetic_max_len, seed=1234)
    lines = [" ".join(map(str, s)) for s in src]
    lines.insert(17, "")
    return lines


@pytest.fixture(scope="module")
def beam5(translator, sentences):
    return translator.translate(sentences, beam_size=5)


def reverse(line: str) -> str:
    return " ".join(line.split()[::-1])


def gnmt_score(translator, sentence: str, ids: list[int], alpha: float) -> float:
    """Teacher-forced log-prob of ids + EOS under the GNMT length penalty (no coverage)."""
    src = translator.src_tokenizer.encode([sentence])[0] + [EOS_ID]
    src_arr, tgt_arr = np.zeros((2, 1, 32), np.int32)  # one padded shape: one compilation
    src_arr[0, :len(src)] = src
    tgt_arr[0, :len(ids) + 1] = [BOS_ID] + ids
    log_probs, _ = translate._teacher_forced(translator.model, translator.params, src_arr,
                                             np.array([len(src)], np.int32), tgt_arr)
    total = sum(float(log_probs[0, t, tok]) for t, tok in enumerate(ids + [EOS_ID]))
    return total / ((5 + len(ids) + 1) / 6) ** alpha


def test_reverses_dev_like_inputs_in_input_order(sentences, beam5):
    assert len(beam5) == len(sentences)
    assert beam5[17] == ""
    pairs = [(s, out) for s, out in zip(sentences, beam5) if s]
    # 300 steps learn short sequences almost perfectly (~95% exact up to 7 symbols, ~20% at 10).
    exact = np.mean([out == reverse(s) for s, out in pairs if len(s.split()) <= 7])
    assert exact >= 0.8, f"only {exact:.0%} of the sources up to 7 symbols reversed exactly"
    bleu = metrics.corpus_bleu([out.split() for _, out in pairs], [[reverse(s).split() for s, _ in pairs]])
    assert bleu.score > 50, bleu


def test_permuted_input_gives_permuted_output(translator, sentences, beam5):
    perm = np.random.default_rng(0).permutation(len(sentences))
    out = translator.translate([sentences[j] for j in perm], beam_size=5)
    assert out == [beam5[j] for j in perm]


def test_batch_equals_one_at_a_time(translator, sentences, beam5):
    for i in (0, 3, 17, 21, 38):  # both buckets and the empty line
        assert translator.translate([sentences[i]], beam_size=5) == [beam5[i]]


def test_beam_one_is_greedy(translator, sentences):
    greedy = translator.translate(sentences, search="greedy")
    assert translator.translate(sentences, search="beam", beam_size=1) == greedy


def test_n_best_sorted_distinct_and_scored_by_the_model(translator, sentences):
    alpha = 0.6
    picks = [s for s in sentences if 2 <= len(s.split()) <= 6][:2]
    results = translator.hypotheses(picks, beam_size=4, n_best=4, alpha=alpha)
    best = translator.translate(picks, beam_size=4, alpha=alpha)
    assert best == [hyps[0].text for hyps in results]  # translate returns strings, one per sentence
    with pytest.raises(TypeError, match="hypotheses"):
        translator.translate(picks, n_best=2)
    for sentence, hyps in zip(picks, results):
        assert len(hyps) == 4
        assert len({h.text for h in hyps}) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert hyps[0].text == reverse(sentence)
        # Independent check of each score: teacher-forced log-prob of ids + EOS, GNMT penalty.
        for h in hyps:
            assert h.score == pytest.approx(gnmt_score(translator, sentence, h.ids, alpha), abs=1e-4)


def test_attention_rows_sum_to_one_and_plot(translator, tmp_path):
    weights, src, out = translator.attention("4 5 6 7", "7 6 5 4")
    assert weights.shape == (5, 5)
    assert src == ["4", "5", "6", "7", "</s>"] and out == ["7", "6", "5", "4", "</s>"]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(weights >= 0)
    # The reverse model looks at the mirrored source position when writing each symbol.
    assert list(weights[:4, :4].argmax(axis=1)) == [3, 2, 1, 0]
    ids_weights, _, _ = translator.attention("4 5 6 7", [7, 6, 5, 4, EOS_ID, 9])  # stops at EOS
    np.testing.assert_allclose(ids_weights, weights, atol=1e-6)
    path = tmp_path / "a.png"
    translator.plot_attention("4 5 6 7", "7 6 5 4", str(path), title="reverse")
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("options", [dict(beam_size=4, n_best=3), dict(search="greedy"),
                                     dict(search="beam", beam_size=3, n_best=2, max_len_a=0.0, max_len_b=3)])
def test_search_attention_equals_teacher_forced_attention(translator, sentences, options):
    """The weights the search records for each returned hypothesis are the model's teacher-forced
    attention on that output (one row per generated piece; no EOS row when cut at the limit)."""
    picks = [s for s in sentences if 2 <= len(s.split()) <= 7][:4]  # one bucket: fewer compilations
    results = translator.hypotheses(picks, return_attention=True, **options)
    plain = translator.hypotheses(picks, **options)
    cut = False
    for sentence, hyps, plain_hyps in zip(picks, results, plain):
        assert [(h.ids, h.score) for h in hyps] == [(h.ids, h.score) for h in plain_hyps]  # bit-identical
        for h in hyps:
            want, src_pieces, _ = translator.attention(sentence, h.ids)  # [len(ids) + 1, S]
            ended = h.attention.shape[0] == len(h.ids) + 1
            cut |= not ended
            assert h.attention.shape == (len(h.ids) + (1 if ended else 0), len(src_pieces))
            np.testing.assert_allclose(h.attention, want[:h.attention.shape[0]], atol=1e-5)
            np.testing.assert_allclose(h.attention.sum(axis=1), 1.0, atol=1e-5)
    assert cut == ("max_len_b" in options), "the limit of 3 pieces should cut hypotheses, only it"


def coverage_of(h, beta: float) -> float:
    """beta * sum_i log(min(sum_j a_ij, 1)) by hand from the returned attention, floored at 1e-6."""
    return beta * float(np.sum(np.log(np.clip(h.attention.astype(np.float64).sum(axis=0), 1e-6, 1.0))))


def test_coverage_penalty_scores_and_ranking(translator, sentences):
    """With beta > 0 each score is the plain GNMT score plus beta times the coverage term of its
    recorded attention, and the n-best list is the top of everything the beta = 0 and beta > 0
    searches found, ranked by that sum (both searches prune on the same raw log-probs)."""
    beta, alpha, width = 2.0, 0.6, 6
    picks = [s for s in sentences if 2 <= len(s.split()) <= 7][:8]
    kw = dict(beam_size=width, n_best=width, alpha=alpha, return_attention=True)
    plain = translator.hypotheses(picks, beam_size=width, n_best=width, alpha=alpha)
    zero = translator.hypotheses(picks, coverage=0.0, **kw)
    assert [[(h.ids, h.score) for h in hyps] for hyps in zero] == [[(h.ids, h.score) for h in hyps] for hyps in plain]
    covered = translator.hypotheses(picks, coverage=beta, **kw)
    changed = False
    for sentence, zero_hyps, cov_hyps in zip(picks, zero, covered):
        for h in cov_hyps:
            assert coverage_of(h, beta) <= 0 and len(h.attention) == len(h.ids) + 1  # ends with EOS
            assert h.score == pytest.approx(gnmt_score(translator, sentence, h.ids, alpha) + coverage_of(h, beta),
                                            abs=1e-4)
        rescored = {tuple(h.ids): h.score + coverage_of(h, beta) for h in zero_hyps}
        rescored.update({tuple(h.ids): h.score for h in cov_hyps})
        best = sorted(rescored, key=lambda ids: -rescored[ids])[:width]
        assert [tuple(h.ids) for h in cov_hyps] == best
        changed |= [h.ids for h in cov_hyps] != [h.ids for h in zero_hyps]
    assert changed, "the coverage penalty should change some ranking"


def test_plotting_checks_shapes(tmp_path):
    from s2s_jax import plotting
    with pytest.raises(ValueError, match=r"\[T, S\]"):
        plotting.plot_attention(np.ones((2, 3)), ["a", "b"], ["x", "y"], str(tmp_path / "x.png"))


def test_long_sentence_error_names_line_and_truncate_warns(translator, caplog):
    long = " ".join(["5"] * (translator.max_source_len + 3))
    lines = ["4 5", "6 7", long]
    with pytest.raises(ValueError, match="line 3"):
        translator.translate(lines, on_long="error")
    with caplog.at_level(logging.WARNING, logger="s2s_jax.sources"):
        out = translator.translate(lines, on_long="truncate")
    assert len(out) == 3 and out[0] == "5 4"
    assert any("sentence 2 (line 3)" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("options, match", [
    (dict(beam_size=0), "beam_size"),
    (dict(max_len=0), "max_len"),
    (dict(n_best=3, beam_size=2), "n_best"),
    (dict(search="topk"), "search"),
    (dict(search="sample", top_p=1.5), "top_p"),
    (dict(search="sample", temperature=0.0), "temperature"),
    (dict(min_len=-1), "min_len"),
    (dict(max_len_a=-0.5), "max_len_a"),
    (dict(on_long="drop"), "on_long"),
    (dict(alpha=-1.0), "alpha"),
    (dict(max_len=10 ** 8), "max_len"),     # would take gigabytes per sentence
    (dict(beam_size=21), "beam_size"),      # more than the 20-symbol vocabulary
    (dict(coverage=-0.1), "coverage"),
    (dict(search="greedy", coverage=0.5), "coverage"),
])
def test_bad_options_fail_before_decoding(translator, monkeypatch, options, match):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite a bad option")
    monkeypatch.setattr(inference, "decode_batch", no_decoding)
    with pytest.raises(ValueError, match=match):
        translator.hypotheses(["4 5 6"], **options)


def test_workdir_without_checkpoint(tiny_workdir, tmp_path):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    shutil.copy(os.path.join(tiny_workdir, "config.json"), workdir / "config.json")
    with pytest.raises(CheckpointError, match=str(workdir)):
        Translator.from_workdir(str(workdir))
    assert sorted(os.listdir(workdir)) == ["config.json"]  # nothing created


def _cli(*args, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "s2s_jax.translate", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_n_best_and_attention_pngs(tiny_workdir, tmp_path):
    lines = ["4 5 6 7", "", "9 8 7 6 5", "12 13"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, pngs = tmp_path / "out.txt", tmp_path / "att"
    result = _cli(f"--workdir={tiny_workdir}", f"--input={src}", f"--output={out}", "--n_best=2",
                  "--beam_size=3", f"--attention_dir={pngs}")
    assert result.returncode == 0, result.stderr
    written = out.read_text(encoding="utf-8").split("\n")
    assert written[-1] == "" and len(written) - 1 == len(lines)
    assert written[1] == ""
    for line, text in zip(lines, written):
        if line:
            best, second = text.split("\t")
            assert best == reverse(line) and second != best
    files = sorted(os.listdir(pngs))
    assert files == ["00001.png", "00003.png", "00004.png"]
    for name in files:
        assert (pngs / name).read_bytes()[:8] == PNG_MAGIC


def test_cli_invalid_utf8_names_file_and_line(tiny_workdir, tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"4 5\n6 7\n8 \xff 9\n")
    result = _cli(f"--workdir={tiny_workdir}", f"--input={src}")
    assert result.returncode != 0
    assert f"{src}:3" in result.stderr and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_creates_the_output_directory_and_refuses_a_directory(tiny_workdir, tmp_path):
    out = tmp_path / "new" / "deeper" / "out.txt"
    result = _cli(f"--workdir={tiny_workdir}", f"--output={out}", "--search=greedy", stdin="4 5 6\n")
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == "6 5 4\n"
    result = _cli(f"--workdir={tiny_workdir}", f"--output={tmp_path}", stdin="4 5 6\n")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a directory" in lines[0]


def test_cli_refuses_sizes_beyond_what_the_model_allows(tiny_workdir):
    for flag, name in (("--max_len=100000000", "max_len"), ("--beam_size=5000", "beam_size")):
        result = _cli(f"--workdir={tiny_workdir}", flag, stdin="4 5 6\n")
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], result.stderr


def test_dev_bleu_of_training_equals_translate_on_the_dev_file(tiny_workdir, tmp_path):
    """The run's dev BLEU (summary.json) is what the translate command gives on the dev sources,
    with the workdir's options, scored by sacrebleu: the same number, to every digit."""
    import json
    from s2s_jax import configuration
    config = configuration.load(tiny_workdir)
    cfg = config.data
    src, tgt = data.synthetic_task(cfg.task, cfg.synthetic_dev_size, cfg.synthetic_vocab_size, cfg.synthetic_min_len,
                                   cfg.synthetic_max_len, cfg.synthetic_seed + 1)
    dev_src = tmp_path / "dev.src"
    dev_src.write_text("".join(" ".join(map(str, s)) + "\n" for s in src), encoding="utf-8")
    out = tmp_path / "dev.hyp"
    result = _cli(f"--workdir={tiny_workdir}", f"--input={dev_src}", f"--output={out}", "--search=greedy")
    assert result.returncode == 0, result.stderr
    hyps = out.read_text(encoding="utf-8").splitlines()
    bleu, _ = metrics.sacrebleu_score(hyps, [" ".join(map(str, t)) for t in tgt])
    with open(os.path.join(tiny_workdir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["dev_bleu"] == bleu


# ----------------------------------------------------------------------------- every search option
def test_translation_does_not_depend_on_the_other_sentences_of_the_call(translator, sentences):
    """Tokens and scores bit-identical one at a time, three at a time, all at once and shuffled."""
    def run(groups):
        out = {}
        for group in groups:
            for i, hyps in zip(group, translator.hypotheses([sentences[i] for i in group], beam_size=3, n_best=2)):
                out[i] = [(h.ids, h.score) for h in hyps]
        return out

    everything = run([list(range(len(sentences)))])
    order = list(np.random.default_rng(1).permutation(len(sentences)))
    for size in (1, 3, 64):
        assert run([order[k:k + size] for k in range(0, len(order), size)]) == everything, size


def test_decode_shapes_set_the_calls_and_keep_their_invariance(tiny_workdir, translator, sentences, monkeypatch):
    """decoding={"decode_buckets", "decode_rows"}: every call is [rows, bucket] of those shapes, and a
    sentence's tokens and scores still do not depend on the other sentences of its call."""
    wide = Translator.from_workdir(tiny_workdir, decoding={"decode_buckets": (12,), "decode_rows": 8})
    shapes = []
    for decoder in (translator.decoder, wide.decoder):
        batch_decode = decoder.decode_batch
        monkeypatch.setattr(decoder, "decode_batch", lambda *a, _f=batch_decode, **k: shapes.append(k["src"].shape)
                            or _f(*a, **k))
    real = [s for s in sentences if s]

    def best(model, groups):
        return {i: (h[0].ids, h[0].score) for g in groups for i, h in zip(g, model.hypotheses([real[i] for i in g]))}

    everything = best(wide, [list(range(len(real)))])
    assert set(shapes) == {(8, 12)} and len(shapes) == -(-len(real) // 8)
    assert best(wide, [[i] for i in range(len(real))]) == everything
    assert [ids for ids, _ in everything.values()] == [hyps[0].ids for hyps in translator.hypotheses(real)]
    assert {shape[0] for shape in shapes[len(real) + 5:]} == {32}  # the workdir's own: 32 rows, buckets 8 and 12
    with pytest.raises(ValueError, match=r"config: eval.decode_buckets=\[8\] must be .* >= data.max_len \+ 1 = 12"):
        Translator.from_workdir(tiny_workdir, decoding={"decode_buckets": (8,)})
    with pytest.raises(ValueError, match="config: beam_size is not a decoding key"):
        Translator.from_workdir(tiny_workdir, decoding={"beam_size": 3})


def test_cli_decode_shape_flags(tiny_workdir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("4 5 6 7\n9 8 7 6 5\n", encoding="utf-8")
    result = _cli(f"--workdir={tiny_workdir}", f"--input={src}", "--decode_buckets=12", "--decode_rows=4")
    assert result.returncode == 0 and result.stdout == "7 6 5 4\n5 6 7 8 9\n", result.stderr
    _one_line_error(_cli(f"--workdir={tiny_workdir}", f"--input={src}", "--decode_buckets=8,x"),
                    "--decode_buckets=8,x: give comma-separated integers")
    _one_line_error(_cli(f"--workdir={tiny_workdir}", f"--input={src}", "--decode_buckets=6,8"),
                    "eval.decode_buckets=", "6, 8", "must be a non-empty, strictly increasing")


def test_decode_dtype_sets_the_matmuls_of_decoding_and_scoring(tiny_workdir, translator, sentences):
    """decoding={"decode_dtype": "bfloat16"}: the float32 model decodes and scores with bfloat16
    matmuls (float32 sums): a target's log-probability moves by bfloat16's rounding, no more."""
    fast = Translator.from_workdir(tiny_workdir, decoding={"decode_dtype": "bfloat16"})
    assert fast.model.dtype == jnp.bfloat16 and translator.model.dtype == jnp.float32
    real = [s for s in sentences if s]
    targets = [hyps[0].ids for hyps in translator.hypotheses(real)]
    want = np.array([s.log_prob for s in translator.score(real, targets)])
    got = np.array([s.log_prob for s in fast.score(real, targets)])
    assert np.any(got != want), "bfloat16 matmuls changed no score: the dtype did not reach the calls"
    np.testing.assert_allclose(got, want, atol=0.1)  # sentences of up to 12 pieces
    assert np.mean(np.abs(got - want)) < 0.02
    assert [h[0].ids for h in fast.hypotheses(real)] == targets  # the tiny model's choices are clear
    with pytest.raises(ValueError, match="eval.decode_dtype='float16' is not one of"):
        Translator.from_workdir(tiny_workdir, decoding={"decode_dtype": "float16"})


def test_cli_decode_dtype_flag(tiny_workdir, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("4 5 6 7\n9 8 7 6 5\n", encoding="utf-8")
    result = _cli(f"--workdir={tiny_workdir}", f"--input={src}", "--decode_dtype=bfloat16")
    assert result.returncode == 0 and result.stdout == "7 6 5 4\n5 6 7 8 9\n", result.stderr
    wrong = _cli(f"--workdir={tiny_workdir}", f"--input={src}", "--decode_dtype=float16")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "flag --decode_dtype=float16: value should be one of <float32|bfloat16>" in wrong.stderr


def test_sampling_returns_n_samples_reproducibly(translator, sentences):
    picks = [s for s in sentences if s][:4]
    first = translator.hypotheses(picks, search="sample", n_best=5, seed=3, temperature=1.5)
    again = translator.hypotheses(picks, search="sample", n_best=5, seed=3, temperature=1.5)
    other = translator.hypotheses(picks, search="sample", n_best=5, seed=4, temperature=1.5)
    assert first == again and first != other
    for hyps in first:
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    # A tiny nucleus keeps only the most likely piece: sampling becomes greedy.
    nucleus = translator.hypotheses(picks, search="sample", n_best=2, top_p=1e-6, seed=3)
    greedy = translator.translate(picks, search="greedy")
    assert [[h.text for h in hyps] for hyps in nucleus] == [[g, g] for g in greedy]


def test_per_sentence_limits_come_from_the_source_length(translator):
    lines = ["4 5", "4 5 6 7 8 9 10 11"]
    # a = 0.5, b = 1: limits 2 and 5 pieces (EOS included) for sources of 2 and 8 pieces.
    hyps = translator.hypotheses(lines, search="greedy", max_len_a=0.5, max_len_b=1)
    assert [h[0].ids for h in hyps] == [[5, 4], [11, 10, 9, 8, 7]]  # cut at 2 and 5 pieces
    assert [len(h[0].ids) for h in translator.hypotheses(lines, search="greedy")] == [2, 8]


def test_prefixes_force_the_start_of_every_hypothesis(translator):
    lines = ["4 5 6 7", "9 8 7", "12 13"]
    results = translator.hypotheses(lines, prefixes=["7 5", None, "13"], beam_size=3, n_best=3)
    assert all(h.text.startswith("7 5") for h in results[0])
    assert results[1][0].text == "7 8 9" and results[2][0].text == "13 12"
    greedy = translator.hypotheses(lines, prefixes=["7 5", None, "13"], search="greedy")
    assert greedy[0][0].text.startswith("7 5")


def test_cli_sampling_and_bad_option(tiny_workdir):
    result = _cli(f"--workdir={tiny_workdir}", "--search=sample", "--n_best=3", "--seed=1", stdin="4 5 6\n7 8\n")
    assert result.returncode == 0, result.stderr
    assert [len(line.split("\t")) for line in result.stdout.splitlines()] == [3, 3]
    result = _cli(f"--workdir={tiny_workdir}", "--search=sample", "--top_p=1.5", stdin="4 5 6\n")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "top_p" in lines[0]


def test_eval_options_of_a_workdir_older_than_the_length_rule(tmp_path, tiny_config):
    """config.json of older workdirs has no eval.max_len_a / max_len_b: loading it fills their older
    values, which the search options then use."""
    import json

    from s2s_jax import configuration
    configuration.save(tiny_config, str(tmp_path))
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["eval"]["max_len_a"], saved["eval"]["max_len_b"]
    path.write_text(json.dumps(saved))
    options = SearchOptions.from_eval_config(configuration.load(str(tmp_path)).eval, "beam")
    assert (options.max_len_a, options.max_len_b) == (2.0, 10)


# ----------------------------------------------------------------------------- the command streams
def _stream(translator, tmp_path, text: bytes, prefixes: bytes | None = None, out=None, **options):
    """The command's loop on an input file holding `text` (and a prefix file), greedy, writing to
    `out`: (output, progress) text."""
    src, prefix_path = tmp_path / "in.txt", tmp_path / "prefixes.txt"
    src.write_bytes(text)
    if prefixes is not None:
        prefix_path.write_bytes(prefixes)
    out, progress = io.StringIO() if out is None else out, io.StringIO()
    pairs = translate._sources(str(src), None if prefixes is None else str(prefix_path))
    translate._translate_stream(translator, pairs, out, {"search": "greedy", **options}, None, progress)
    return out.getvalue(), progress.getvalue()


def _encoded(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def test_cli_streams_chunks_in_input_order_with_progress(translator, sentences, tmp_path, monkeypatch):
    """Decoded a chunk at a time (never more lines at once: constant memory), the output equals
    translating all lines at once; a progress line per chunk only when there is more than one."""
    lines = sentences[12:22]  # 10 lines, the blank one included
    expected = translator.translate(lines, search="greedy")
    calls = []
    hypotheses = translator.hypotheses
    monkeypatch.setattr(translator, "hypotheses", lambda s, *a, **k: calls.append(len(s)) or hypotheses(s, *a, **k))
    monkeypatch.setattr(translate, "CHUNK_LINES", 3)
    out, progress = _stream(translator, tmp_path, _encoded(lines))
    assert out == "".join(line + "\n" for line in expected)
    assert calls == [3, 3, 3, 1]
    assert [line.split(" lines done")[0] for line in progress.splitlines()] == ["translate: 3", "translate: 6",
                                                                                 "translate: 9", "translate: 10"]
    assert _stream(translator, tmp_path, _encoded(lines[:3]))[1] == ""  # one full chunk: no progress
    assert _stream(translator, tmp_path, b"")[0] == ""


def test_chunks_of_a_stream_end_where_no_further_line_waits_and_a_file_goes_in_full_chunks():
    bursts, arrived = [3, 1, 5], [0]

    def lines():  # a burst arrives when the reader waits for its first line
        for burst in bursts:
            arrived[0] += burst
            yield from range(arrived[0] - burst, arrived[0])

    assert list(translate._chunks(lines(), 4, lambda: arrived[0])) == [
        ([0, 1, 2], True), ([3], True), ([4, 5, 6, 7], False), ([8], True)]
    assert list(translate._chunks(iter(range(9)), 4)) == [([0, 1, 2, 3], False), ([4, 5, 6, 7], False), ([8], True)]


def test_cli_stream_errors_name_the_line_of_the_whole_input(translator, tmp_path, monkeypatch):
    monkeypatch.setattr(translate, "CHUNK_LINES", 3)
    good = ["4 5", "6 7 8", "", "9 10"]
    out = io.StringIO()
    with pytest.raises(data.DataError, match=r"in\.txt:5: invalid UTF-8 \(byte 0xff at column 3\)"):
        _stream(translator, tmp_path, _encoded(good) + b"4 \xff 5\n", out=out)
    assert out.getvalue() == "5 4\n8 7 6\n\n"  # the first chunk was written before the error
    long = " ".join(["5"] * (translator.max_source_len + 3))
    with pytest.raises(ValueError, match=r"^line 7: .*source pieces"):
        _stream(translator, tmp_path, _encoded(good + ["6 7", "4", long]), on_long="error")
    with pytest.raises(data.DataError, match=r"prefixes\.txt: 4 prefix lines, but the input has more"):
        _stream(translator, tmp_path, _encoded(good + ["6 7"]), _encoded(["", "8", "", "10"]))
    with pytest.raises(data.DataError, match=r"prefixes\.txt: more prefix lines than the 4 input lines"):
        _stream(translator, tmp_path, _encoded(good), _encoded(["", "8", "", "10", "5"]))
    out, _ = _stream(translator, tmp_path, _encoded(good), _encoded(["", "8", "", "10"]))
    assert out.splitlines()[1].startswith("8") and out.splitlines()[3].startswith("10")


def test_cli_attention_maps_of_later_chunks_have_their_line_numbers(translator, tmp_path, monkeypatch):
    monkeypatch.setattr(translate, "CHUNK_LINES", 2)
    src, pngs = tmp_path / "in.txt", tmp_path / "att"
    src.write_bytes(_encoded(["4 5", "", "6 7 8"]))
    translate._translate_stream(translator, translate._sources(str(src), None), io.StringIO(),
                                {"search": "greedy"}, str(pngs), io.StringIO())
    assert sorted(os.listdir(pngs)) == ["00001.png", "00003.png"]


def test_cli_output_file_appears_only_once_complete(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError), translate._output(str(path)) as out:
        out.write("half\n")
        raise RuntimeError("failed midway")
    assert path.read_text(encoding="utf-8") == "old\n" and os.listdir(tmp_path) == ["out.txt"]
    with translate._output(str(path)) as out:
        out.write("new\n")
        assert path.read_text(encoding="utf-8") == "old\n"
    assert path.read_text(encoding="utf-8") == "new\n" and os.listdir(tmp_path) == ["out.txt"]
    link = tmp_path / "link.txt"  # e.g. /dev/stdout: written through, not replaced
    link.symlink_to(path)
    with translate._output(str(link)) as out:
        out.write("linked\n")
    assert link.is_symlink() and path.read_text(encoding="utf-8") == "linked\n"


def test_cli_prefix_file_one_line_short_leaves_no_output(tiny_workdir, tmp_path):
    src, prefixes, out = tmp_path / "in.txt", tmp_path / "prefixes.txt", tmp_path / "out.txt"
    src.write_text("4 5 6\n7 8\n", encoding="utf-8")
    prefixes.write_text("6\n", encoding="utf-8")
    result = _cli(f"--workdir={tiny_workdir}", f"--input={src}", f"--prefixes={prefixes}", f"--output={out}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and str(prefixes) in lines[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "prefixes.txt"]


# ----------------------------------------------------------------------------- robustness
def test_cli_two_runs_writing_one_output_never_mix(tmp_path):
    """Each run writes a temporary file of its own: the last to finish wins, whole."""
    path = tmp_path / "out.txt"
    with translate._output(str(path)) as first:
        first.write("first\n")
        with translate._output(str(path)) as second:
            second.write("second\n")
        first.write("first again\n")
        assert path.read_text(encoding="utf-8") == "second\n"
    assert path.read_text(encoding="utf-8") == "first\nfirst again\n" and os.listdir(tmp_path) == ["out.txt"]


def test_cli_samples_do_not_depend_on_chunks(translator, tmp_path, monkeypatch):
    """A sentence's samples depend on the seed and its line in the whole input only."""
    lines = ["4 5 6 7 8 9"] * 7 + ["9 8 7"]
    options = dict(search="sample", n_best=2, seed=5, temperature=2.0)
    whole = ["\t".join(h.text for h in hyps) + "\n" for hyps in translator.hypotheses(lines, **options)]
    monkeypatch.setattr(translate, "CHUNK_LINES", 3)
    out, _ = _stream(translator, tmp_path, _encoded(lines), **options)
    assert out == "".join(whole)
    assert len(set(whole[:7])) > 2, "identical lines at different positions should draw differently"


def test_prefix_longer_than_its_limit_is_kept_whole_or_refused_naming_the_line(translator):
    # a = 0, b = 2: a limit of 2 pieces, which grows to hold the 3-piece prefix and one more.
    hyps = translator.hypotheses(["4 5 6"], prefixes=["6 5 4"], search="greedy", max_len_a=0.0, max_len_b=2)
    assert hyps[0][0].ids[:3] == [6, 5, 4] and len(hyps[0][0].ids) <= 3
    too_long = " ".join(["5"] * 16)  # the bucket's compiled limit: 16 pieces
    with pytest.raises(ValueError, match=r"^line 2: its prefix of 16 pieces leaves no room.*16 pieces"):
        translator.hypotheses(["4 5", "6 7"], prefixes=[None, too_long], search="greedy")


def test_bad_arguments_name_what_is_expected(tiny_workdir, tmp_path, translator):
    with pytest.raises(TypeError, match="sentences must be a list of strings, got NoneType"):
        translator.translate(None)
    with pytest.raises(TypeError, match="sentence 2 is a int"):
        translator.translate(["4 5", 6])
    with pytest.raises(ValueError, match=r"empty workdir .* in \['.*', ''\]"):
        Translator.from_workdirs([tiny_workdir, ""])
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(ValueError, match=f"{regular} is not a directory"):
        Translator.from_workdir(str(regular))


def _one_line_error(result, *named):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("translate: ") and all(n in lines[-1] for n in named), result.stderr


def test_cli_unwritable_places_fail_before_decoding_in_one_line(tiny_workdir, tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    _one_line_error(_cli(f"--workdir={tiny_workdir}", "--output=/proc/version", stdin="4 5 6\n"),
                    "/proc/version", "--output cannot be written")
    _one_line_error(_cli(f"--workdir={tiny_workdir}", f"--attention_dir={regular}", stdin="4 5 6\n"),
                    str(regular), "--attention_dir cannot be written")
    _one_line_error(_cli(f"--workdir={tiny_workdir}", "--output=/dev/full", "--search=greedy", stdin="4 5 6\n"),
                    "cannot write /dev/full", "No space left")


def _command(workdir: str, *flags: str) -> subprocess.Popen:
    """`python -m s2s_jax.translate` reading a pipe held open by the test."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "s2s_jax.translate", f"--workdir={workdir}", *flags],
                            cwd=REPO, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _send(process: subprocess.Popen, text: str) -> None:
    process.stdin.write(text)
    process.stdin.flush()


def test_cli_answers_each_line_of_a_pipe_held_open_at_once(tiny_workdir):
    """Interactive use: each line written into a pipe that stays open gets its translation back
    while the pipe is still open (the command does not wait for a chunk or the end of input)."""
    process = _command(tiny_workdir, "--search=greedy")
    try:
        for line in ("4 5 6", "7 8 9 10", "", "5 4"):
            _send(process, line + "\n")
            assert process.stdout.readline() == reverse(line) + "\n"  # blocks until it is written
        _send(process, "6 7\n8 9\n")  # two lines at once: one chunk, both answered
        assert [process.stdout.readline() for _ in range(2)] == ["7 6\n", "9 8\n"]
        process.stdin.close()
        assert process.wait(timeout=60) == 0 and process.stdout.read() == ""
        assert "lines done" not in process.stderr.read()  # no progress line for lines typed one by one
    finally:
        process.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_stops_promptly_in_one_line_leaving_no_file(tiny_workdir, tmp_path, signum):
    """The signal arrives after the first line was answered, while the command waits for more input."""
    out = tmp_path / "out.txt"
    process = _command(tiny_workdir, f"--output={out}", "--search=greedy")
    try:
        _send(process, "4 5 6\n")
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in tmp_path.iterdir()):  # its answer in the temporary file
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signum)
        stderr = process.stderr.readlines()
        assert process.wait(timeout=60) == 128 + signum, "".join(stderr)
    finally:
        process.kill()
        process.stdin.close()
    assert stderr[-1].strip() == f"translate: stopped by {signal.Signals(signum).name}", "".join(stderr)
    assert "Traceback" not in "".join(stderr) and os.listdir(tmp_path) == []
