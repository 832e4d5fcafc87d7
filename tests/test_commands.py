"""Issue 20: console scripts, `python -m s2s_jax.evaluate`, extra evaluation sets and the warm
start's refusal, on the session's tiny model."""
import importlib
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from s2s_jax import configuration, evaluation, metrics, parallel, warm_start
from s2s_jax.translate import Translator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("4 5 6 7", "7 6 5 4"), ("10 11 12", "12 11 10"), ("9 8 7 6 5", "5 6 7 8 9")]


def test_every_command_is_a_console_script():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    commands = {name[:-3] for name in os.listdir(os.path.join(REPO, "s2s_jax")) if name.endswith(".py")
                and "def run() -> None" in open(os.path.join(REPO, "s2s_jax", name), encoding="utf-8").read()}
    assert {"train_command", "translate", "export", "evaluate", "score", "average", "serve"} <= commands
    assert {target.split(":")[0].split(".")[1] for target in scripts.values()} == commands
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_train_console_script_finds_the_config_package_from_anywhere(tmp_path):
    """s2s-train runs outside the repository: configs/demo.py's `from configs import default` works."""
    code = ("import sys; from s2s_jax.train_command import run; "
            f"sys.argv = ['s2s-train', '--config={REPO}/configs/demo.py', '--workdir=w', '--config.seed=-1']; run()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    assert result.returncode == 2 and result.stderr.strip() == "error: config: seed=-1 must be an integer >= 0"


def _write_set(prefix) -> None:
    for side, lang in enumerate(("es", "en")):
        with open(f"{prefix}.{lang}", "w", encoding="utf-8") as f:
            f.write("".join(pair[side] + "\n" for pair in PAIRS))


def test_evaluate_scores_a_set_and_records_it(tiny_workdir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_workdir, workdir)  # evaluate writes metrics.jsonl and summary.json
    _write_set(tmp_path / "held")
    result = subprocess.run([sys.executable, "-m", "s2s_jax.evaluate", f"--workdir={workdir}",
                             f"--prefix={tmp_path / 'held'}", "--search=greedy"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    translator = Translator.from_workdir(workdir)
    hyps = translator.translate([s for s, _ in PAIRS], search="greedy")
    bleu, signature = metrics.sacrebleu_score(hyps, [t for _, t in PAIRS])
    assert row["held_bleu"] == pytest.approx(bleu) and row["held_bleu_signature"] == signature
    assert row["held_chrf"] == pytest.approx(metrics.chrf_score(hyps, [t for _, t in PAIRS]))
    scores = translator.score([s for s, _ in PAIRS], [t for _, t in PAIRS])
    assert row["held_loss"] == pytest.approx(-sum(s.log_prob for s in scores) / sum(s.pieces for s in scores))
    assert row["step"] == translator.steps[0] and "held_bleu_beam" not in row
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        assert json.loads(f.readlines()[-1]) == row
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["evaluations"]["held"] == row


def test_extra_sets_are_scored_like_the_dev_set(tiny_workdir, tmp_path):
    """An extra set holding the dev pairs gets the dev set's figures under its own name."""
    from s2s_jax import data
    config = configuration.load(tiny_workdir)
    corpus = data.load_corpus(config.data, tiny_workdir)
    prefix = tmp_path / "again"
    for lines, lang in ((corpus.dev_src_text, "es"), (corpus.dev_tgt_text, "en")):
        (tmp_path / f"again.{lang}").write_text("".join(line + "\n" for line in lines))
    config.eval.extra_sets = f"again={prefix}"
    sets = evaluation.eval_sets(config.eval, config.data, corpus)
    assert [s.name for s in sets] == ["dev", "again"]
    translator = Translator.from_workdir(tiny_workdir)
    evaluator = evaluation.Evaluator(config.eval, config.data, corpus, translator.model, parallel.make_mesh(), sets)
    result = evaluator(translator.params)
    for key in ("loss", "ppl", "bleu", "chrf"):
        assert result[f"again_{key}"] == pytest.approx(result[f"dev_{key}"]), key


@pytest.mark.parametrize("value", ["test", "dev=x", "a=x,a=y", "1a=x"])
def test_bad_extra_sets_name_the_key(tiny_config, value):
    tiny_config.eval.extra_sets = value
    with pytest.raises(configuration.ConfigError, match="eval.extra_sets="):
        configuration.check(tiny_config)


def test_warm_start_from_another_shape_is_refused_in_one_line(tiny_workdir, tiny_config, tmp_path):
    tiny_config.init_from = tiny_workdir
    tiny_config.model.decoder_hidden = 32
    with pytest.raises(configuration.ConfigError) as error:
        warm_start.parent(tiny_config, str(tmp_path / "new"))
    assert str(error.value) == (f"config: init_from={tiny_workdir!r} has another vocabulary or model shape "
                                "(model.decoder_hidden: 64 there, 32 here): a warm start needs the same")
    tiny_config.model.decoder_hidden = 64
    tiny_config.init_from_step = 7
    with pytest.raises(Exception, match="no checkpoint step 7"):
        warm_start.parent(tiny_config, str(tmp_path / "new"))
