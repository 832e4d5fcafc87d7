"""Orbax checkpoints in the workdir: the last k under `checkpoints/`, the best by dev BLEU under `best/`.

A checkpoint holds the train state (step, params, optimizer state) as a state dict, and a JSON
`meta` record (data position, logging window, vocabulary sizes). Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save leaves no checkpoint
that `restore_latest` would load; a step that fails to load is skipped with a warning naming it.
"""
import logging
import os
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import orbax.checkpoint as ocp


logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the model."""


def _manager(directory: str, keep: int, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
        best_fn=(lambda metrics: metrics["dev_bleu"]) if best else None, best_mode="max",
        keep_checkpoints_without_metrics=not best)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
    """The workdir's checkpoint store."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(workdir, "checkpoints")
        self.latest = _manager(self.directory, keep, best=False)
        self.best = _manager(os.path.join(workdir, "best"), 1, best=True)

    def steps(self) -> list[int]:
        return sorted(self.latest.all_steps())

    def save(self, step: int, state: Any, meta: dict, dev_bleu: float | None = None) -> None:
        """Saves synchronously; on failure the previous checkpoints stay as they were."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                                  meta=ocp.args.JsonSave(meta))
        previous = self.latest.latest_step()
        try:
            self.latest.save(step, args=args, force=True)
            if dev_bleu is not None:
                self.best.save(step, args=args, metrics={"dev_bleu": float(dev_bleu)}, force=True)
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"cannot write checkpoint step {step} to {self.directory}: {error}; "
                f"the previous checkpoint (step {previous}) is intact") from error

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Newest loadable checkpoint as (state like `target`, meta), or None if there is none."""
        for step in reversed(self.steps()):
            try:
                return self._restore(self.latest, step, target)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - orbax raises many types for a bad step
                logger.warning("skipping unreadable checkpoint %s: %s",
                                os.path.join(self.directory, str(step)), error)
        return None

    def restore_best_or_latest(self, target: Any) -> tuple[Any, dict]:
        """For inference: the best checkpoint by dev BLEU, else the latest."""
        best_step = self.best.best_step()
        if best_step is not None:
            return self._restore(self.best, best_step, target)
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
                f"{_first_difference(saved_shapes, param_shapes(target.params))}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return flax.serialization.from_state_dict(target, restored["state"]), restored["meta"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'decoder/w_out': [256, 8000], ...}: what a checkpoint must match to be loaded."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(params), sep="/")
    return {name: list(value.shape) for name, value in sorted(flat.items())}


def _first_difference(saved: dict, current: dict) -> str:
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            return f"{name} is {saved.get(name)} in the checkpoint but {current.get(name)} in this model"
    return "parameter names differ"
