"""Reliability: exact resume after SIGKILL / SIGINT / SIGTERM, non-finite steps, bad inputs, and
checkpoint writes that fail (disk full, read-only workdir).

Training runs are real `train.py` subprocesses on a shrunk configs/tiny.py (120 steps, a checkpoint
every 20, evaluation every 60, a moving average of the parameters, 2 micro-batches per step). They share one persistent JAX compilation cache, so only the first
run compiles; each later one takes a few seconds. Every comparison is with one uninterrupted run
(the `baseline` fixture) on the same machine: every kept checkpoint (the last ones and the best by
dev BLEU; every leaf, bit for bit), metrics.jsonl and summary.json except timings.

Fault injection never touches production code: a wrapper script patches the data pipeline (a token
id outside the vocabulary, which JAX's gather turns into NaN embeddings, hence a NaN loss) or
orbax (a write that fails with ENOSPC) in the subprocess, then runs train.py unchanged.
"""
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 120, 20, 60
ARGS = [
    "--config=configs/tiny.py",
    f"--config.num_train_steps={STEPS}",
    f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
    f"--config.eval_every_steps={EVAL_EVERY}",
    "--config.log_every_steps=20",
    "--config.data.synthetic_train_size=512",
    "--config.data.synthetic_dev_size=64",
    "--config.data.bucket_boundaries=(12,)",  # one batch shape: fewer compilations
    # The state holds a moving average of the parameters, and each step accumulates 2 micro-batches:
    # exact resume covers both (without them the state is that of tests/test_training.py's runs).
    "--config.optimizer.ema_decay=0.9",
    "--config.optimizer.accumulate_steps=2",
]
TIMING = {"tokens_per_s", "elapsed_s", "wall_s", "compile_s", "compilations"}
RUN_TIMEOUT = 240  # seconds, per subprocess; a warm run takes about 5-10 s

# Runs train.py after patching the data pipeline (S2S_BAD_BATCH: that batch gets a token id far
# outside the vocabulary) or orbax (S2S_FAIL_SAVE=n: the n-th checkpoint write fails with ENOSPC).
WRAPPER = r'''
import errno, os, runpy, sys
sys.path.insert(0, os.getcwd())
if "S2S_BAD_BATCH" in os.environ:
    from s2s_jax import data
    bad, original = int(os.environ["S2S_BAD_BATCH"]), data.TrainBatches.batch
    def batch(self, number, rows=None):
        b = original(self, number, rows)
        if number == bad:
            src = b.src.copy()
            src[0, 0] = 10**6
            b = b._replace(src=src)
        return b
    data.TrainBatches.batch = batch
if "S2S_FAIL_SAVE" in os.environ:
    import orbax.checkpoint as ocp
    fail_at, calls, original_save = int(os.environ["S2S_FAIL_SAVE"]), [0], ocp.CheckpointManager.save
    def save(self, step, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return original_save(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = save
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
'''


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: CPU, unbuffered output, one persistent compilation cache."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapper") / "patched_train.py"
    path.write_text(WRAPPER)
    return str(path)


def _command(workdir, extra=(), script="train.py"):
    return [sys.executable, script, *ARGS, *extra, f"--workdir={workdir}"]


def _run(env, workdir, extra=(), script="train.py", **env_extra):
    result = subprocess.run(_command(workdir, extra, script), cwd=REPO, env=dict(env, **env_extra),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    result.output = result.stdout + result.stderr
    return result


class Watched:
    """A train.py subprocess whose output lines are collected by a thread as they come."""

    def __init__(self, env, workdir, extra=()):
        self.workdir = workdir
        self.proc = subprocess.Popen(_command(workdir, extra), cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.started = time.time()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_line(self, pattern: str, timeout=RUN_TIMEOUT) -> re.Match | None:
        """First output line matching `pattern`; None if the process ends without one."""
        regex, seen = re.compile(pattern), 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            while seen < len(self.lines):
                match = regex.search(self.lines[seen])
                seen += 1
                if match:
                    return match
            if self.proc.poll() is not None and not self.reader.is_alive():
                return None
            time.sleep(0.001)
        raise TimeoutError(f"no line matching {pattern!r}:\n{self.output}")

    def wait_for_tmp_checkpoint(self, skip: int, timeout=RUN_TIMEOUT) -> str | None:
        """Path of the (skip+1)-th orbax temporary checkpoint directory to appear; None if the
        process ends first. Polls every ~0.5 ms: a tiny checkpoint takes tens of ms to write."""
        seen: set[str] = set()
        roots = [os.path.join(self.workdir, "checkpoints")]
        deadline = time.time() + timeout
        while time.time() < deadline:
            for root in roots:
                try:
                    names = os.listdir(root)
                except FileNotFoundError:
                    continue
                for name in names:
                    path = os.path.join(root, name)
                    if ".orbax-checkpoint-tmp" in name and path not in seen:
                        seen.add(path)
                        if len(seen) > skip:
                            return path
            if self.proc.poll() is not None:
                return None
            time.sleep(0.0005)
        raise TimeoutError(f"no temporary checkpoint:\n{self.output}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=RUN_TIMEOUT)
        self.reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _restore_raw(directory: str, step: int) -> tuple[dict, dict]:
    """(flat {name: numpy array} of the train state, meta) of one checkpoint, read by orbax alone."""
    import flax.traverse_util
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    flat = flax.traverse_util.flatten_dict(restored["state"], sep="/")
    return {name: np.asarray(value) for name, value in flat.items()}, restored["meta"]


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if k not in TIMING}


def _assert_same_leaves(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (what, name)
        assert np.array_equal(got[name], want[name]), f"{what}: {name} differs"


def _assert_same_run(workdir: str, baseline: str) -> None:
    """Same checkpoints kept (the last ones and the best), each identical leaf for leaf, with the
    same window and dev BLEU record; same metrics.jsonl and summary."""
    got_dir, want_dir = os.path.join(workdir, "checkpoints"), os.path.join(baseline, "checkpoints")
    assert _steps(got_dir) == _steps(want_dir)
    for step in _steps(want_dir):
        got, got_meta = _restore_raw(got_dir, step)
        want, want_meta = _restore_raw(want_dir, step)
        _assert_same_leaves(got, want, f"checkpoints/{step}")
        assert got_meta["window"] == want_meta["window"]
        assert _dev_bleu_record(got_dir, step) == _dev_bleu_record(want_dir, step)
    assert _metrics(workdir) == _metrics(baseline)
    assert _summary(workdir) == _summary(baseline)


def _dev_bleu_record(directory: str, step: int) -> dict:
    """What orbax ranks the step by: {"dev_bleu": x}, or {} for a step saved without evaluation."""
    with open(os.path.join(directory, str(step), "metrics", "metrics"), encoding="utf-8") as f:
        return json.load(f)


def _all_finite(directory: str) -> list[int]:
    """Steps of the checkpoints in `directory`, after checking every float leaf is finite."""
    steps = _steps(directory)
    for step in steps:
        leaves, _ = _restore_raw(directory, step)
        for name, value in leaves.items():
            if np.issubdtype(value.dtype, np.floating):
                assert np.isfinite(value).all(), f"{directory}/{step}: {name} is not finite"
    return steps


def _one_error_line(result) -> str:
    """The run failed with status 2 and exactly one `error: ...` line, no traceback."""
    assert result.returncode == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip() == errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory):
    """An uninterrupted run; the first subprocess, so it also fills the compilation cache."""
    workdir = str(tmp_path_factory.mktemp("baseline") / "w")
    result = _run(env, workdir)
    assert result.returncode == 0, result.output
    assert _steps(os.path.join(workdir, "checkpoints"))[-1] == STEPS
    return workdir


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(env, baseline, tmp_path):
    """SIGKILL inside a checkpoint write, during evaluation, between steps and at a random time;
    each time the same command is rerun. The result equals the uninterrupted run."""
    rng = random.Random(20240531)
    workdir = str(tmp_path / "w")
    eval_steps = "|".join(str(s) for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    eval_line = r"step (%s)/%d \|" % (eval_steps, STEPS)  # printed just before evaluating
    landed = []
    for plan in ("checkpoint_write", "evaluation", "step", "random", "checkpoint_write"):
        run = Watched(env, workdir)
        if plan == "checkpoint_write":
            tmp = run.wait_for_tmp_checkpoint(skip=rng.randrange(2))
            time.sleep(rng.uniform(0, 0.005))
            run.kill()
            run.finish()
            if tmp is not None and os.path.exists(tmp):
                landed.append(plan)  # the partial checkpoint is still there: killed mid-write
        elif plan == "evaluation":
            match = run.wait_for_line(eval_line)
            time.sleep(rng.uniform(0, 0.05))
            run.kill()
            run.finish()
            if match is not None and f"eval step {match.group(1)} " not in run.output:
                landed.append(plan)
        elif plan == "step":  # just after a progress line not followed by evaluation
            run.wait_for_line(r"step (%s)/%d \|" % ("|".join(
                str(s) for s in range(20, STEPS, 20) if s % EVAL_EVERY), STEPS))
            time.sleep(rng.uniform(0, 0.1))
            run.kill()
        else:
            time.sleep(rng.uniform(0.5, 3.5))  # a warm run takes ~5 s, half of it starting up
            run.kill()
        rc = run.finish()
        assert rc in (-signal.SIGKILL, 0), run.output
        assert "Traceback" not in run.output, run.output
        resumed = re.search(r"resumed from \S+ at step (\d+)", run.output)
        progress = re.findall(r"step (\d+)/%d \|" % STEPS, run.output)
        print(f"{plan}: rc {rc}, resumed at {resumed and resumed.group(1)}, last progress line "
              f"{progress[-1] if progress else None}, "
              f"checkpoints {_steps(os.path.join(workdir, 'checkpoints'))}")
    assert landed.count("checkpoint_write") >= 1 and "evaluation" in landed, landed

    result = _run(env, workdir)  # the same command, to the end
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
    _assert_same_run(workdir, baseline)


@pytest.mark.slow
def test_sigint_and_sigterm_save_a_checkpoint_and_resume_exactly(env, baseline, tmp_path):
    workdir = str(tmp_path / "w")
    for sig, progress in ((signal.SIGINT, 20), (signal.SIGTERM, 80)):
        run = Watched(env, workdir)
        assert run.wait_for_line(r"step %d/%d \|" % (progress, STEPS)) is not None, run.output
        time.sleep(0.02)
        run.kill(sig)
        rc = run.finish()
        assert rc == 128 + sig, run.output
        match = re.search(r"%s: saved checkpoint step (\d+) in (\S+); rerun the same command"
                          % sig.name, run.output)
        assert match, run.output
        step = int(match.group(1))
        assert match.group(2) == os.path.join(workdir, "checkpoints")
        assert step >= progress and step in _steps(match.group(2))
        assert re.search(r"resume with: python train\.py .*--workdir=%s" % re.escape(workdir), run.output)
        assert "Traceback" not in run.output
    result = _run(env, workdir)
    assert result.returncode == 0, result.output
    assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {step}" in result.output
    _assert_same_run(workdir, baseline)


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(env, baseline, tmp_path):
    """A complete-looking but damaged checkpoint is skipped (warning names it); the run goes on
    from the one before, moves the damaged one aside and ends identical to the baseline."""
    workdir = str(tmp_path / "w")
    shutil.copytree(baseline, workdir)
    damaged = os.path.join(workdir, "checkpoints", str(STEPS))
    for root, _, files in os.walk(os.path.join(damaged, "state")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    os.remove(os.path.join(workdir, "summary.json"))  # as if the run had died right after the save
    result = _run(env, workdir)
    assert result.returncode == 0, result.output
    assert f"skipping unreadable checkpoint {damaged}" in result.output
    previous = _steps(os.path.join(baseline, "checkpoints"))[-2]
    assert f"at step {previous}" in result.output
    assert os.path.isdir(f"{damaged}.unreadable-0")
    _assert_same_run(workdir, baseline)


# Early stopping on dev loss with the plateau decay: evaluations every 20 steps; an improvement must
# exceed 0.5 nats, so the run stops (at step 100) well before STEPS (BUILD_NOTES.md, issue 20).
STOPPING = ["--config.eval_every_steps=20", "--config.early_stopping.metric=dev_loss",
            "--config.early_stopping.patience=2", "--config.early_stopping.min_delta=0.5",
            "--config.optimizer.plateau_factor=0.5", "--config.optimizer.plateau_patience=1"]


@pytest.mark.slow
def test_early_stopping_after_a_kill_stops_at_the_same_step(env, baseline, tmp_path):
    """An uninterrupted run that stops early, against one killed after its first evaluation and
    rerun: the same stop step, checkpoints (plateau state included), metrics and summary; the last
    line says why it stopped and which step is best; a rerun of the stopped run trains nothing."""
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    result = _run(env, whole, STOPPING)
    assert result.returncode == 0, result.output
    summary = _summary(whole)
    assert summary["stopped"].startswith("early stopping: dev_loss did not improve by more than 0.5 in 2 "
                                         "evaluations"), summary
    assert 20 < summary["steps"] < STEPS and summary["steps"] % 20 == 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"final | step {summary['steps']} |") and summary["stopped"] in last
    assert f"best checkpoint: step {summary['best_step']} by dev_bleu" in last
    rates = [row["learning_rate"] for row in _metrics(whole) if "learning_rate" in row and row["step"] > 40]
    from configs import tiny
    peak = tiny.get_config().optimizer.learning_rate
    assert min(rates) < peak / 1.9  # the plateau decay halved the rate at least once

    run = Watched(env, killed, STOPPING)
    assert run.wait_for_line(r"eval step 20 ") is not None, run.output
    time.sleep(0.05)
    run.kill()
    assert run.finish() == -signal.SIGKILL
    result = _run(env, killed, STOPPING)
    assert result.returncode == 0, result.output
    _assert_same_run(killed, whole)
    again = _run(env, killed, STOPPING)
    assert again.returncode == 0 and "step 1/" not in again.output and summary["stopped"] in again.stdout


def test_checksum_mismatch_is_skipped(tmp_path, caplog):
    """A checkpoint whose arrays load but do not match the checksums in its meta is not used."""
    import jax.numpy as jnp
    from flax import struct
    from s2s_jax import checkpoints

    @struct.dataclass
    class State:
        step: jnp.ndarray
        params: dict

    store = checkpoints.Checkpoints(str(tmp_path), keep=3)
    for step in (1, 2):
        store.save(step, State(jnp.int32(step), {"w": jnp.full((4,), float(step))}), {"window": {}})
    store.close()
    meta_path = os.path.join(tmp_path, "checkpoints", "2", "meta", "metadata")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["checksums"]["params/w"] ^= 1
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    store = checkpoints.Checkpoints(str(tmp_path), keep=3)
    target = State(jnp.int32(0), {"w": jnp.zeros((4,))})
    state, _ = store.restore_latest(target)
    store.close()
    assert int(state.step) == 1 and np.array_equal(state.params["w"], np.ones(4))
    assert "skipping unreadable checkpoint" in caplog.text and "checksum mismatch in params/w" in caplog.text


# ----------------------------------------------------------------------------- non-finite steps
def test_nonfinite_step_stops_with_step_and_last_good_checkpoint(env, wrapper, tmp_path):
    """Batch 50 gets a token id outside the vocabulary: NaN embeddings, NaN loss and gradients."""
    workdir = str(tmp_path / "w")
    result = _run(env, workdir, script=wrapper, S2S_BAD_BATCH="50")
    error = _one_error_line(result)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert ("non-finite loss (nan) at step 51 (training batch 50)" in error
            and f"last good checkpoint: step 40 in {ckpt_dir}" in error), error
    assert _all_finite(ckpt_dir) == [20, 40]


def test_nonfinite_step_is_skipped_when_configured(env, wrapper, tmp_path):
    workdir = str(tmp_path / "w")
    result = _run(env, workdir, ["--config.on_nonfinite=skip"], script=wrapper, S2S_BAD_BATCH="50")
    assert result.returncode == 0, result.output
    assert "non-finite loss (nan) at step 51 (training batch 50)" in result.output
    rows = _metrics(workdir)
    assert [r.get("nonfinite_skipped") for r in rows if r["step"] == 60 and "train_loss" in r] == [1]
    assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
    assert _all_finite(os.path.join(workdir, "checkpoints"))[-1] == STEPS


def test_update_that_overflows_the_parameters_is_not_applied():
    """Finite loss and gradient, but an (absurd) update that overflows float32: the jitted
    train_step flags the step and keeps the old parameters and optimizer state."""
    import functools

    import jax
    import optax
    from configs import tiny
    from s2s_jax import data, schedules, steps
    from s2s_jax.models import make_model

    config = tiny.get_config()
    config.data.bucket_boundaries = (12,)
    model = make_model(config.model, 20, 20)
    state = steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)
    state = steps.TrainState.create(apply_fn=state.apply_fn, params=state.params,
                                       tx=optax.chain(optax.scale(1e30), optax.scale(1e30)))
    src, tgt = data.synthetic_task("reverse", 64, 20, 2, 10, seed=0)
    batch = data.TrainBatches(src, tgt, batch_size=32, boundaries=(12,), seed=0).batch(0)
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant", start=1.0),
        fast_path_only=True, label_smoothing=0.0, base_rng=jax.random.PRNGKey(0)))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss_sum"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    for new, old in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                        jax.tree.leaves((state.params, state.opt_state))):
        assert np.array_equal(np.asarray(new), np.asarray(old))


# ----------------------------------------------------------------------------- bad inputs
def _files_config(tmp_path, **data_overrides):
    from configs import tiny
    config = tiny.get_config()
    config.data.task = "files"
    config.data.train_prefix = str(tmp_path / "data" / "train")
    config.data.dev_prefix = str(tmp_path / "data" / "dev")
    config.data.src_lang, config.data.tgt_lang = "src", "tgt"
    config.data.vocab_size = 40
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def _write_corpus(tmp_path, **contents):
    """Writes train/dev .src/.tgt files: 4 good pairs each, unless given (bytes) in `contents`."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    good = b"".join(b"a b c %d\n" % i for i in range(4))
    for name in ("train.src", "train.tgt", "dev.src", "dev.tgt"):
        (folder / name).write_bytes(contents.get(name.replace(".", "_"), good))
    return folder


def _expect_error(exception, config, workdir, match):
    """train_and_evaluate fails with `exception` whose message matches; nothing was written."""
    from s2s_jax import training
    before = _tree(workdir)
    with pytest.raises(exception) as info:
        training.train_and_evaluate(config, workdir)
    assert re.search(match, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    assert _tree(workdir) == before, "the workdir changed"
    return str(info.value)


def _tree(workdir) -> dict | None:
    """{relative path: (size, mtime)} of everything under workdir; None if it does not exist."""
    if not os.path.exists(workdir):
        return None
    out = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, workdir)] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
    return out


def test_missing_data_file(tmp_path):
    from s2s_jax import data
    folder = _write_corpus(tmp_path)
    os.remove(folder / "train.tgt")
    _expect_error(data.DataError, _files_config(tmp_path), str(tmp_path / "w"),
                  re.escape(f"{folder / 'train.tgt'}: cannot read file (No such file or directory)"))


def test_unreadable_data_file(tmp_path):
    from s2s_jax import data
    folder = _write_corpus(tmp_path)
    os.remove(folder / "dev.src")
    os.mkdir(folder / "dev.src")  # unreadable even for root, unlike chmod 000
    _expect_error(data.DataError, _files_config(tmp_path), str(tmp_path / "w"),
                  re.escape(f"{folder / 'dev.src'}: cannot read file (Is a directory)"))


def test_line_counts_differ(tmp_path):
    from s2s_jax import data
    folder = _write_corpus(tmp_path, train_tgt=b"x\ny\nz\n")
    _expect_error(data.DataError, _files_config(tmp_path), str(tmp_path / "w"),
                  re.escape(f"{folder / 'train.src'}: 4 lines, but {folder / 'train.tgt'} has 3 lines"))


def test_invalid_utf8(tmp_path):
    from s2s_jax import data
    folder = _write_corpus(tmp_path, train_src=b"a b\nc \xff d\ne\nf\n")
    _expect_error(data.DataError, _files_config(tmp_path), str(tmp_path / "w"),
                  re.escape(f"{folder / 'train.src'}:2: invalid UTF-8 (byte 0xff at column 3)"))


def test_empty_lines_are_an_error_when_configured(tmp_path):
    from s2s_jax import data
    folder = _write_corpus(tmp_path, dev_tgt=b"a\nb\n  \nd\n")
    _expect_error(data.DataError, _files_config(tmp_path, on_empty="error"), str(tmp_path / "w"),
                  re.escape(f"{folder / 'dev.tgt'}:3: empty line"))


def test_empty_lines_are_skipped_and_counted_by_default(tmp_path):
    from s2s_jax import data
    _write_corpus(tmp_path, train_src=b"a\n\nc\nd\n", train_tgt=b"a\nb\n\nd\n")
    corpus = data.load_corpus(_files_config(tmp_path).data, str(tmp_path / "w"))
    assert corpus.stats["train_pairs_read"] == 2 and corpus.stats["train_empty_skipped"] == 2
    assert corpus.stats["dev_empty_skipped"] == 0


@pytest.mark.parametrize("key, value", [("eval.beam_size", 0), ("eval.max_decode_len", 0),
                                        ("data.max_len", 0), ("model.dropout", 1.5),
                                        ("optimizer.label_smoothing", 1.5), ("optimizer.learning_rate", -1),
                                        ("optimizer.b2", 2), ("optimizer.clip_norm", -3),
                                        ("data.bucket_boundaries", ()), ("data.synthetic_vocab_size", 3)])
def test_bad_config_value_names_the_key(tmp_path, key, value):
    from configs import tiny
    from s2s_jax import configuration
    config = tiny.get_config()
    group, name = key.split(".")
    config[group][name] = value
    _expect_error(configuration.ConfigError, config, str(tmp_path / "w"), re.escape(f"{key}={value}"))


def test_workdir_of_another_vocabulary_or_model(tmp_path):
    """config.json of the workdir disagrees on a shape key: ConfigError naming it, nothing written."""
    from configs import tiny
    from s2s_jax import configuration
    workdir = str(tmp_path / "w")
    configuration.save(tiny.get_config(), workdir)
    config = tiny.get_config()
    config.data.synthetic_vocab_size = 30
    _expect_error(configuration.ConfigError, config, workdir,
                  r"config\.json: this workdir was made with another model shape or vocabulary "
                  r"\(data\.synthetic_vocab_size: 20 there, 30 here\)")
    config = tiny.get_config()
    config.model.embed_dim = 48
    _expect_error(configuration.ConfigError, config, workdir, r"model\.embed_dim: 32 there, 48 here")


def test_checkpoint_of_another_model_shape(baseline, tmp_path):
    """Without config.json to compare, the checkpoint's own parameter shapes are checked before
    anything is compiled or written."""
    from s2s_jax import checkpoints
    from configs import tiny
    workdir = str(tmp_path / "w")
    shutil.copytree(baseline, workdir)
    os.remove(os.path.join(workdir, "config.json"))
    config = tiny.get_config()
    config.model.decoder_hidden = 48
    _expect_error(checkpoints.CheckpointError, config, workdir,
                  re.escape(f"checkpoint {os.path.join(workdir, 'checkpoints', str(STEPS))} was made with "
                            "another model shape or vocabulary: ") + r"\S+ is \[.*\] in the checkpoint but")


def test_train_py_prints_one_error_line_with_status_2(env, tmp_path):
    """Flag parsing (unknown key, wrong type), config checks and data errors, through train.py."""
    missing = str(tmp_path / "nowhere" / "train")
    cases = {
        ("--config.model.atention=concat",):
            r"error: unknown config key 'model\.atention' in --config\.model\.atention=concat .*"
            r"did you mean 'model\.attention'\?",
        ("--config.num_train_steps=1.5",): r"error: flag --config\.num_train_steps=1\.5: ",
        ("--config.eval.beam_size=0",): r"error: config: eval\.beam_size=0 must be a positive integer",
        ("--config.data.task=files", f"--config.data.train_prefix={missing}"):
            r"error: %s\.es: cannot read file \(No such file or directory\)" % re.escape(missing),
    }
    procs = {}
    for i, extra in enumerate(cases):
        workdir = str(tmp_path / f"w{i}")
        procs[extra] = (workdir, subprocess.Popen(_command(workdir, extra), cwd=REPO, env=env, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for extra, pattern in cases.items():
        workdir, proc = procs[extra]
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        result.output = stdout + stderr
        assert re.fullmatch(pattern + ".*", _one_error_line(result)), (extra, stderr)
        assert not os.path.exists(workdir), extra


# ----------------------------------------------------------------------------- failed checkpoint writes
def _small_store(tmp_path):
    import jax.numpy as jnp
    from flax import struct
    from s2s_jax import checkpoints

    @struct.dataclass
    class State:
        step: jnp.ndarray
        params: dict

    store = checkpoints.Checkpoints(str(tmp_path), keep=2)
    make = lambda step, value: State(jnp.int32(step), {"w": jnp.full((8,), value, jnp.float32)})  # noqa: E731
    return store, make


def test_read_only_checkpoint_directory(tmp_path, monkeypatch):
    """chmod when not root; as root (chmod does not stop root) orbax's write raises EROFS."""
    import orbax.checkpoint as ocp
    from s2s_jax import checkpoints
    store, make = _small_store(tmp_path)
    store.save(1, make(1, 1.0), {"window": {}})
    directory = os.path.join(tmp_path, "checkpoints")
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
    else:
        def read_only(self, step, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(self.directory))
        monkeypatch.setattr(ocp.CheckpointManager, "save", read_only)
    try:
        with pytest.raises(checkpoints.CheckpointError) as info:
            store.save(2, make(2, 2.0), {"window": {}})
    finally:
        os.chmod(directory, 0o755)
        monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint step 2 to {directory}: ")
    assert ("Read-only file system" in message or "Permission denied" in message), message
    assert message.endswith(f"previous checkpoint: step 1 in {directory}, intact")
    store.close()
    store, make = _small_store(tmp_path)
    state, _ = store.restore_latest(make(0, 0.0))
    store.close()
    assert int(state.step) == 1 and np.array_equal(state.params["w"], np.ones(8, np.float32))


def test_nonfinite_parameters_are_refused(tmp_path):
    from s2s_jax import checkpoints
    store, make = _small_store(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"refusing to write checkpoint step 3 .* params/w"):
        store.save(3, make(3, float("nan")), {"window": {}})
    store.close()
    assert _steps(os.path.join(tmp_path, "checkpoints")) == []


def _unshare_tmpfs_works() -> bool:
    """True where this process may mount a small tmpfs in a private mount namespace."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _run_with_small_checkpoint_disk(env, workdir: str, size: int, scratch) -> subprocess.CompletedProcess:
    """train.py with the workdir's checkpoints/ on a tmpfs of `size` bytes, in a private mount
    namespace; everything else (metrics, TensorBoard events) goes to the real disk. Afterwards
    checkpoints/ holds a copy of what the tmpfs held, on the real disk: the space is "freed"."""
    ckpt_dir, copy = os.path.join(workdir, "checkpoints"), str(scratch / "copy")
    os.makedirs(ckpt_dir)
    q = shlex.quote
    script = (f"mount -t tmpfs -o size={size} tmpfs {q(ckpt_dir)} && "
              f"{shlex.join(_command(workdir))} > {q(str(scratch / 'out'))} 2> {q(str(scratch / 'err'))}; "
              f"echo $? > {q(str(scratch / 'rc'))}; cp -a {q(ckpt_dir)} {q(copy)}")
    subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=REPO, env=env, timeout=RUN_TIMEOUT,
                   check=True)
    os.rmdir(ckpt_dir)  # the empty mount point, once the namespace is gone
    shutil.move(copy, ckpt_dir)
    result = subprocess.CompletedProcess([], int((scratch / "rc").read_text()),
                                         (scratch / "out").read_text(), (scratch / "err").read_text())
    result.output = result.stdout + result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_disk_full_during_checkpoint_write(env, wrapper, baseline, tmp_path, disk):
    """The disk is full at the third checkpoint write (step 60): one error line naming that step
    and the previous checkpoint, status 2, the previous checkpoint intact; with space again the
    same command resumes from it and ends exactly like the uninterrupted run.

    "tmpfs": checkpoints/ alone is a tmpfs with room for two and a half checkpoints (needs a
    private mount namespace: `unshare --mount`, skipped where not allowed), so the write of step
    60 is the first write to fail, and a real one: orbax's and tensorstore's own error path.
    "patched": orbax's save raises ENOSPC on its third call: our error path alone, on any machine."""
    workdir = str(tmp_path / "w")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if disk == "tmpfs":
        if not _unshare_tmpfs_works():
            pytest.skip("cannot mount a tmpfs in a private mount namespace here")
        step_bytes = sum(-(-os.path.getsize(os.path.join(root, f)) // 4096) * 4096  # tmpfs counts pages
                         for root, _, files in os.walk(os.path.join(baseline, "checkpoints", str(STEPS)))
                         for f in files)
        result = _run_with_small_checkpoint_disk(env, workdir, step_bytes * 5 // 2 // 4096 * 4096, tmp_path)
    else:
        result = _run(env, workdir, script=wrapper, S2S_FAIL_SAVE="3")
    error = _one_error_line(result)
    failed, previous = 3 * CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY
    assert re.fullmatch(rf"error: cannot write checkpoint step {failed} to {re.escape(ckpt_dir)}: "
                        rf".*No space left on device.*; "
                        rf"previous checkpoint: step {previous} in {re.escape(ckpt_dir)}, intact", error), error
    assert _steps(ckpt_dir) == [CHECKPOINT_EVERY, previous]
    leaves, meta = _restore_raw(ckpt_dir, previous)
    assert meta["step"] == previous and int(leaves["step"]) == previous

    result = _run(env, workdir)
    assert result.returncode == 0, result.output
    assert f"resumed from {ckpt_dir} at step {previous}" in result.output  # no step was skipped
    assert not [name for name in os.listdir(ckpt_dir) if "tmp" in name]
    _assert_same_run(workdir, baseline)
