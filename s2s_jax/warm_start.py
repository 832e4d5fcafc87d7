"""Warm start (config.init_from): a new run starts from another workdir's parameters (its best
checkpoint, or config.init_from_step), with a fresh optimizer and step 0, and reuses its tokenizers
(recorded in this workdir's tokenizers/provenance.json under "init_from"). Resolved only while this
workdir has no checkpoint: a resumed run continues from its own checkpoints and tokenizers and no
longer needs the other workdir.

The other workdir must have the same vocabulary and model shape (every SHAPE key of
configuration.KEYS, then every parameter's shape); a difference is refused in one line naming it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax

from s2s_jax import checkpoints, configuration, files, trained

logger = logging.getLogger(__name__)


class Parent(NamedTuple):
    """What a warm start takes from config.init_from."""
    workdir: str
    params: Any
    step: int
    tokenizers: tuple | None  # (src, tgt, origin record) for data.load_corpus(reuse=...); None: synthetic


def parent(config, workdir: str) -> Parent:
    """Reads and checks config.init_from; ConfigError for another model shape or vocabulary (or
    this very workdir), CheckpointError when it has no checkpoint (or not init_from_step)."""
    other = config.init_from
    if os.path.abspath(other) == os.path.abspath(workdir):
        raise configuration.ConfigError(f"config: init_from={other!r} is this run's own workdir; rerunning "
                                        "resumes it without init_from")
    other_config = configuration.load(other)
    differences = [f"{key}: {old!r} there, {new!r} here" for key in configuration.shape_keys(config)
                   for old, new in [(_value(other_config, key), _value(config, key))] if old != new]
    if differences:
        raise configuration.ConfigError(f"config: init_from={other!r} has another vocabulary or model shape "
                                        f"({'; '.join(differences)}): a warm start needs the same")
    loaded = trained.load(other, config.init_from_step)
    logger.info("warm start from %s, checkpoint step %d", other, loaded.step)
    tokenizers = None
    if config.data.task == "files":
        origin = dict(workdir=os.path.abspath(other), step=loaded.step, provenance=_provenance(other))
        tokenizers = (loaded.src_tokenizer, loaded.tgt_tokenizer, origin)
    return Parent(other, loaded.params, loaded.step, tokenizers)


def _value(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _provenance(workdir: str) -> dict | None:
    """The other workdir's tokenizers/provenance.json (what its tokenizers were trained from)."""
    path = os.path.join(workdir, "tokenizers", "provenance.json")
    return files.read_json(path) if os.path.exists(path) else None


def check_shapes(warm: Parent, abstract_params) -> None:
    """CheckpointError naming the first parameter whose shape differs from this run's model."""
    wanted, got = checkpoints.param_shapes(abstract_params), checkpoints.param_shapes(warm.params)
    if wanted != got:
        raise checkpoints.CheckpointError(
            f"init_from={warm.workdir!r} step {warm.step} has another model shape or vocabulary: "
            f"{checkpoints.first_difference(got, wanted)}")


def start_params(warm: Parent, abstract_params):
    """The parameters the run starts from, shaped and typed like `abstract_params`."""
    check_shapes(warm, abstract_params)
    return jax.tree.map(lambda x, like: jax.numpy.asarray(x, like.dtype), warm.params, abstract_params)
