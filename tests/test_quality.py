"""Search quality and dev-BLEU consistency on a real-text model trained in the test session
(`text_workdir`: 2,000 short es->en pairs of the bundled corpus)."""
import json
import os
import subprocess
import sys

import pytest

from s2s_jax import data, metrics
from tests.conftest import REPO

# Checks on the real-text session fixture (a model trained for ~80 s): the extended suite.
pytestmark = pytest.mark.slow


def summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def translate_cli(workdir: str, source: str, *flags: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "s2s_jax.translate", f"--workdir={workdir}",
                             f"--input={source}", *flags], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_beam5_not_below_greedy_on_a_trained_text_model(text_workdir):
    figures = summary(text_workdir)
    assert figures["dev_bleu"] > 10.0, figures          # the model learned its data
    assert figures["dev_bleu_beam"] >= figures["dev_bleu"], figures


def test_dev_bleu_equals_translate_on_the_dev_file(text_workdir):
    """Dev BLEU during training depends on the dev sources only: translate, with the workdir's
    options, reproduces it to every digit, greedy and beam."""
    from s2s_jax import configuration
    config = configuration.load(text_workdir)
    source, references = config.data.dev_prefix + ".es", data.read_lines(config.data.dev_prefix + ".en")
    figures = summary(text_workdir)
    greedy, _ = metrics.sacrebleu_score(translate_cli(text_workdir, source, "--search=greedy"), references)
    beam, _ = metrics.sacrebleu_score(translate_cli(text_workdir, source, "--search=beam"), references)
    assert (greedy, beam) == (figures["dev_bleu"], figures["dev_bleu_beam"])
