"""Config checks that run before anything is compiled or written, and the workdir's config.json.

Public entry points:
  check(config)                 every field against the tables below (CHOICES, RANGES, BOOLS,
                                STRINGS, bucket_boundaries); a key in none of them is unknown.
  check_workdir(config, workdir) compares with workdir/config.json before a run resumes there:
                                refuses a change of a SHAPE_KEYS key or of any key that changes
                                the training trajectory; returns the changes of FREE_KEYS.
  save / load / to_json         workdir/config.json; load runs check() on it (a hand-edited file
                                is refused like a bad command line, naming the file and the key).

Every error is a ConfigError of one line that names the key, its value and what it must be.
"""
import itertools
import json
import math
import numbers
import operator
import os

import ml_collections

from s2s_jax import schedules
from s2s_jax.attention import SCORES
from s2s_jax.validate import is_int

CHOICES = {
    "on_nonfinite": ("stop", "skip"),
    "data.task": ("files", "copy", "reverse", "sort"),
    "data.spm_model_type": ("unigram", "bpe"),
    "data.on_empty": ("skip", "error"),
    "model.attention": ("none",) + SCORES,
    "model.dtype": ("float32", "bfloat16"),
    "optimizer.decay": ("constant", "cosine", "rsqrt", "wsd"),
    "teacher_forcing.schedule": schedules.SCHEDULES,
    "teacher_forcing.mode": ("sequential", "parallel"),
    "eval.search": ("greedy", "beam"),
}
# Numeric keys: (type, valid range). A range reads "[lo, hi)" (brackets include the bound,
# parentheses exclude it) or ">= lo" / "> lo".
RANGES = {
    "seed": (int, ">= 0"),
    "num_train_steps": (int, ">= 1"),
    "log_every_steps": (int, ">= 1"),
    "eval_every_steps": (int, ">= 1"),
    "checkpoint_every_steps": (int, ">= 1"),
    "keep_checkpoints": (int, ">= 1"),
    # Sentencepiece's floor: 4 special ids, the word-boundary piece and one character.
    "data.vocab_size": (int, ">= 6"),
    "data.max_len": (int, ">= 1"),
    "data.batch_size": (int, ">= 1"),
    "data.max_train_pairs": (int, ">= 0"),
    "data.spm_sample_size": (int, ">= 1"),
    "data.max_dev_pairs": (int, ">= 0"),
    # Ids 0-3 are PAD, BOS, EOS, UNK: at least one symbol.
    "data.synthetic_vocab_size": (int, ">= 5"),
    "data.synthetic_min_len": (int, ">= 1"),
    "data.synthetic_max_len": (int, ">= 1"),
    "data.synthetic_train_size": (int, ">= 1"),
    "data.synthetic_dev_size": (int, ">= 1"),
    "data.synthetic_seed": (int, ">= 0"),
    "model.embed_dim": (int, ">= 1"),
    "model.encoder_hidden": (int, ">= 1"),
    "model.encoder_layers": (int, ">= 1"),
    "model.decoder_hidden": (int, ">= 1"),
    "model.decoder_layers": (int, ">= 1"),
    "model.attention_dim": (int, ">= 1"),
    "model.dropout": (float, "[0, 1)"),
    "model.output_chunk": (int, ">= 0"),
    "model.init_scale": (float, "[0, 1]"),
    # Adam moves each parameter by about the rate per step: above 10 a run can only diverge.
    "optimizer.learning_rate": (float, "(0, 10]"),
    "optimizer.warmup_steps": (int, ">= 0"),
    "optimizer.b1": (float, "[0, 1)"),
    "optimizer.b2": (float, "[0, 1)"),
    "optimizer.clip_norm": (float, ">= 0"),
    "optimizer.label_smoothing": (float, "[0, 1)"),
    "teacher_forcing.start": (float, "[0, 1]"),
    "teacher_forcing.end": (float, "[0, 1]"),
    "teacher_forcing.decay_steps": (int, ">= 1"),
    # Further limited per schedule by K_RANGES.
    "teacher_forcing.k": (float, ">= 0"),
    "teacher_forcing.passes": (int, ">= 1"),
    "eval.batch_size": (int, ">= 1"),
    "eval.max_decode_len": (int, ">= 1"),
    "eval.beam_size": (int, ">= 1"),
    "eval.alpha": (float, ">= 0"),
    "eval.max_len_a": (float, ">= 0"),
    "eval.max_len_b": (int, ">= 0"),
    # Further checked against each other by parallel.check_distributed.
    "distributed.num_processes": (int, ">= 1"),
    "distributed.process_id": (int, ">= 0"),
    "distributed.heartbeat_timeout_s": (int, ">= 1"),
    "distributed.init_timeout_s": (int, ">= 1"),
}
# teacher_forcing.k for the schedules that use it, unless it is schedules.AUTO_K (sized to the run).
K_RANGES = {"exponential": "(0, 1)", "inverse_sigmoid": ">= 1"}
BOOLS = ("model.bidirectional", "model.reverse_source", "model.input_feeding")
STRINGS = ("data.train_prefix", "data.dev_prefix", "data.src_lang", "data.tgt_lang",
           "distributed.coordinator_address")
KNOWN_KEYS = frozenset(CHOICES) | frozenset(RANGES) | frozenset(BOOLS) | frozenset(STRINGS) | {
    "data.bucket_boundaries"}

# Keys that fix the parameter shapes or the vocabulary: a workdir cannot change them.
SHAPE_KEYS = (
    "data.task", "data.vocab_size", "data.spm_model_type", "data.src_lang", "data.tgt_lang",
    "data.synthetic_vocab_size", "model.embed_dim", "model.encoder_hidden", "model.encoder_layers",
    "model.bidirectional", "model.decoder_hidden", "model.decoder_layers", "model.attention",
    "model.attention_dim", "model.input_feeding",
)
# Keys (or groups) a resumed run may change: they do not change the training trajectory. Every other
# key does, so a new key is refused by default. num_train_steps is free only while nothing of the
# trajectory depends on it (see _depends_on_num_train_steps). `distributed` lays the same global
# batches out over other processes: the updates differ only in the order of float sums.
FREE_KEYS = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "on_nonfinite", "eval", "distributed")

_ABSENT = object()
_COMPARE = {"[": operator.ge, "(": operator.gt, "]": operator.le, ")": operator.lt,
            ">=": operator.ge, ">": operator.gt}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _flatten(tree, prefix: str = "") -> dict:
    """{"group.key": value} of a ConfigDict or of its JSON form."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _in_range(value, interval: str) -> bool:
    if interval[0] in "[(":
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        return _COMPARE[interval[0]](value, low) and _COMPARE[interval[-1]](value, high)
    op, bound = interval.split()
    return _COMPARE[op](value, float(bound))


def _requirement(kind: type, interval: str) -> str:
    if kind is int:
        return "must be a positive integer" if interval == ">= 1" else f"must be an integer {interval}"
    return f"must lie in {interval}" if interval[0] in "[(" else f"must be {interval}"


def _is_number(value, kind: type) -> bool:
    if kind is int:
        return is_int(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key."""
    flat = _flatten(config)
    unknown = sorted(set(flat) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]} (the known keys are those of configs/default.py)")
    missing = sorted(KNOWN_KEYS - set(flat))
    if missing:
        raise ConfigError(f"config: missing key {missing[0]}")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config: {key}={flat[key]!r} is not one of {allowed}")
    for key, (kind, interval) in RANGES.items():
        if not (_is_number(flat[key], kind) and _in_range(flat[key], interval)):
            raise ConfigError(f"config: {key}={flat[key]!r} {_requirement(kind, interval)}")
    for key in BOOLS:
        if not isinstance(flat[key], bool):
            raise ConfigError(f"config: {key}={flat[key]!r} must be True or False")
    for key in STRINGS:
        if not isinstance(flat[key], str):
            raise ConfigError(f"config: {key}={flat[key]!r} must be a string")
    _check_bucket_boundaries(config.data)
    if config.data.synthetic_min_len > config.data.synthetic_max_len:
        raise ConfigError(f"config: data.synthetic_min_len={config.data.synthetic_min_len} must be <= "
                          f"data.synthetic_max_len={config.data.synthetic_max_len}")
    model = config.model
    memory_dim = model.encoder_hidden * (2 if model.bidirectional else 1)
    if model.attention in ("dot", "scaled_dot") and model.decoder_hidden != memory_dim:
        raise ConfigError(f"config: model.attention={model.attention!r} needs model.decoder_hidden "
                          f"({model.decoder_hidden}) == encoder output size ({memory_dim})")
    tf = config.teacher_forcing
    interval = K_RANGES.get(tf.schedule)
    if interval and tf.k != schedules.AUTO_K and not _in_range(tf.k, interval):
        raise ConfigError(f"config: teacher_forcing.k={tf.k!r} {_requirement(float, interval)} (or be "
                          f"{schedules.AUTO_K}: sized to the run) for the {tf.schedule} schedule")


def _check_bucket_boundaries(data_cfg) -> None:
    """Non-empty, strictly increasing integers >= 2, the last with room for max_len tokens + EOS."""
    boundaries = data_cfg.bucket_boundaries
    if not (isinstance(boundaries, (tuple, list)) and boundaries and all(is_int(b) for b in boundaries)
            and boundaries[0] >= 2 and all(a < b for a, b in itertools.pairwise(boundaries))
            and boundaries[-1] >= data_cfg.max_len + 1):
        raise ConfigError(f"config: data.bucket_boundaries={boundaries!r} must be a non-empty, strictly "
                          "increasing sequence of integers >= 2 ending at >= data.max_len + 1 = "
                          f"{data_cfg.max_len + 1} (room for EOS)")


def to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _depends_on_num_train_steps(config: ml_collections.ConfigDict) -> bool:
    """True when the trajectory is a function of num_train_steps: the cosine and wsd learning-rate
    decays end at the last step, and an auto-sized teacher-forcing k is computed from it."""
    return config.optimizer.decay in ("cosine", "wsd") or schedules.uses_num_train_steps(config)


def _unused(config: ml_collections.ConfigDict) -> set[str]:
    """Keys this config ignores: changing them changes nothing."""
    flat = _flatten(config)
    unused = set()
    if config.data.task == "files":
        unused |= {key for key in flat if key.startswith("data.synthetic_")}
    else:
        unused |= {"data.train_prefix", "data.dev_prefix", "data.src_lang", "data.tgt_lang",
                   "data.vocab_size", "data.spm_model_type", "data.spm_sample_size", "data.on_empty",
                   "data.max_train_pairs", "data.max_dev_pairs"}
    if config.model.attention != "concat":
        unused.add("model.attention_dim")
    tf = config.teacher_forcing
    if tf.schedule == "constant":
        unused.add("teacher_forcing.end")
    if tf.schedule != "linear":
        unused.add("teacher_forcing.decay_steps")
    if tf.schedule not in K_RANGES:
        unused.add("teacher_forcing.k")
    return unused


def _is_free(key: str, config: ml_collections.ConfigDict) -> bool:
    if key == "num_train_steps":
        return not _depends_on_num_train_steps(config)
    return any(key == free or key.startswith(f"{free}.") for free in FREE_KEYS)


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compares `config` with workdir/config.json, if there is one, before anything is written.

    Raises ConfigError if a SHAPE_KEYS key changed (the checkpoints cannot be restored), or if any
    other key changed that alters the training trajectory (one line naming each such key, old ->
    new). Returns the changes of free keys, "key: old → new", for the caller to log. Keys the
    config ignores (synthetic settings of a files task, k of a linear schedule, ...) are skipped.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    saved = _read_config(path)
    unused = _unused(config)
    old, new = _flatten(saved), _flatten(to_json(config))
    for key in SHAPE_KEYS:
        if key in unused:
            continue
        if key not in old:
            raise ConfigError(f"{path}: has no {key}; this workdir was made by another version or "
                              "program; use a new --workdir")
        if old[key] != new[key]:
            raise ConfigError(f"{path}: this workdir was made with another model shape or vocabulary "
                              f"({key}: {old[key]!r} there, {new[key]!r} here); use a new --workdir")
    changed = sorted(key for key in (set(old) | set(new)) - unused
                     if old.get(key, _ABSENT) != new.get(key, _ABSENT))
    trajectory = [_change(key, old, new) for key in changed if not _is_free(key, config)]
    if trajectory:
        raise ConfigError(f"{path}: this workdir was trained with other settings, and resuming would "
                          f"continue on another trajectory ({'; '.join(trajectory)}); restore the old "
                          "values or use a new --workdir")
    return [_change(key, old, new) for key in changed]


def _change(key: str, old: dict, new: dict) -> str:
    """ "key: old → new"; a side without the key shows "absent"."""
    show = [repr(flat[key]) if key in flat else "absent" for flat in (old, new)]
    return f"{key}: {show[0]} → {show[1]}"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable ({error})") from error


def _read_config(path: str) -> dict:
    """The JSON object of a config.json; ConfigError for anything else (a list, null, ...)."""
    saved = _read_json(path)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a config (a JSON object of keys and groups, as training writes it) "
                          f"but {json.dumps(saved)[:40]}; restore the file or use a new --workdir")
    return saved


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes workdir/config.json atomically (a killed run leaves the old file or the new one)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(to_json(config), f, indent=2, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def load(workdir: str) -> ml_collections.ConfigDict:
    """workdir/config.json, checked as check() checks a new config; ConfigError naming the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: missing; is {workdir} a training workdir?")
    config = ml_collections.ConfigDict(_read_config(path))
    try:
        check(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {str(error).removeprefix('config: ')}") from None
    return config


def flat_json(config: ml_collections.ConfigDict) -> dict:
    """{"group.key": value} of the config's JSON form (what workdir/config.json holds)."""
    return _flatten(to_json(config))
