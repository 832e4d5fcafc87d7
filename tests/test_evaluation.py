"""Tests for s2s_jax.evaluation."""
import logging

import numpy as np

from s2s_jax import EOS_ID, data, evaluation, parallel
from s2s_jax.models import make_model


def no_search(model, params, src, **_):
    """Stands for the search (nothing to compile): an empty hypothesis for each of the [rows] sources."""
    rows = len(src)
    return np.full((rows, 1, 1), EOS_ID), np.zeros((rows, 1)), np.ones((rows, 1), np.int32)


def test_a_long_dev_source_warns_at_the_first_evaluation_only(tiny_config, tmp_path, caplog):
    """Before: every evaluation warned again about every long dev source."""
    config = tiny_config
    config.data.max_len, config.data.synthetic_dev_size = 6, 6
    corpus = data.load_corpus(config.data, str(tmp_path))
    long = [i for i, ids in enumerate(corpus.dev_src) if len(ids) > 6]
    assert long  # dev sources of 2..10 symbols
    model = make_model(config.model, corpus.src_tokenizer.vocab_size, corpus.tgt_tokenizer.vocab_size)
    evaluator = evaluation.Evaluator(config.eval, config.data, corpus, model, parallel.make_mesh())
    evaluator.decoder.decode_batch = no_search
    with caplog.at_level(logging.WARNING, logger="s2s_jax"):
        for _ in range(2):
            assert evaluator.translate(None, "greedy") == [""] * 6
    warned = [r.getMessage() for r in caplog.records if "truncated to the first 6" in r.getMessage()]
    assert [message.split(" ")[1] for message in warned] == [str(i) for i in long]
