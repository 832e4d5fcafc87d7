"""Config checks that run before anything is compiled or written, and the workdir's config.json.

KEYS is the one table of config keys: a row says a key's type or choices, its range, its role on
resume and its value for workdirs written before the key existed. Adding a key is a line in
configs/default.py plus a row here (and, for a model key, the Seq2Seq field of that name).

Public entry points:
  check(config)                 every key against its row (and data.bucket_boundaries against
                                data.max_len); a key without a row is unknown.
  check_workdir(config, workdir) compares with workdir/config.json before a run resumes there:
                                refuses a change of a SHAPE key or of a TRAJECTORY key; returns
                                the changes of FREE keys.
  save / load / to_json         workdir/config.json; load fills the keys added since the file was
                                written (their `older` value) and runs check() on it (a hand-edited
                                file is refused like a bad command line, naming the file and the key).

Every error is a ConfigError of one line that names the key, its value and what it must be.
"""
import itertools
import json
import operator
import os
from typing import NamedTuple

import ml_collections

from s2s_jax import files, schedules
from s2s_jax.attention import SCORES
from s2s_jax.validate import is_int, is_number

# eval.best_metric: the dev metrics a kept best checkpoint can be ranked by (dev_loss: lower is better).
BEST_METRICS = ("dev_bleu", "dev_bleu_beam", "dev_chrf", "dev_loss")

# Roles: what a resumed run may do with a key.
SHAPE = "shape"  # fixes the parameter shapes or the vocabulary: a workdir cannot change it
TRAJECTORY = "trajectory"  # changes the training trajectory: refused on resume
FREE = "free"  # may change on resume


class Key(NamedTuple):
    """One row of KEYS."""
    kind: type  # int, float, bool, str, or tuple (bucket boundaries, checked by _check_buckets)
    allowed: str | tuple | None  # int, float: the range ("[lo, hi)", ">= lo", ...); str: the choices (None: any)
    role: str  # SHAPE, TRAJECTORY or FREE
    older: object = None  # its value in workdirs written before it existed; None: it always existed


# A range reads "[lo, hi)" (brackets include the bound, parentheses exclude it) or ">= lo" / "> lo".
KEYS = {
    "seed": Key(int, ">= 0", TRAJECTORY),
    # Free only while nothing of the trajectory depends on it (see _depends_on_num_train_steps).
    "num_train_steps": Key(int, ">= 1", FREE),
    "log_every_steps": Key(int, ">= 1", FREE),
    "eval_every_steps": Key(int, ">= 1", FREE),
    "checkpoint_every_steps": Key(int, ">= 1", FREE),
    "keep_checkpoints": Key(int, ">= 1", FREE),
    "on_nonfinite": Key(str, ("stop", "skip"), FREE),
    # Warm start (issue 20): the parameters this run starts from; older workdirs started from scratch.
    "init_from": Key(str, None, TRAJECTORY, older=""),
    "init_from_step": Key(int, ">= 0", TRAJECTORY, older=0),
    "data.task": Key(str, ("files", "copy", "reverse", "sort"), SHAPE),
    "data.train_prefix": Key(str, None, TRAJECTORY),
    "data.dev_prefix": Key(str, None, TRAJECTORY),
    "data.src_lang": Key(str, None, SHAPE),
    "data.tgt_lang": Key(str, None, SHAPE),
    # Sentencepiece's floor: 4 special ids, the word-boundary piece and one character.
    "data.vocab_size": Key(int, ">= 6", SHAPE),
    "data.spm_model_type": Key(str, ("unigram", "bpe"), SHAPE),
    # Older versions trained sentencepiece on every pair: the same for any corpus of up to a million.
    "data.spm_sample_size": Key(int, ">= 1", TRAJECTORY, older=1_000_000),
    "data.max_len": Key(int, ">= 1", TRAJECTORY),
    "data.bucket_boundaries": Key(tuple, None, TRAJECTORY),
    "data.batch_size": Key(int, ">= 1", TRAJECTORY),
    # 0 = off; else checked against the largest bucket boundary in check().
    "data.max_tokens": Key(int, ">= 0", TRAJECTORY, older=0),
    "data.joint_vocab": Key(bool, None, SHAPE, older=False),
    "data.on_empty": Key(str, ("skip", "error"), TRAJECTORY),
    "data.max_train_pairs": Key(int, ">= 0", TRAJECTORY),
    "data.max_dev_pairs": Key(int, ">= 0", TRAJECTORY),
    # Ids 0-3 are PAD, BOS, EOS, UNK: at least one symbol.
    "data.synthetic_vocab_size": Key(int, ">= 5", SHAPE),
    "data.synthetic_min_len": Key(int, ">= 1", TRAJECTORY),
    "data.synthetic_max_len": Key(int, ">= 1", TRAJECTORY),
    "data.synthetic_train_size": Key(int, ">= 1", TRAJECTORY),
    "data.synthetic_dev_size": Key(int, ">= 1", TRAJECTORY),
    "data.synthetic_seed": Key(int, ">= 0", TRAJECTORY),
    "model.embed_dim": Key(int, ">= 1", SHAPE),
    "model.encoder_hidden": Key(int, ">= 1", SHAPE),
    "model.encoder_layers": Key(int, ">= 1", SHAPE),
    "model.bidirectional": Key(bool, None, SHAPE),
    "model.reverse_source": Key(bool, None, TRAJECTORY),
    "model.decoder_hidden": Key(int, ">= 1", SHAPE),
    "model.decoder_layers": Key(int, ">= 1", SHAPE),
    "model.attention": Key(str, ("none",) + SCORES, SHAPE),
    "model.attention_dim": Key(int, ">= 1", SHAPE),
    "model.input_feeding": Key(bool, None, SHAPE),
    "model.dropout": Key(float, "[0, 1)", TRAJECTORY),
    # Older workdirs were initialised with Glorot / orthogonal (0) and ran the plain output layer (0).
    "model.init_scale": Key(float, "[0, 1]", TRAJECTORY, older=0.0),
    "model.dtype": Key(str, ("float32", "bfloat16"), TRAJECTORY),
    "model.output_chunk": Key(int, ">= 0", TRAJECTORY, older=0),
    # Sizes and vocabularies checked in _check_shared_embeddings.
    "model.tie_embeddings": Key(bool, None, SHAPE, older=False),
    "model.share_embeddings": Key(bool, None, SHAPE, older=False),
    # Adam moves each parameter by about the rate per step: above 10 a run can only diverge.
    "optimizer.learning_rate": Key(float, "(0, 10]", TRAJECTORY),
    "optimizer.warmup_steps": Key(int, ">= 0", TRAJECTORY),
    "optimizer.decay": Key(str, ("constant", "cosine", "rsqrt", "wsd"), TRAJECTORY),
    "optimizer.b1": Key(float, "[0, 1)", TRAJECTORY),
    "optimizer.b2": Key(float, "[0, 1)", TRAJECTORY),
    "optimizer.clip_norm": Key(float, ">= 0", TRAJECTORY),
    "optimizer.label_smoothing": Key(float, "[0, 1)", TRAJECTORY),
    # Plateau decay on early_stopping.metric (issue 20); older workdirs had none.
    "optimizer.plateau_factor": Key(float, "[0, 1)", TRAJECTORY, older=0.0),
    "optimizer.plateau_patience": Key(int, ">= 1", TRAJECTORY, older=2),
    # The average is part of the checkpointed state (older workdirs have none); 1 would never move.
    "optimizer.ema_decay": Key(float, "[0, 1)", TRAJECTORY, older=0.0),
    # Further checked: data.batch_size divides by it (and by it times the devices, in training).
    "optimizer.accumulate_steps": Key(int, ">= 1", TRAJECTORY, older=1),
    "teacher_forcing.schedule": Key(str, schedules.SCHEDULES, TRAJECTORY),
    "teacher_forcing.start": Key(float, "[0, 1]", TRAJECTORY),
    "teacher_forcing.end": Key(float, "[0, 1]", TRAJECTORY),
    "teacher_forcing.decay_steps": Key(int, ">= 1", TRAJECTORY),
    # Further limited per schedule by K_RANGES.
    "teacher_forcing.k": Key(float, ">= 0", TRAJECTORY),
    "teacher_forcing.mode": Key(str, ("sequential", "parallel"), TRAJECTORY, older="sequential"),
    "teacher_forcing.passes": Key(int, ">= 1", TRAJECTORY, older=1),
    "eval.batch_size": Key(int, ">= 1", FREE),
    # Decoding call shapes (issues 21, 22); older workdirs decoded 32 rows in the training buckets.
    "eval.decode_rows": Key(int, ">= 1", FREE, older=32),
    "eval.decode_buckets": Key(tuple, None, FREE, older=()),
    # The decoding calls' matmul dtype, "" = model.dtype (issue 22); older workdirs decoded as trained.
    "eval.decode_dtype": Key(str, ("", "float32", "bfloat16"), FREE, older=""),
    "eval.max_decode_len": Key(int, ">= 1", FREE),
    "eval.max_len_a": Key(float, ">= 0", FREE, older=2.0),
    "eval.max_len_b": Key(int, ">= 0", FREE, older=10),
    "eval.search": Key(str, ("greedy", "beam"), FREE),
    "eval.beam_size": Key(int, ">= 1", FREE),
    "eval.alpha": Key(float, ">= 0", FREE),
    # Issue 20: older workdirs ranked checkpoints by greedy dev BLEU and scored the dev set only.
    "eval.best_metric": Key(str, BEST_METRICS, FREE, older="dev_bleu"),
    "eval.extra_sets": Key(str, None, FREE, older=""),
    # Early stopping (issue 20); free on resume unless the plateau decay reads the metric
    # (_depends_on_evaluation). Older workdirs never stopped early.
    "early_stopping.metric": Key(str, ("off", "dev_bleu", "dev_loss"), FREE, older="off"),
    "early_stopping.patience": Key(int, ">= 1", FREE, older=5),
    "early_stopping.min_delta": Key(float, ">= 0", FREE, older=0.0),
    # Lays the same global batches out over other processes: the updates differ only in the order of
    # float sums. Further checked against each other by parallel.check_distributed.
    "distributed.coordinator_address": Key(str, None, FREE, older=""),
    "distributed.num_processes": Key(int, ">= 1", FREE, older=1),
    "distributed.process_id": Key(int, ">= 0", FREE, older=0),
    "distributed.heartbeat_timeout_s": Key(int, ">= 1", FREE, older=30),
    "distributed.init_timeout_s": Key(int, ">= 1", FREE, older=45),
}
# Views of KEYS for checks of the same values elsewhere: the numeric keys' (type, range), the choices.
RANGES = {key: (row.kind, row.allowed) for key, row in KEYS.items() if row.kind in (int, float)}
CHOICES = {key: row.allowed for key, row in KEYS.items() if row.kind is str and row.allowed is not None}
# teacher_forcing.k for the schedules that use it, unless it is schedules.AUTO_K (sized to the run).
K_RANGES = {"exponential": "(0, 1)", "inverse_sigmoid": ">= 1"}

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
    return is_int(value) if kind is int else is_number(value)


def _problem(row: Key, value) -> str | None:
    """What `value` must be for a key of this row ("is not one of ...", "must be ..."); None if it is."""
    if row.kind in (int, float):
        ok = _is_number(value, row.kind) and _in_range(value, row.allowed)
        return None if ok else _requirement(row.kind, row.allowed)
    if row.kind is bool:
        return None if isinstance(value, bool) else "must be True or False"
    if row.kind is str and row.allowed is not None:
        return None if value in row.allowed else f"is not one of {row.allowed}"
    if row.kind is str:
        return None if isinstance(value, str) else "must be a string"
    return None  # bucket boundaries: _check_buckets


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key."""
    flat = _flatten(config)
    unknown = sorted(set(flat) - set(KEYS))
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]} (the known keys are those of configs/default.py)")
    missing = sorted(set(KEYS) - set(flat))
    if missing:
        raise ConfigError(f"config: missing key {missing[0]}")
    for key, row in KEYS.items():
        problem = _problem(row, flat[key])
        if problem:
            raise ConfigError(f"config: {key}={flat[key]!r} {problem}")
    _check_buckets("data.bucket_boundaries", config.data.bucket_boundaries, config.data.max_len)
    if config.eval.decode_buckets:  # () = the training buckets
        _check_buckets("eval.decode_buckets", config.eval.decode_buckets, config.data.max_len)
    if not config.data.max_tokens and config.data.batch_size % config.optimizer.accumulate_steps:
        raise ConfigError(f"config: data.batch_size={config.data.batch_size} must be a multiple of "
                          f"optimizer.accumulate_steps={config.optimizer.accumulate_steps} (rows per micro-batch)")
    _check_max_tokens(config.data)
    _check_shared_embeddings(config)
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
    _check_evaluation_keys(config)


def _check_evaluation_keys(config: ml_collections.ConfigDict) -> None:
    """What the issue-20 keys need of each other: a beam metric needs beam evaluation, the plateau
    decay a metric, init_from_step an init_from; eval.extra_sets must parse."""
    if config.eval.best_metric == "dev_bleu_beam" and config.eval.search != "beam":
        raise ConfigError("config: eval.best_metric='dev_bleu_beam' needs eval.search='beam'")
    if config.optimizer.plateau_factor and config.early_stopping.metric == "off":
        raise ConfigError(f"config: optimizer.plateau_factor={config.optimizer.plateau_factor!r} needs a "
                          "dev metric: set early_stopping.metric to 'dev_bleu' or 'dev_loss'")
    if config.init_from_step and not config.init_from:
        raise ConfigError(f"config: init_from_step={config.init_from_step} needs init_from (a workdir)")
    extra_sets(config.eval.extra_sets)


def extra_sets(value: str) -> list[tuple[str, str]]:
    """eval.extra_sets "name=prefix,name=prefix" as [(name, prefix)]; ConfigError naming the key
    for an entry without "=", a name that is not an identifier, "dev", or given twice."""
    pairs = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        name, equals, prefix = (text.strip() for text in entry.partition("="))
        if not (equals and prefix and name.isidentifier()) or name == "dev" or name in dict(pairs):
            raise ConfigError(f"config: eval.extra_sets={value!r}: {entry!r} must be name=prefix with a "
                              "new name (letters, digits, _; not 'dev') and a file prefix")
        pairs.append((name, prefix))
    return pairs


def _check_buckets(key: str, boundaries, max_len: int) -> None:
    """Non-empty, strictly increasing integers >= 2, the last with room for max_len tokens + EOS."""
    if not (isinstance(boundaries, (tuple, list)) and boundaries and all(is_int(b) for b in boundaries)
            and boundaries[0] >= 2 and all(a < b for a, b in itertools.pairwise(boundaries))
            and boundaries[-1] >= max_len + 1):
        raise ConfigError(f"config: {key}={boundaries!r} must be a non-empty, strictly increasing sequence "
                          f"of integers >= 2 ending at >= data.max_len + 1 = {max_len + 1} (room for EOS)")


def _check_max_tokens(data_cfg) -> None:
    """0, or room for at least one row of the largest bucket (the device count is checked when the
    batches are planned: data.rows_per_bucket)."""
    longest = data_cfg.bucket_boundaries[-1]
    if 0 < data_cfg.max_tokens < longest:
        raise ConfigError(f"config: data.max_tokens={data_cfg.max_tokens} must be 0 (off: data.batch_size "
                          f"sentences) or at least the largest bucket boundary {longest} (each batch of a "
                          "bucket holds max_tokens // boundary rows)")


def _check_shared_embeddings(config: ml_collections.ConfigDict) -> None:
    """A tied embedding is the output projection transposed: equal sizes; a shared one needs one
    vocabulary for both sides (synthetic tasks have one)."""
    model = config.model
    if model.tie_embeddings and model.embed_dim != model.decoder_hidden:
        raise ConfigError(f"config: model.tie_embeddings=True needs model.embed_dim ({model.embed_dim}) == "
                          f"model.decoder_hidden ({model.decoder_hidden}): the decoder's input embedding "
                          "[vocabulary, embed_dim] is the output projection [decoder_hidden, vocabulary] "
                          "transposed")
    if model.share_embeddings and config.data.task == "files" and not config.data.joint_vocab:
        raise ConfigError("config: model.share_embeddings=True needs data.joint_vocab=True: one table serves "
                          "the encoder and the decoder only when both sides share one vocabulary")


def to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _depends_on_num_train_steps(config: ml_collections.ConfigDict) -> bool:
    """True when the trajectory is a function of num_train_steps: the cosine and wsd learning-rate
    decays end at the last step, and an auto-sized teacher-forcing k is computed from it."""
    return config.optimizer.decay in ("cosine", "wsd") or schedules.uses_num_train_steps(config.teacher_forcing)


def _unused(config: ml_collections.ConfigDict) -> set[str]:
    """Keys this config ignores: changing them changes nothing."""
    flat = _flatten(config)
    unused = set()
    if config.data.task == "files":
        unused |= {key for key in flat if key.startswith("data.synthetic_")}
    else:
        unused |= {"data.train_prefix", "data.dev_prefix", "data.src_lang", "data.tgt_lang",
                   "data.vocab_size", "data.spm_model_type", "data.spm_sample_size", "data.on_empty",
                   "data.max_train_pairs", "data.max_dev_pairs", "data.joint_vocab"}
    if config.data.max_tokens:
        unused.add("data.batch_size")
    if config.model.attention != "concat":
        unused.add("model.attention_dim")
    tf = config.teacher_forcing
    if tf.schedule == "constant":
        unused.add("teacher_forcing.end")
    if tf.schedule != "linear":
        unused.add("teacher_forcing.decay_steps")
    if tf.schedule not in K_RANGES:
        unused.add("teacher_forcing.k")
    if not config.optimizer.plateau_factor:
        unused.add("optimizer.plateau_patience")
    if not config.init_from:
        unused.add("init_from_step")
    return unused


def _depends_on_evaluation(config: ml_collections.ConfigDict) -> bool:
    """True when the trajectory is a function of the dev evaluations: the plateau decay lowers the
    learning rate after evaluations whose metric did not improve."""
    return config.optimizer.plateau_factor > 0


# Keys that shape the evaluations the plateau decay reads (_depends_on_evaluation); extra sets,
# best_metric and the beam search do not.
_EVALUATION_KEYS = ("eval_every_steps", "early_stopping.metric", "early_stopping.min_delta", "eval.batch_size",
                    "eval.max_decode_len", "eval.max_len_a", "eval.max_len_b")


def shape_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The SHAPE keys this config uses: equal values give equal parameter shapes and vocabularies."""
    unused = _unused(config)
    return [key for key, row in KEYS.items() if row.role == SHAPE and key not in unused]


def _is_free(key: str, config: ml_collections.ConfigDict) -> bool:
    """True for a FREE key (num_train_steps only while nothing depends on it); a key without a row
    (in an old config.json) is not free."""
    if key == "num_train_steps":
        return not _depends_on_num_train_steps(config)
    if key in _EVALUATION_KEYS and _depends_on_evaluation(config):
        return False
    return key in KEYS and KEYS[key].role == FREE


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compares `config` with workdir/config.json, if there is one, before anything is written.

    Raises ConfigError if a SHAPE key changed (the checkpoints cannot be restored), or if any
    other key changed that alters the training trajectory (one line naming each such key, old ->
    new). Returns the changes of free keys, "key: old → new", for the caller to log. Keys the
    config ignores (synthetic settings of a files task, k of a linear schedule, ...) are skipped;
    keys added since the workdir's config.json was written count with their `older` value.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    saved = _with_older_values(_read_config(path))
    unused = _unused(config)
    old, new = _flatten(saved), _flatten(to_json(config))
    for key in shape_keys(config):
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


def _read_config(path: str) -> dict:
    """The JSON object of a config.json; ConfigError for anything else (a list, null, ...)."""
    try:
        saved = files.read_json(path)
    except files.UnreadableFile as error:
        raise ConfigError(str(error)) from error
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a config (a JSON object of keys and groups, as training writes it) "
                          f"but {json.dumps(saved)[:40]}; restore the file or use a new --workdir")
    return saved


def _with_older_values(saved: dict) -> dict:
    """A config.json's object with each key it lacks that has an `older` value set to that value:
    the keys added since an older version wrote it."""
    present = _flatten(saved)
    for key, row in KEYS.items():
        if row.older is None or key in present:
            continue
        group, _, name = key.rpartition(".")
        node = saved.setdefault(group, {}) if group else saved
        if isinstance(node, dict):  # else a hand-edited group: check() names it
            node[name] = row.older
    return saved


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes workdir/config.json atomically (a killed run leaves the old file or the new one)."""
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, "config.json"), to_json(config))


def load(workdir: str) -> ml_collections.ConfigDict:
    """workdir/config.json, with the keys added since it was written at their `older` values, checked
    as check() checks a new config; ConfigError naming the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: missing; is {workdir} a training workdir?")
    config = ml_collections.ConfigDict(_with_older_values(_read_config(path)))
    try:
        check(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {str(error).removeprefix('config: ')}") from None
    return config


# The decoding calls' settings that a command may set for itself (--decode_buckets, --decode_rows,
# --decode_dtype).
DECODING_KEYS = ("decode_buckets", "decode_rows", "decode_dtype")


def with_decoding(config: ml_collections.ConfigDict, decoding: dict | None) -> ml_collections.ConfigDict:
    """A copy of a loaded config with some of its DECODING_KEYS (under eval) set; ConfigError naming
    a bad one."""
    if not decoding:
        return config
    unknown = sorted(set(decoding) - set(DECODING_KEYS))
    if unknown:
        raise ConfigError(f"config: {unknown[0]} is not a decoding key (those are {', '.join(DECODING_KEYS)})")
    config = ml_collections.ConfigDict(to_json(config))
    with config.ignore_type():
        for key, value in decoding.items():
            config.eval[key] = tuple(value) if key == "decode_buckets" else value
    check(config)
    return config


def flat_json(config: ml_collections.ConfigDict) -> dict:
    """{"group.key": value} of the config's JSON form (what workdir/config.json holds)."""
    return _flatten(to_json(config))
