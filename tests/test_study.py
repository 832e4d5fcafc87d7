"""bench/study.py end to end on its tiny preset: two variants (the reference, which has attention maps
and an exposure gap, and attention "none", which has neither) trained, analysed and written (about
40 s on 2 CPU cores), then rerun from the command line on the same directory, which must train
nothing. It is one test, so the tiny study is trained once.

Independent references: sacrebleu's dev BLEU of the training evaluation (the one non-empty length
bucket of the synthetic task must equal it) and the training evaluation's teacher-forced dev loss
(the study's loss sum at teacher-forcing ratio 1 must equal it).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from s2s_jax import data
from s2s_jax.translate import Translator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "study.py")
NAMES = ("attn_general", "attn_none")
WITH_EXPOSURE = "attn_general"  # also the one with attention maps
ROW_KEYS = {"name", "overrides", "dev_bleu_greedy", "dev_bleu_beam5", "chrf", "dev_loss", "train_tokens_per_s",
            "parameters", "steps", "wall_s", "bleu_by_length"}
NUMBER_KEYS = ("dev_bleu_greedy", "dev_bleu_beam5", "chrf", "dev_loss", "train_tokens_per_s", "parameters",
               "steps", "wall_s")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(out: str) -> dict:
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_tiny_study_end_to_end(study, tmp_path):
    out = str(tmp_path)
    returned = study.run_study("tiny", out, NAMES)
    assert _results(out) == returned
    _check_results_json(returned)
    _check_bleu_by_length(returned["variants"])
    _check_teacher_forced_loss(study, out, returned["variants"][0])
    _check_markdown(out, returned["variants"])
    _check_images(study, out)
    _check_rerun_trains_nothing(out, returned)


def _check_results_json(results: dict) -> None:
    assert results["preset"] == "tiny"
    assert results["signature"].startswith("nrefs:1|") and "tok:13a" in results["signature"]
    assert results["machine"]["device"] and results["machine"]["platform"]
    assert results["reference"] is None  # seed_1 and seed_2 did not run
    rows = results["variants"]
    assert [r["name"] for r in rows] == list(NAMES)
    for row in rows:
        exposure = {"dev_loss_free_running"} if row["name"] == WITH_EXPOSURE else set()
        assert ROW_KEYS | exposure == set(row), row["name"]
        for key in NUMBER_KEYS + tuple(exposure):
            assert math.isfinite(row[key]), (row["name"], key)
        assert row["steps"] == 30 and row["parameters"] > 0 and row["train_tokens_per_s"] > 0
        assert 0 < row["dev_loss"] < 10
    assert [r["overrides"] for r in rows] == [{"model.attention": "general"}, {"model.attention": "none"}]
    assert rows[0]["parameters"] > rows[1]["parameters"]  # the general score's matrix
    reference = rows[0]
    assert 0 < reference["dev_loss_free_running"] < 10
    # ratio 0 feeds the model's own predictions: not the teacher-forced loss again
    assert abs(reference["dev_loss_free_running"] - reference["dev_loss"]) > 1e-6


def _check_bleu_by_length(rows: list[dict]) -> None:
    for row in rows:
        buckets = row["bleu_by_length"]
        assert [b["bucket"] for b in buckets] == ["0-10", "11-20", "21-30", "31-40", "41+"]
        # synthetic sources have 2..10 symbols: all 64 dev sentences in the first bucket
        assert [b["sentences"] for b in buckets] == [64, 0, 0, 0, 0]
        assert all(b["bleu"] is None for b in buckets[1:])
        # on id tokens whitespace and 13a tokenization agree: the corpus BLEU of the greedy run
        assert buckets[0]["bleu"] == pytest.approx(row["dev_bleu_greedy"], abs=1e-9), row["name"]


def _check_teacher_forced_loss(study, out: str, row: dict) -> None:
    workdir = os.path.join(out, "runs", row["name"])
    translator = Translator.from_workdir(workdir)
    corpus = data.load_corpus(translator.config.data, workdir)
    assert study.dev_loss(translator, corpus, tf_ratio=1.0) == pytest.approx(row["dev_loss"], rel=1e-5)


def _check_markdown(out: str, rows: list[dict]) -> None:
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    for row in rows:
        table_rows = [line for line in lines if line.startswith(f"| {row['name']} |")]
        # the main table, and for the reference the exposure-gap table
        assert len(table_rows) == (2 if row["name"] == WITH_EXPOSURE else 1), table_rows
        assert f"| {row['dev_bleu_greedy']:.2f} | {row['dev_bleu_beam5']:.2f} |" in table_rows[0]
    reference = rows[0]
    assert (f"| {reference['name']} | {reference['dev_loss']:.3f} | {reference['dev_loss_free_running']:.3f} | "
            f"{reference['dev_loss_free_running'] - reference['dev_loss']:.3f} |") in lines
    assert any("sacrebleu nrefs:1|" in line for line in lines)
    assert "reference over 3 seeds: not run (needs attn_general, seed_1, seed_2)" in lines


def _check_images(study, out: str) -> None:
    sources = data.load_corpus(study.make_config("tiny", {}).data, out).dev_src_text
    indices = study.attention_indices(sources)
    assert len(indices) == 3 and all(8 <= len(sources[i].split()) <= 20 for i in indices)
    expected = {f"{WITH_EXPOSURE}_i{i}.png" for i in indices}  # none for attention "none"
    assert set(os.listdir(os.path.join(out, "attention"))) == expected
    paths = [os.path.join(out, name) for name in ("bleu_by_length.png", "exposure_gap.png")]
    paths += [os.path.join(out, "attention", name) for name in sorted(expected)]
    for path in paths:
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, path
        assert pixels.shape[2] in (3, 4), path
        assert np.ptp(pixels[..., :3]) > 0, f"{path} is blank"


def _check_rerun_trains_nothing(out: str, results: dict) -> None:
    summaries = [os.path.join(out, "runs", name, "summary.json") for name in NAMES]
    before = [os.stat(path).st_mtime_ns for path in summaries]
    checkpoints = {name: sorted(os.listdir(os.path.join(out, "runs", name, "checkpoints"))) for name in NAMES}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, SCRIPT, "--preset=tiny", f"--out={out}", f"--only={','.join(NAMES)}"],
                          cwd=os.path.dirname(out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [os.stat(path).st_mtime_ns for path in summaries] == before
    assert {name: sorted(os.listdir(os.path.join(out, "runs", name, "checkpoints"))) for name in NAMES} == checkpoints
    assert "step 10/30" not in done.stdout  # no training step ran
    assert _results(out)["variants"] == results["variants"]  # same summaries, same deterministic analyses


def test_reference_is_the_mean_and_spread_over_three_seeds(study):
    rows = [dict(name=name, dev_bleu_greedy=greedy, dev_bleu_beam5=beam)
            for name, greedy, beam in (("attn_general", 10.0, 12.0), ("attn_dot", 50.0, 50.0),
                                       ("seed_1", 13.0, 11.0), ("seed_2", 7.0, 16.0))]
    reference = study.reference_stats(rows)
    assert reference["dev_bleu_greedy"] == pytest.approx(dict(mean=10.0, spread=6.0))
    assert reference["dev_bleu_beam5"] == pytest.approx(dict(mean=13.0, spread=5.0))
    assert study.reference_stats([r for r in rows if r["name"] != "seed_2"]) is None


def test_only_names_variants(study):
    assert study.parse_args(["--preset=cpu", "--out=x"]).only == list(study.VARIANTS)
    assert study.parse_args(["--preset=gpu", "--out=x", "--only=seed_2,attn_none"]).only == ["seed_2", "attn_none"]
    with pytest.raises(SystemExit):
        study.parse_args(["--preset=tiny", "--out=x", "--only=attn_general,attn_bogus"])
