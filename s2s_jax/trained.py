"""A trained workdir read for use, read-only: its config, tokenizers, model and the parameters of
one checkpoint (the best by its eval.best_metric, else the latest; or a given step): the moving
average when the run keeps one (`steps.inference_params`). `Translator`, the warm start
(`init_from`) and `python -m s2s_jax.average` read workdirs with it."""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from s2s_jax import checkpoints, configuration, data, steps
from s2s_jax.models import Seq2Seq, make_model


class Workdir(NamedTuple):
    """A training workdir's model, before any checkpoint is read."""
    workdir: str
    config: Any  # the workdir's config.json (ml_collections.ConfigDict)
    model: Seq2Seq
    src_tokenizer: Any
    tgt_tokenizer: Any
    target: steps.TrainState  # shapes only (jax.eval_shape): the train state its checkpoints hold
    fingerprint: str  # checkpoints.tokenizers_fingerprint of the tokenizers

    def reader(self) -> checkpoints.Checkpoints:
        """A read-only store of the workdir's checkpoints (close it after use)."""
        return checkpoints.Checkpoints.reader(self.workdir, tokenizers=self.fingerprint,
                                              best_metric=self.config.eval.best_metric)


class Trained(NamedTuple):
    workdir: str
    config: Any  # the workdir's config.json (ml_collections.ConfigDict)
    model: Seq2Seq
    params: Any  # the weights to decode with: the moving average when the run keeps one
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


def open_workdir(workdir: str) -> Workdir:
    """config.json, the tokenizers and the model of a workdir that holds checkpoints; nothing is
    initialised. ConfigError if `workdir` is not a training workdir, DataError for a missing
    tokenizer, CheckpointError if it holds no checkpoint."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise configuration.ConfigError(f"workdir {workdir} is not a directory: give a training workdir")
    config = configuration.load(workdir)
    if not has_checkpoints(workdir):
        # Checked before opening the store, which would create empty directories.
        raise checkpoints.CheckpointError(
            f"no checkpoint in workdir {workdir} (looked in checkpoints/): train a model there first")
    src_tok, tgt_tok = tokenizers(workdir, config)
    model = make_model(config.model, src_tok.vocab_size, tgt_tok.vocab_size)
    target = jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed))
    return Workdir(workdir, config, model, src_tok, tgt_tok, target,
                   checkpoints.tokenizers_fingerprint(src_tok, tgt_tok))


def load(workdir: str, step: int = 0) -> Trained:
    """The workdir's model with the weights of checkpoint `step` (0: the best, else the latest).
    Errors as `open_workdir`, and CheckpointError for a missing `step` or one that does not fit."""
    run = open_workdir(workdir)
    store = run.reader()
    try:
        state, meta = store.restore_step(step, run.target) if step else store.restore_best_or_latest(run.target)
    finally:
        store.close()
    return Trained(workdir, run.config, run.model, steps.inference_params(state), run.src_tokenizer,
                   run.tgt_tokenizer, int(meta.get("step", state.step)))


def has_checkpoints(workdir: str) -> bool:
    """Whether the workdir's checkpoints/ lists any step (loadable or not)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
