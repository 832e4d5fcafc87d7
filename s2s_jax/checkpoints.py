"""Orbax checkpoints in the workdir: the last k under `checkpoints/`, the best by dev BLEU under `best/`.

A checkpoint holds the train state (step, params, optimizer state) as a state dict, and a JSON
`meta` record (data position, logging window, vocabulary sizes, parameter shapes, and a CRC32 of
every floating-point array of the state).

Crash safety:
- Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
  run killed mid-save leaves nothing that `restore_latest` would list; the leftover is removed
  the next time the store saves.
- A listed step that still fails to load (missing or truncated files, a checksum that does not
  match) is skipped with a warning naming it, and the next older one is tried. If training later
  reaches that step again, the unreadable directory is moved aside to `<step>.unreadable-<n>`
  (kept for inspection, never loaded) so that the new checkpoint can take its place.
- A failed write (disk full, read-only directory) raises CheckpointError; the checkpoints written
  before it are untouched.
- Non-finite parameters are never written (CheckpointError).
"""
import contextlib
import logging
import os
import sys
import warnings
import zlib
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp


logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the model."""


class _Unreadable(Exception):
    """A checkpoint step whose contents do not verify (internal: the step is skipped)."""


def _manager(directory: str, keep: int, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
        best_fn=(lambda metrics: metrics["dev_bleu"]) if best else None, best_mode="max",
        keep_checkpoints_without_metrics=not best)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class _DemoteErrors(logging.Filter):
    """Turns orbax's own ERROR records (a traceback per failed write) into DEBUG records of ours:
    the failure reaches the caller as one CheckpointError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            logger.debug("orbax: %s", record.getMessage())
            return False
        return True


def _is_write_echo(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _DropAbandonedWrites(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


def _silence_write_echoes() -> None:
    """Silences the echoes of a failed write, which would bury its one-line report: orbax then
    abandons its other write tasks (asyncio logs 'Task exception was never retrieved' for each)
    and closes its event loop, so tensorstore's completion callbacks report 'Event loop is closed'
    through sys.unraisablehook, from their own threads, some before the error reaches us.
    Installed once per process, before the first write."""
    global _ECHOES_SILENCED
    if _ECHOES_SILENCED:
        return
    _ECHOES_SILENCED = True
    logging.getLogger("asyncio").addFilter(_DropAbandonedWrites())
    previous = sys.unraisablehook

    def unraisable(info):
        if not _is_write_echo(info.exc_value):
            previous(info)

    sys.unraisablehook = unraisable


_ECHOES_SILENCED = False


@contextlib.contextmanager
def _orbax_errors_demoted():
    absl_logger, demote = logging.getLogger("absl"), _DemoteErrors()
    absl_logger.addFilter(demote)
    try:
        yield
    finally:
        absl_logger.removeFilter(demote)


class Checkpoints:
    """The workdir's checkpoint store."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(workdir, "checkpoints")
        self.latest = _manager(self.directory, keep, best=False)
        self.best = _manager(os.path.join(workdir, "best"), 1, best=True)
        self.good_step: int | None = None  # newest step known to load (restored or saved here)
        self._unreadable: set[int] = set()  # listed steps that failed to load

    def steps(self) -> list[int]:
        return sorted(self.latest.all_steps())

    def save(self, step: int, state: Any, meta: dict, dev_bleu: float | None = None) -> None:
        """Saves synchronously; on failure the previous checkpoints stay as they were.

        With `dev_bleu`, the step also goes to `best/` (kept if it is the best so far). `best/` is
        written first: a run killed between the two writes redoes the step from the previous
        checkpoint, finds the step in `best/` already (same values: training is deterministic) and
        only writes `checkpoints/`.
        """
        state_dict = flax.serialization.to_state_dict(state)
        arrays = _float_arrays(state_dict)
        bad = [name for name, value in arrays.items()
               if name.startswith("params/") and value is not None and not np.isfinite(value).all()]
        if bad:
            raise CheckpointError(f"refusing to write checkpoint step {step} to {self.directory}: "
                                  f"non-finite values in {bad[0]}")
        meta = dict(meta, checksums={name: _crc(value) for name, value in arrays.items()})
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(meta))
        _silence_write_echoes()
        target = self.best.directory
        try:
            with _orbax_errors_demoted():
                if dev_bleu is not None and step not in self.best.all_steps():
                    self.best.save(step, args=args, metrics={"dev_bleu": float(dev_bleu)}, force=True)
                target = self.latest.directory
                if step in self._unreadable and step in self.latest.all_steps():
                    self._move_aside(step)
                self.latest.save(step, args=args, force=True)
        except (OSError, ValueError, RuntimeError) as error:
            # The abandoned write coroutines are collected at exit ("was never awaited").
            warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
            previous = ("none" if self.good_step is None
                        else f"step {self.good_step} in {self.directory}, intact")
            reason = " ".join(str(error).split())  # orbax messages span lines
            raise CheckpointError(f"cannot write checkpoint step {step} to {target}: {reason}; "
                                  f"previous checkpoint: {previous}") from error
        self.good_step = step

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Newest loadable checkpoint as (state like `target`, meta), or None if there is none.

        `target` may be abstract (jax.eval_shape of the train state): nothing is compiled. A step
        that does not load is skipped with a warning naming it; a step made for another model
        shape or vocabulary raises CheckpointError.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._restore(self.latest, step, target)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - orbax raises many types for a bad step
                self._unreadable.add(step)
                logger.warning("skipping unreadable checkpoint %s: %s",
                               os.path.join(self.directory, str(step)), " ".join(str(error).split()))
                continue
            self.good_step = step
            return restored
        return None

    def restore_best_or_latest(self, target: Any) -> tuple[Any, dict]:
        """For inference: the best checkpoint by dev BLEU, else the latest."""
        best_step = self.best.best_step()
        if best_step is not None:
            try:
                return self._restore(self.best, best_step, target)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001
                logger.warning("skipping unreadable checkpoint %s: %s; using the latest instead",
                               os.path.join(str(self.best.directory), str(best_step)),
                               " ".join(str(error).split()))
        restored = self.restore_latest(target)
        if restored is None:
            raise CheckpointError(f"no checkpoint in {self.directory}: train a model there first")
        return restored

    def _restore(self, manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
        directory = os.path.join(str(manager.directory), str(step))
        template = flax.serialization.to_state_dict(target)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_shapes = meta.get("param_shapes")
        if saved_shapes is not None and saved_shapes != param_shapes(target.params):
            raise CheckpointError(
                f"checkpoint {directory} was made with another model shape or vocabulary: "
                f"{_first_difference(saved_shapes, param_shapes(target.params))}; use a new --workdir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state_dict, meta = restored["state"], restored["meta"]
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
        source = os.path.join(self.directory, str(step))
        n = 0
        while os.path.exists(f"{source}.unreadable-{n}"):
            n += 1
        os.rename(source, f"{source}.unreadable-{n}")
        logger.warning("moved unreadable checkpoint %s to %s.unreadable-%d", source, source, n)
        self._unreadable.discard(step)
        self.latest.reload()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


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


def _first_difference(saved: dict, current: dict) -> str:
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            return f"{name} is {saved.get(name)} in the checkpoint but {current.get(name)} in this model"
    return "parameter names differ"
