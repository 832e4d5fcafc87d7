"""A trained workdir read for use, read-only: its config, tokenizers, model and the parameters of
one checkpoint (the best by its eval.best_metric, else the latest; or a given step). `Translator`
and the warm start (`init_from`) load workdirs with it."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from s2s_jax import checkpoints, configuration, data, steps
from s2s_jax.models import Seq2Seq, make_model


class Trained(NamedTuple):
    workdir: str
    config: Any  # the workdir's config.json (ml_collections.ConfigDict)
    model: Seq2Seq
    params: Any
    src_tokenizer: Any
    tgt_tokenizer: Any
    step: int  # the checkpoint step the params come from


def tokenizers(workdir: str, config) -> tuple[Any, Any]:
    """The workdir's (source, target) tokenizers; DataError for a missing or unreadable model."""
    if config.data.task == "files":
        return tuple(data.Tokenizer.load(os.path.join(workdir, "tokenizers", f"{side}.model"))
                     for side in ("src", "tgt"))
    tokenizer = data.IdTokenizer(config.data.synthetic_vocab_size)
    return tokenizer, tokenizer


def load(workdir: str, step: int = 0) -> Trained:
    """The workdir's model with the params of checkpoint `step` (0: the best, else the latest).

    ConfigError if `workdir` is not a training workdir, DataError for a missing tokenizer,
    CheckpointError if it holds no checkpoint (or not `step`) or one that does not fit.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise configuration.ConfigError(f"workdir {workdir} is not a directory: give a training workdir")
    config = configuration.load(workdir)
    if not _has_steps(os.path.join(workdir, "checkpoints")):
        # Checked before opening the store, which would create empty directories.
        raise checkpoints.CheckpointError(
            f"no checkpoint in workdir {workdir} (looked in checkpoints/): train a model there first")
    src_tok, tgt_tok = tokenizers(workdir, config)
    model = make_model(config.model, src_tok.vocab_size, tgt_tok.vocab_size)
    # The train-state layout is what checkpoints hold; shapes only, nothing is initialised.
    target = jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed))
    store = checkpoints.Checkpoints.reader(workdir, tokenizers=checkpoints.tokenizers_fingerprint(src_tok, tgt_tok),
                                           best_metric=config.eval.best_metric)
    try:
        state, meta = store.restore_step(step, target) if step else store.restore_best_or_latest(target)
    finally:
        store.close()
    return Trained(workdir, config, model, state.params, src_tok, tgt_tok, int(meta.get("step", state.step)))


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir's checkpoints/ lists any step (loadable or not)."""
    return _has_steps(os.path.join(workdir, "checkpoints"))


def _has_steps(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
