"""Checkpoint averaging: the element-wise mean of a run's checkpoints, written as a model of its own.

    python -m s2s_jax.average --workdir=runs/demo --last=5               # the 5 newest checkpoints
    python -m s2s_jax.average --workdir=runs/demo --steps=3000,3500 [--output=runs/demo-avg] [--raw]

The output is a new workdir (default: `<workdir>-avg<N>-<newest step>` beside the run; it must not
exist): config.json (the run's, with optimizer.ema_decay 0), tokenizers/, one checkpoint at the
newest averaged step whose parameters are the mean (its optimizer state is that step's), and
average.json saying what was averaged. `translate`, `Translator`, `export` and ensembles load it
like any workdir. It is written under a temporary name beside it and renamed when complete. The
run's workdir is only read (its checkpoints opened read-only, as translate does), so it may train
meanwhile; keep enough checkpoints there for --last (`keep_checkpoints`).

Each checkpoint contributes the weights it decodes with (`steps.inference_params`: the moving
average when the run keeps one, as Marian averages its smoothed models); --raw takes the raw
parameters instead (with one step: the raw model of an EMA run). A checkpoint of another model
shape, vocabulary or tokenizers than the run's config is refused in one line (checkpoints.py).
The sum is taken in float64.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from s2s_jax import checkpoints, configuration, files, steps
from s2s_jax.trained import Workdir, open_workdir


def choose_steps(available: Sequence[int], last: int | None, chosen: Sequence[int] | None, where: str) -> list[int]:
    """The steps to average, ascending: the `last` newest of `available`, or `chosen` (each listed,
    no repeats). ValueError in one line otherwise."""
    if (last is None) == (chosen is None):
        raise ValueError("give exactly one of --last=N and --steps=a,b,c")
    if last is not None:
        if last < 1 or last > len(available):
            raise ValueError(f"--last={last}: {where} holds {len(available)} checkpoints (steps {list(available)}); "
                             "keep more with --config.keep_checkpoints while training")
        return sorted(available)[-last:]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--steps={','.join(map(str, chosen))} names a step twice")
    missing = [step for step in chosen if step not in available]
    if missing:
        raise ValueError(f"--steps: no checkpoint step {missing[0]} in {where} (steps {list(available)})")
    return sorted(chosen)


def mean_params(states: Sequence, raw: bool):
    """The element-wise mean of the states' decoding weights (their parameters when `raw`), summed
    in float64 and cast back to each leaf's dtype."""
    trees = [state.params if raw else steps.inference_params(state) for state in states]
    total = jax.tree.map(lambda *leaves: sum(np.asarray(leaf, np.float64) for leaf in leaves), *trees)
    return jax.tree.map(lambda s, leaf: (s / len(trees)).astype(leaf.dtype), total, trees[0])


def average(workdir: str, *, last: int | None = None, chosen: Sequence[int] | None = None,
            output: str | None = None, raw: bool = False) -> tuple[str, dict]:
    """Writes the mean of `workdir`'s checkpoints (the `last` newest, or the `chosen` steps) as a new
    workdir `output` (default `<workdir>-avg<N>-<newest step>`); returns its path and average.json's
    record (workdir, steps, weights: "params" or "ema_params")."""
    run = open_workdir(workdir)
    store = run.reader()
    try:
        selected = choose_steps(store.steps(), last, chosen, store.directory)
        output = output or f"{workdir.rstrip(os.sep)}-avg{len(selected)}-{selected[-1]}"
        if os.path.lexists(output):
            raise ValueError(f"--output {output} exists; averaging writes a new workdir: choose another --output")
        restored = [store.restore_step(step, run.target) for step in selected]
    finally:
        store.close()
    states = [state for state, _ in restored]
    newest, meta = restored[-1]
    model = newest.replace(params=mean_params(states, raw), ema_params=None)
    record = dict(workdir=os.path.abspath(workdir), steps=selected,
                  weights="params" if raw or newest.ema_params is None else "ema_params")
    _write(run, workdir, output, model, meta, record)
    return output, record


def _write(run: Workdir, workdir: str, output: str, state, meta: dict, record: dict) -> None:
    """The averaged model's workdir, written beside `output` and renamed onto it when complete."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.partial-")
    try:
        config = run.config.copy_and_resolve_references()
        config.optimizer.ema_decay = 0.0  # the mean is the model's parameters
        configuration.save(config, partial)
        if run.config.data.task == "files":
            shutil.copytree(os.path.join(workdir, "tokenizers"), os.path.join(partial, "tokenizers"))
        store = checkpoints.Checkpoints(partial, keep=1, tokenizers=run.fingerprint)
        try:
            kept = {k: v for k, v in meta.items() if k not in ("checksums", "tokenizers")}
            store.save(record["steps"][-1], state, dict(kept, averaged=record))
        finally:
            store.close()
        files.write_json(os.path.join(partial, "average.json"), record)
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------- command line
def main(argv) -> None:
    from s2s_jax import cli
    f = cli.parsed_flags("average", argv)
    try:
        chosen = None if f.steps is None else [int(step) for step in f.steps]
    except ValueError:
        raise SystemExit(f"average: --steps must be comma-separated integers, got {','.join(f.steps)!r}") from None
    try:
        output, record = average(f.workdir, last=f.last, chosen=chosen, output=f.output, raw=f.raw)
    except (ValueError, checkpoints.CheckpointError) as error:  # DataError, ConfigError are ValueErrors
        raise SystemExit(f"average: {error}") from None
    except OSError as error:
        raise SystemExit(f"average: {error.filename or f.output}: {error.strerror or error}") from None
    print(f"{output}: the mean of {record['weights']} of {f.workdir} steps "
          f"{','.join(map(str, record['steps']))}; use it as --workdir={output}")


def run() -> None:
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "The training workdir whose checkpoints to average.", required=True)
    flags.DEFINE_integer("last", None, "Average the N newest checkpoints.")
    flags.DEFINE_list("steps", None, "Average these checkpoint steps (comma-separated).")
    flags.DEFINE_string("output", None, "The workdir to write (must not exist); default <workdir>-avg<N>-<newest step>.")
    flags.DEFINE_bool("raw", False, "Average the raw parameters, not the moving average of a run that keeps one.")
    app.run(main)


if __name__ == "__main__":
    run()
