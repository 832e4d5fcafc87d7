"""Beam search on a trained demo model scores at least greedy dev BLEU (issue 4).

Needs a workdir made by the quick start (`train.py --config=configs/demo.py`, ~8 minutes), named
by S2S_DEMO_WORKDIR (default runs/demo); skipped when there is none. Measured figures: BUILD_NOTES.md.
"""
import os

import pytest

from s2s_jax import data, metrics
from s2s_jax.translate import Translator
from tests.conftest import REPO

WORKDIR = os.environ.get("S2S_DEMO_WORKDIR", os.path.join(REPO, "runs", "demo"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(WORKDIR, "checkpoints")),
                    reason=f"no trained demo workdir at {WORKDIR}")
def test_beam5_not_below_greedy_on_dev():
    sources = data.read_lines(os.path.join(REPO, "data/bible-es-en/dev.es"))
    references = data.read_lines(os.path.join(REPO, "data/bible-es-en/dev.en"))
    translator = Translator.from_workdir(WORKDIR)
    greedy, _ = metrics.sacrebleu_score(translator.translate(sources, search="greedy"), references)
    beam, _ = metrics.sacrebleu_score(translator.translate(sources, beam_size=5, alpha=0.6), references)
    assert greedy > 2.8
    assert beam >= greedy
