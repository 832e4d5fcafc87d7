"""Trains an attention-based LSTM seq2seq model.

  python train.py --config=configs/demo.py --workdir=runs/demo [--config.model.attention=concat ...]
  s2s-train --config=configs/demo.py --workdir=runs/demo          # the same, as a console script

Override any field of the config file with --config.<group>.<key>=<value>, or --config.<key>=<value>
for a top-level one: --config.seed=1 --config.optimizer.learning_rate=3e-4
--config.data.bucket_boundaries='(16,32,65)'. Every field is documented by the comment above it in
configs/default.py (demo.py and tiny.py override some); valid ranges: s2s_jax/configuration.py.

Rerunning the same command on the same workdir resumes from its last checkpoint; the logging,
evaluation, checkpoint and eval.* settings may change, a setting that would change the training
trajectory may not. Bad input (an unknown config key or a value of the wrong type or out of range,
a missing or malformed data file, a workdir made for another model or with other settings, a
workdir in use by another run, a checkpoint that cannot be written, a non-finite loss) ends the
run with one `error: ...` line and exit status 2; SIGINT / SIGTERM save a checkpoint first and exit
with 128 + the signal number.

Compiled steps are kept in JAX's persistent compilation cache and, as whole executables, under
its executables/ folder (`s2s_jax.compiled`), so a rerun with the same shapes starts in seconds:
$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/s2s_jax/jax (under $XDG_CACHE_HOME if set);
--compilation_cache=DIR picks another directory, --compilation_cache=off turns both off;
--compilation_cache_max_gb caps the folder (3/4 executables, 1/4 JAX's cache; least recently used
removed first).

Several processes (one per host, each with the same command line plus its own
--config.distributed.process_id, and --config.distributed.num_processes and
--config.distributed.coordinator_address=HOST:PORT of process 0; or coordinator_address=auto on a
TPU pod, SLURM or Open MPI) train one model on one mesh over all their devices; process 0 writes.
SIGINT / SIGTERM to any of them makes all save the same checkpoint and stop; when one dies, the
others exit with one error line and status 3 (a failed collective) or, at the latest, after
--config.distributed.heartbeat_timeout_s (JAX's heartbeat); rerun all of them to resume. At start,
every process waits at most --config.distributed.init_timeout_s for the others to join (a line
every 10 s), then exits with one error line and status 3; processes started with different
settings (but for process_id and coordinator_address) or a coordinator port already in use are
refused, with status 2, one line on each process.
"""
import difflib
import logging
import os
import runpy
import shlex
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from s2s_jax import checkpoints, cli, configuration, data, parallel, training, workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizers, metrics and plots.")
config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config() module), e.g. configs/demo.py; override its "
    "fields with --config.<group>.<key>=<value> (documented in configs/default.py).", lock_config=True)
cli.define_compilation_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])

USAGE_ERROR = 2  # bad flags, config, data or workdir: nothing was trained
PEER_LOST = 3  # several processes: a collective failed (mostly: another process died), or one never joined


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def _unknown_override(argv: list[str]) -> str | None:
    """Names the first --config.<key> override whose key the config file does not have."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return None
    path, _, arg = config_arg.partition(":")
    try:
        module = runpy.run_path(path)
        config = module["get_config"](arg) if arg else module["get_config"]()
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None
    for item in argv:
        if not item.startswith("--config."):
            continue
        key = item[len("--config."):].split("=", 1)[0]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if hasattr(node, "keys") and part in node.keys():
                node = node[part]
                continue
            where = ".".join(parts[:depth])
            close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys") else [], n=1)
            hint = f"; did you mean {'.'.join(parts[:depth] + [close[0]])!r}?" if close else ""
            return (f"unknown config key {key!r} in {item} ({where or 'the config'} has no {part!r} "
                    f"in {path}){hint}")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error (and config loading) reported as one line, status 2."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when first used
        return rest
    except flags.Error as error:  # wrong type, missing required flag: the message names the flag
        _fail(error)
    except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as error:
        unknown = _unknown_override(argv)
        if unknown:
            _fail(unknown)
        # config_flags wraps errors in multi-line reports (a traceback, the paths it tried): the
        # last line is the cause.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
        config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
        _fail(f"{config_arg}: {lines[-1]}")
    return []  # unreachable


def join_processes(config) -> None:
    """Checks the config and joins the run's processes (config.distributed), which must have the
    same config; before any JAX computation. Process 0 logs progress; the others only warnings
    and errors."""
    configuration.check(config)
    try:
        parallel.check_distributed(config.distributed)
        parallel.join(config.distributed, configuration.flat_json(config), on_timeout=_peers_missing)
    except ValueError as error:
        raise configuration.ConfigError(f"config: {error}") from error
    if jax.process_index():
        logging.getLogger("s2s_jax").setLevel(logging.WARNING)


def _peers_missing(message: str) -> None:
    """Ends the process at once (status PEER_LOST) with one error line: called from join's watchdog
    thread, while JAX waits for the missing processes."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST)


def _peer_lost(error: BaseException, command: str) -> None:
    """Exits at once with one error line and status PEER_LOST: a collective failed, mostly because
    another process died. JAX's exit would wait at a shutdown barrier for the dead process, then
    abort (checkpoints are complete or absent, never half)."""
    print(f"error: process {jax.process_index()}: {str(error).splitlines()[0]}; with several processes "
          "this usually means another one has stopped (see its output); the last complete "
          f"checkpoint is kept: rerun every process to resume from it: {command}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.use_compilation_cache(FLAGS.compilation_cache, FLAGS.compilation_cache_max_gb)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("s2s_jax").setLevel(logging.INFO)
    checkpoints.silence_write_echoes()  # a failed checkpoint write: one error line
    command = shlex.join(["python"] + sys.argv)
    try:
        join_processes(FLAGS.config)
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.Interrupted as interrupted:
        print(f"resume with: {command}", flush=True)  # training logged where the checkpoint is
        sys.exit(interrupted.code)
    except (data.DataError, configuration.ConfigError, checkpoints.CheckpointError,
            workdir_lock.WorkdirError, training.TrainingError) as error:
        if jax.process_count() > 1 and parallel.failed_collective(error):  # e.g. in a checkpoint save
            _peer_lost(error, command)
        _fail(error)
    except OSError as error:  # e.g. disk full or read-only while writing metrics or tokenizers
        _fail(f"{error.filename or FLAGS.workdir}: {error.strerror or error}")
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() == 1 or not parallel.failed_collective(error):
            raise
        _peer_lost(error, command)
    except KeyboardInterrupt:
        print("interrupted without saving a checkpoint; the last complete one is kept; rerun the same "
              f"command to resume from it: {command}", file=sys.stderr, flush=True)
        sys.exit(130)


def _config_importable(argv: list[str]) -> None:
    """Puts the folder holding the --config file's package on sys.path: configs/demo.py imports
    `configs.default`, which `python train.py` finds next to the script and the console script
    (s2s-train, run from anywhere) must find next to the config file."""
    path = next((a.split("=", 1)[1].partition(":")[0] for a in argv if a.startswith("--config=")), None)
    if path:
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.insert(0, root)


def run() -> None:
    """The `s2s-train` console script and `python train.py`."""
    _config_importable(sys.argv)
    sys.modules["__main__"].__doc__ = __doc__  # absl's --help prints it
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
