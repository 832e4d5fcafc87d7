"""Orbax checkpoints in the workdir's `checkpoints/`: the last k steps and the best by a dev metric.

One orbax CheckpointManager keeps them, with a preservation policy (orbax-checkpoint >= 0.11.15):
a step stays while it is one of the `keep` newest or the best by `best_metric` (config
eval.best_metric: dev_bleu by default; dev_loss ranks lower first; the newer of equals). A step
saved without that metric ranks below any step with it, so it never evicts the best step, and the
best step outlives any number of newer ones.

A checkpoint holds the train state (step, params, optimizer state, and the parameters' moving
average when the run keeps one; a None field is not stored) as a state dict, a JSON `meta`
record (step, logging window, early-stopping state, vocabulary sizes, parameter shapes, the
fingerprint of the tokenizers it was trained with, and a CRC32 of every floating-point array of the
state; checkpoints of older versions also hold data_position and epoch, ignored) and orbax's
`metrics` record (the step's dev metrics, {"dev_bleu": x, "dev_loss": y, ...}; older versions:
{"dev_bleu": x}; {} for a step saved without evaluation).

Writer and readers: `Checkpoints(workdir, keep)` is the store of the training run that holds the
workdir lock, the only one that writes, prunes or cleans up. `Checkpoints.reader(workdir)` (translate,
export) opens the store read-only: it creates, deletes and moves nothing, so a model can be loaded
while its run trains (a save in progress is left alone).

Tokenizers: a store opened with `tokenizers=tokenizers_fingerprint(src, tgt)` records the
fingerprint with each checkpoint and refuses (CheckpointError) to restore a checkpoint trained with
other tokenizers; a checkpoint without one (older versions) is accepted.

Crash safety:
- Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
  run killed mid-save leaves nothing that `restore_latest` would list; the writer removes the
  leftover when it opens the store.
- A listed step that still fails to load (missing or truncated files, a checksum that does not
  match) is skipped with a one-line warning naming it, and the next older one is tried. If training
  later reaches that step again, the unreadable directory is moved aside to `<step>.unreadable-<n>`
  (kept for inspection, never loaded) so that the new checkpoint can take its place.
- If steps are listed but none loads, restoring raises CheckpointError naming each step and its
  error, and changes nothing: starting over is the user's choice (move the directory aside or use
  a new workdir), never a silent restart from step 0. An I/O error other than a missing file
  (PermissionError, EIO) is not an unreadable step: it raises CheckpointError at once.
- A failed write (disk full, read-only directory) raises CheckpointError naming the step and the
  previous checkpoint; the checkpoints written before it are untouched (old steps are deleted
  only after a write has succeeded).
- Non-finite parameters are never written (CheckpointError).
"""
import contextlib
import functools
import hashlib
import logging
import math
import os
import sys
import traceback
import zlib
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from s2s_jax import data, parallel

logger = logging.getLogger(__name__)
# How often a reader lists the steps again when the run prunes the one it was reading.
READER_ATTEMPTS = 5


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the model."""


class _ListingChanged(Exception):
    """A reader's step failed to load while the run changed the steps on disk (internal: retry)."""


class _Unreadable(Exception):
    """A checkpoint step whose contents do not verify (internal: the step is skipped)."""


def _rank(metrics: dict, best_metric: str) -> float:
    """The rank of a step: its `best_metric` (negated for dev_loss: higher ranks better), or -inf
    for a step saved without it (metrics {})."""
    value = metrics.get(best_metric)
    if value is None:
        return -math.inf
    return -value if best_metric == "dev_loss" else value


def _manager(directory: str, keep: int, read_only: bool, best_metric: str) -> ocp.CheckpointManager:
    """Orbax's manager; read_only: it creates, cleans up, saves and deletes nothing."""
    policies = ocp.checkpoint_managers
    rank = functools.partial(_rank, best_metric=best_metric)
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only, cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=False,
        # best_fn makes orbax store each step's metrics and rank them in best_step(), in the same
        # order as BestN below (ascending, the last of equals wins).
        best_fn=rank, best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=rank, reverse=False, n=1,
                           keep_checkpoints_without_metrics=False)]))
    absl_logger, quiet = logging.getLogger("absl"), _ReadOnlyNotice()
    absl_logger.addFilter(quiet)
    try:
        return ocp.CheckpointManager(os.path.abspath(directory), options=options)
    finally:
        absl_logger.removeFilter(quiet)


class _ReadOnlyNotice(logging.Filter):
    """Orbax's warning that a read-only manager's directory is read-only: what a reader asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


class _DemoteErrors(logging.Filter):
    """Turns orbax's own ERROR records (a traceback per failed write) into DEBUG records of ours:
    the failure reaches the caller as one CheckpointError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            logger.debug("orbax: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _orbax_errors_demoted():
    absl_logger, demote = logging.getLogger("absl"), _DemoteErrors()
    absl_logger.addFilter(demote)
    try:
        yield
    finally:
        absl_logger.removeFilter(demote)


def silence_write_echoes() -> None:
    """Keeps the report of a failed checkpoint write to its CheckpointError. For the program's
    entry point (train.py), which owns the process-wide hooks this installs: call it once.

    When a write fails (disk full), orbax closes its event loop with its other writes abandoned:
    asyncio logs '... exception was never retrieved' for each when it is collected, and
    tensorstore's completion callbacks raise RuntimeError('Event loop is closed') in their own
    threads, printed through sys.unraisablehook, some after the error has reached the caller:
    dozens of tracebacks in all. This drops exactly those two kinds of report.
    """
    logging.getLogger("asyncio").addFilter(_AbandonedWrites())
    previous = sys.unraisablehook

    def unraisablehook(info):
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            previous(info)

    sys.unraisablehook = unraisablehook


class _AbandonedWrites(logging.Filter):
    """asyncio's '<Task or _GatheringFuture> exception was never retrieved' for an orbax write."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = record.exc_info[2] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage()
                    and any("orbax" in frame.filename for frame in traceback.extract_tb(trace)))


class Checkpoints:
    """The workdir's checkpoint store: the training run's (read-write), or a reader's (`reader`)."""

    def __init__(self, workdir: str, keep: int, *, tokenizers: str | None = None, read_only: bool = False,
                 best_metric: str = "dev_bleu"):
        self.directory = os.path.join(workdir, "checkpoints")
        self._keep = keep
        self._tokenizers = tokenizers
        self._read_only = read_only
        self._best_metric = best_metric
        self._manager = _open(self.directory, keep, read_only, best_metric)
        self.good_step: int | None = None  # newest step known to load (restored or saved here)
        self._unreadable: dict[int, str] = {}  # listed steps that failed to load: their one-line error

    @classmethod
    def reader(cls, workdir: str, *, tokenizers: str | None = None, best_metric: str = "dev_bleu") -> "Checkpoints":
        """The store opened read-only, for a process that does not hold the workdir lock."""
        return cls(workdir, keep=1, tokenizers=tokenizers, read_only=True, best_metric=best_metric)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step ranked best by `best_metric` (None when no step has it)."""
        return self._manager.best_step()

    def save(self, step: int, state: Any, meta: dict, dev: dict | None = None) -> None:
        """Saves synchronously, with the dev metrics `dev` if the step was evaluated; then deletes
        the steps that are neither among the `keep` newest nor the best. On failure nothing is
        deleted."""
        self._check_writable("write")
        state_dict = _stored(flax.serialization.to_state_dict(state))
        arrays = _float_arrays(state_dict)
        bad = [name for name, value in arrays.items() if name.startswith(("params/", "ema_params/"))
               and value is not None and not np.isfinite(value).all()]
        if bad:
            raise CheckpointError(f"refusing to write checkpoint step {step} to {self.directory}: "
                                  f"non-finite values in {bad[0]}")
        meta = dict(meta, checksums={name: _crc(value) for name, value in arrays.items()})
        if self._tokenizers is not None:
            meta["tokenizers"] = self._tokenizers
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta))
        metrics = {name: float(value) for name, value in (dev or {}).items()}
        try:
            with _orbax_errors_demoted():
                if step in self._unreadable and step in self._manager.all_steps():
                    self._move_aside(step)
                self._manager.save(step, args=args, metrics=metrics, force=True)
        except (OSError, ValueError, RuntimeError) as error:
            previous = ("none" if self.good_step is None
                        else f"step {self.good_step} in {self.directory}, intact")
            raise CheckpointError(f"cannot write checkpoint step {step} to {self.directory}: {_one_line(error)}; "
                                  f"previous checkpoint: {previous}") from error
        self.good_step = step

    def prune(self) -> None:
        """Deletes the steps that the preservation policy deletes after a save: a run killed
        between writing a step and deleting the older ones leaves them behind. For the training
        run that owns the workdir (all its processes call it); a reader never deletes."""
        self._check_writable("prune")
        steps = self.steps()
        keep = set(steps[-self._keep:])
        # The best by best_metric, the newer of equals (as BestN); a step without it is never the best.
        best_rank, best = max(((_rank(self._manager.metrics(step) or {}, self._best_metric), step)
                               for step in steps), default=(-math.inf, None))
        if best_rank > -math.inf:
            keep.add(best)
        for step in steps:
            if step not in keep:
                self._manager.delete(step)
                logger.info("deleted checkpoint step %d of %s (neither recent nor best)", step, self.directory)

    def _check_writable(self, action: str) -> None:
        if self._read_only:
            raise CheckpointError(f"cannot {action} {self.directory}: opened read-only (a reader)")

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Newest loadable checkpoint as (state like `target`, meta), or None if there is none.

        `target` may be abstract (jax.eval_shape of the train state): nothing is compiled. A step
        that does not load is skipped with a warning naming it; CheckpointError if steps are listed
        but none loads, for an I/O error, and for a step made for another model shape, vocabulary
        or tokenizers.
        """
        steps = self.steps()
        for step in reversed(steps):
            restored = self._restore_or_warn(step, target)
            if restored is not None:
                self.good_step = step
                return restored
        if steps:
            errors = "; ".join(f"step {step}: {self._unreadable[step]}" for step in steps)
            raise CheckpointError(f"no checkpoint in {self.directory} loads ({errors}); nothing was changed. "
                                  f"To start over from step 0, move {self.directory} aside or use a new --workdir")
        return None

    def restore_best_or_latest(self, target: Any) -> tuple[Any, dict]:
        """For inference: the checkpoint with the best dev BLEU, else the latest loadable one.

        A reader races the run that trains in the workdir: a step it was reading may be pruned
        meanwhile. When a step fails to load and the listing changed since it was read, the reader
        lists again and starts over (up to READER_ATTEMPTS times), without warnings."""
        for _ in range(READER_ATTEMPTS):
            try:
                return self._best_or_latest(target)
            except _ListingChanged:
                self._unreadable.clear()
        raise CheckpointError(f"the checkpoints in {self.directory} changed {READER_ATTEMPTS} times while "
                              "they were read (a run saving very often); try again")

    def restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        """Checkpoint `step` as (state like `target`, meta); CheckpointError in one line if it is not
        listed or does not load (a reader: if the run deleted it meanwhile)."""
        if step not in self.steps():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} (steps: {self.steps()})")
        try:
            restored = self._restore_or_warn(step, target)
        except _ListingChanged:
            raise CheckpointError(f"checkpoint step {step} of {self.directory} was deleted by its run while it "
                                  f"was read; choose among the steps it keeps (now {self.steps()})") from None
        if restored is None:
            raise CheckpointError(f"checkpoint step {step} of {self.directory} does not load: {self._unreadable[step]}")
        return restored

    def _best_or_latest(self, target: Any) -> tuple[Any, dict]:
        best = self._manager.best_step()
        restored = None if best is None else self._restore_or_warn(best, target)
        if restored is None:
            restored = self.restore_latest(target)
        if restored is None:
            raise CheckpointError(f"no checkpoint in {self.directory}: train a model there first")
        return restored

    def _restore_or_warn(self, step: int, target: Any) -> tuple[Any, dict] | None:
        """`_restore`, or None with a one-line warning for a step that does not load (or did not
        before); CheckpointError for an I/O error (not a fault of the step)."""
        if step in self._unreadable:
            return None
        path = os.path.join(self.directory, str(step))
        try:
            return self._restore(step, target)
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - orbax raises many types for a bad step
            if self._read_only and self._listing_changed():
                raise _ListingChanged(step) from error  # pruned by the run while this reader read it
            if isinstance(error, OSError) and not isinstance(
                    error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
                raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(error)}; "
                                      "fix the error (permissions, disk) and rerun") from error
            self._skip(step, error)
        return None

    def _listing_changed(self) -> bool:
        """Whether the steps on disk differ from those this store listed (a run is saving)."""
        listed = self.steps()
        self._manager.reload()
        return self.steps() != listed

    def _skip(self, step: int, error: Exception) -> None:
        """Marks a step unreadable: a one-line warning; the full error at DEBUG level."""
        path = os.path.join(self.directory, str(step))
        self._unreadable[step] = _one_line(error)
        logger.warning("skipping unreadable checkpoint %s: %s (full error at DEBUG level)",
                       path, self._unreadable[step])
        logger.debug("checkpoint %s: %s", path, " ".join(str(error).split()))

    def _restore(self, step: int, target: Any) -> tuple[Any, dict]:
        directory = os.path.join(self.directory, str(step))
        template = flax.serialization.to_state_dict(target)
        absent = {name: None for name, value in template.items() if value is None}  # e.g. no ema_params
        template = _stored(template)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_tokenizers = meta.get("tokenizers")
        if None not in (saved_tokenizers, self._tokenizers) and saved_tokenizers != self._tokenizers:
            workdir = os.path.dirname(self.directory)
            raise CheckpointError(
                f"checkpoint {directory} was trained with other tokenizers (fingerprint {saved_tokenizers[:12]}) "
                f"than those of {workdir} now ({self._tokenizers[:12]}): its ids would name other pieces; "
                f"restore the tokenizers and training data it was trained with, or use a new --workdir")
        saved_shapes = meta.get("param_shapes")
        if saved_shapes is not None and saved_shapes != param_shapes(target.params):
            raise CheckpointError(
                f"checkpoint {directory} was made with another model shape or vocabulary: "
                f"{first_difference(saved_shapes, param_shapes(target.params))}; use a new --workdir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        # A target without shardings (jax.eval_shape, as translate passes) loads onto this host's
        # first device, whatever device layout saved the checkpoint.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                                if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None else x, abstract)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state_dict, meta = dict(restored["state"], **absent), restored["meta"]
        expected = meta.get("checksums")
        if expected is not None:
            actual = {name: _crc(value) for name, value in _float_arrays(state_dict).items()}
            wrong = sorted(name for name in set(expected) | set(actual)
                           if expected.get(name) != actual.get(name))
            if wrong:
                raise _Unreadable(f"checksum mismatch in {wrong[0]}"
                                  + (f" and {len(wrong) - 1} more arrays" if len(wrong) > 1 else ""))
        return flax.serialization.from_state_dict(target, state_dict), meta

    def _move_aside(self, step: int) -> None:
        """Renames a step that does not load (process 0; the others wait) before it is rewritten."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            n = 0
            while os.path.exists(f"{source}.unreadable-{n}"):
                n += 1
            os.rename(source, f"{source}.unreadable-{n}")
            logger.warning("moved unreadable checkpoint %s to %s.unreadable-%d", source, source, n)
        parallel.barrier(f"move_aside_{step}")
        del self._unreadable[step]
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def _open(directory: str, keep: int, read_only: bool, best_metric: str) -> ocp.CheckpointManager:
    """The manager; CheckpointError if orbax cannot list the steps (a damaged metrics record)."""
    try:
        return _manager(directory, keep, read_only, best_metric)
    except ValueError as error:  # orbax reads every step's metrics on opening
        raise CheckpointError(f"cannot open {directory}: {_one_line(error)}; move the damaged step aside "
                              "(or the directory, to start over) or use a new --workdir") from error


def _stored(state_dict: dict) -> dict:
    """A train state's dict without its None fields (ema_params of a run without an average), so
    that checkpoints with and without such a field, and of versions before it, have one layout."""
    return {name: value for name, value in state_dict.items() if value is not None}


def _one_line(error: Exception, limit: int = 200) -> str:
    """ "Type: message" on one line, at most about `limit` characters: a longer message keeps its
    start and its end (where the cause usually is, e.g. "No space left on device")."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    half = limit // 2
    return text if len(text) <= limit else f"{text[:half]} … {text[-half:]}"


def tokenizers_fingerprint(src_tokenizer: Any, tgt_tokenizer: Any) -> str:
    """sha256 of the source and target tokenizers: their sentencepiece models (a synthetic task's
    IdTokenizer: its vocabulary size). Equal fingerprints map ids to the same pieces."""
    digest = hashlib.sha256()
    for tokenizer in (src_tokenizer, tgt_tokenizer):
        model = (f"ids {tokenizer.vocab_size}".encode() if isinstance(tokenizer, data.IdTokenizer)
                 else tokenizer.model_proto())
        digest.update(hashlib.sha256(model).digest())
    return digest.hexdigest()


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'decoder/w_out': [256, 8000], ...}: what a checkpoint must match to be loaded."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(params), sep="/")
    return {name: list(value.shape) for name, value in sorted(flat.items())}


def _host(value: Any) -> np.ndarray | None:
    """A host copy of an array leaf; None for a leaf sharded across hosts (not checksummed)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.sharding.is_fully_replicated:
            return None
        value = value.addressable_data(0)
    return np.asarray(value)


def _float_arrays(state_dict: Any) -> dict[str, np.ndarray | None]:
    """Every floating-point leaf of a state dict by 'a/b/c' name, as a host array."""
    flat = flax.traverse_util.flatten_dict(state_dict, sep="/") if isinstance(state_dict, dict) else {}
    out = {}
    for name, value in sorted(flat.items()):
        dtype = getattr(value, "dtype", None)
        if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            out[name] = _host(value)
    return out


def _crc(value: np.ndarray | None) -> int | None:
    return None if value is None else zlib.crc32(np.ascontiguousarray(value).tobytes())


def first_difference(saved: dict, current: dict) -> str:
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            return f"{name} is {saved.get(name)} in the checkpoint but {current.get(name)} in this model"
    return "parameter names differ"
