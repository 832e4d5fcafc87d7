"""Config checks that run before anything is compiled or written, and the workdir's config.json."""
import json
import math
import os

import ml_collections

from s2s_jax import schedules
from s2s_jax.attention import SCORES

CHOICES = {
    "on_nonfinite": ("stop", "skip"),
    "data.task": ("files", "copy", "reverse", "sort"),
    "data.spm_model_type": ("unigram", "bpe"),
    "data.on_empty": ("skip", "error"),
    "model.attention": ("none",) + SCORES,
    "model.dtype": ("float32", "bfloat16"),
    "optimizer.decay": ("constant", "cosine", "rsqrt"),
    "teacher_forcing.schedule": schedules.SCHEDULES,
    "eval.search": ("greedy", "beam"),
}
POSITIVE = (
    "num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "data.vocab_size", "data.max_len", "data.batch_size", "model.embed_dim",
    "model.encoder_hidden", "model.encoder_layers", "model.decoder_hidden", "model.decoder_layers",
    "model.attention_dim", "eval.batch_size", "eval.max_decode_len", "eval.beam_size",
)
NON_NEGATIVE = ("seed", "optimizer.warmup_steps", "data.max_train_pairs", "data.max_dev_pairs",
                "data.synthetic_train_size", "data.synthetic_dev_size", "data.synthetic_seed")
REALS = ("optimizer.learning_rate", "optimizer.b1", "optimizer.b2", "optimizer.clip_norm",
         "optimizer.label_smoothing", "model.dropout", "eval.alpha", "teacher_forcing.start",
         "teacher_forcing.end", "teacher_forcing.k")
BOOLS = ("model.bidirectional", "model.reverse_source", "model.input_feeding")
# Keys that fix the parameter shapes or the vocabulary: a workdir cannot change them.
SHAPE_KEYS = ("model", "data.task", "data.vocab_size", "data.spm_model_type", "data.src_lang",
              "data.tgt_lang", "data.synthetic_vocab_size")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key."""
    for key, allowed in CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config: {key}={_get(config, key)!r} is not one of {allowed}")
    for key in POSITIVE:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config: {key}={value!r} must be a positive integer")
    for key in NON_NEGATIVE:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config: {key}={value!r} must be an integer >= 0")
    for key in REALS:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config: {key}={value!r} must be a finite number")
    for key in BOOLS:
        if not isinstance(_get(config, key), bool):
            raise ConfigError(f"config: {key}={_get(config, key)!r} must be True or False")
    boundaries = list(config.data.bucket_boundaries)
    if boundaries != sorted(set(boundaries)) or boundaries[-1] < config.data.max_len + 1:
        raise ConfigError(f"config: data.bucket_boundaries={tuple(boundaries)} must increase and end at "
                          f">= data.max_len + 1 = {config.data.max_len + 1} (room for EOS)")
    model = config.model
    memory_dim = model.encoder_hidden * (2 if model.bidirectional else 1)
    if model.attention in ("dot", "scaled_dot") and model.decoder_hidden != memory_dim:
        raise ConfigError(f"config: model.attention={model.attention!r} needs model.decoder_hidden "
                          f"({model.decoder_hidden}) == encoder output size ({memory_dim})")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"config: model.dropout={model.dropout} must lie in [0, 1)")
    if config.eval.search == "beam" and config.eval.alpha < 0:
        raise ConfigError(f"config: eval.alpha={config.eval.alpha} must be >= 0")
    tf = config.teacher_forcing
    try:
        schedules.make_schedule(tf.schedule, start=tf.start, end=tf.end, decay_steps=tf.decay_steps, k=tf.k)
    except ValueError as error:
        raise ConfigError(f"config: teacher_forcing: {error}") from error


def to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir made with other shape keys (model size, vocabulary) cannot be resumed."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    saved = _read_json(path)
    current = to_json(config)
    for key in SHAPE_KEYS:
        try:
            old = _get(saved, key)
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: has no {key}; this workdir was made by another version or "
                              "program; use a new --workdir") from None
        new = _get(current, key)
        if old != new:
            difference = next((f"{key}.{k}: {old.get(k)!r} there, {new.get(k)!r} here"
                               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)),
                              None) if isinstance(old, dict) else f"{key}: {old!r} there, {new!r} here"
            raise ConfigError(f"{path}: this workdir was made with another model shape or vocabulary "
                              f"({difference}); use a new --workdir")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable ({error})") from error


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes workdir/config.json atomically (a killed run leaves the old file or the new one)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(to_json(config), f, indent=2, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def load(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: missing; is {workdir} a training workdir?")
    return ml_collections.ConfigDict(_read_json(path))
