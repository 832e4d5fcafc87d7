"""Several processes: two train.py processes on localhost (gloo, one CPU device each) train the same
model as one process with two devices, on the same global batches; process 0 alone writes the
metrics; dev BLEU decoded over both equals one process's; a signal to one stops both, a killed one
stops the other, and the run resumes exactly. Real subprocesses on a shrunk configs/tiny.py sharing
one compilation cache, with batches by tokens (data.max_tokens: 24 and 16 rows in its two buckets over
two devices), so each process reads its block of rows of batches of two sizes."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from s2s_jax import checkpoints, configuration, data, parallel, steps
from s2s_jax.metrics import sacrebleu_score
from s2s_jax.models import make_model
from s2s_jax.translate import Translator
from tests.conftest import REPO

EMA_DECAY = 0.9
ARGS = ["--config=configs/tiny.py", "--config.num_train_steps=20", "--config.log_every_steps=5",
        "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20",
        "--config.data.synthetic_train_size=256", "--config.data.synthetic_dev_size=16",
        "--config.eval.batch_size=16", "--config.data.max_tokens=220",
        # The state holds a moving average; each device's rows split into 2 micro-batches.
        f"--config.optimizer.ema_decay={EMA_DECAY}", "--config.optimizer.accumulate_steps=2"]
TIMEOUT = 600  # per run; a loaded 2-core machine compiles slowly


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def command(workdir, *extra) -> list[str]:
    return [sys.executable, "train.py", *ARGS, *extra, f"--workdir={workdir}"]


def devices(env, count: int) -> dict:
    return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Runs train.py after patching, in this process only: S2S_SIGNAL_AT_BATCH=n sends it SIGTERM when it
# reads training batch n; S2S_KILL_AFTER_SAVE=n kills it (SIGKILL) right after it saved step n,
# S2S_KILL_IN_SAVE=n as it starts saving step n; S2S_KILL_IN_PREPARE kills it as it starts reading
# the corpus.
INJECT = r'''
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
from s2s_jax import checkpoints, data
if "S2S_SIGNAL_AT_BATCH" in os.environ:
    at, batch = int(os.environ["S2S_SIGNAL_AT_BATCH"]), data.TrainBatches.batch
    def signalled(self, number, rows=None):
        if number == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, number, rows)
    data.TrainBatches.batch = signalled
if "S2S_KILL_AFTER_SAVE" in os.environ:
    after, save = int(os.environ["S2S_KILL_AFTER_SAVE"]), checkpoints.Checkpoints.save
    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == after:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.Checkpoints.save = save_then_die
if "S2S_KILL_IN_SAVE" in os.environ:
    at_save, save = int(os.environ["S2S_KILL_IN_SAVE"]), checkpoints.Checkpoints.save
    def die_saving(self, step, *args, **kwargs):
        if step == at_save:
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, step, *args, **kwargs)
    checkpoints.Checkpoints.save = die_saving
if "S2S_KILL_IN_PREPARE" in os.environ:
    def die_preparing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    data.load_corpus = die_preparing
sys.argv = sys.argv[1:]  # ["train.py", flags...]
runpy.run_path("train.py", run_name="__main__")
'''


def start_process(env, workdir, address: str, process_id: int, *extra, inject=None) -> subprocess.Popen:
    """Starts process `process_id` of a two-process run at coordinator `address` (inject: extra
    environment, see INJECT)."""
    layout = (f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
              f"--config.distributed.process_id={process_id}")
    return subprocess.Popen([sys.executable, "-c", INJECT, *command(workdir, *layout, *extra)[1:]], cwd=REPO,
                            env=dict(devices(env, 1), **(inject or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def start_two_processes(env, workdir, *extra, inject=({}, {})) -> list[subprocess.Popen]:
    """Starts processes 0 and 1 of one run (inject: extra environment per process, see INJECT)."""
    address = f"localhost:{free_port()}"
    return [start_process(env, workdir, address, i, *extra, inject=inject[i]) for i in range(2)]


def finish(runs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[str]:
    """The outputs (stdout + stderr) of runs, once they ended; each is killed if still running
    after `timeout`."""
    try:
        return [run.communicate(timeout=timeout)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
            run.wait()


def train_two_processes(env, workdir, *extra) -> list[str]:
    """Runs processes 0 and 1 of one run to the end; returns their outputs (stdout + stderr)."""
    runs = start_two_processes(env, workdir, *extra)
    outputs = finish(runs)
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
    return outputs


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")}


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def final_params(workdir) -> dict:
    """The last checkpoint's parameters and their moving average, restored here (one process, one
    device: orbax needs the target's sharding to restore a checkpoint saved on another topology)."""
    config = tiny.get_config()
    config.optimizer.ema_decay = EMA_DECAY
    model = make_model(config.model, config.data.synthetic_vocab_size, config.data.synthetic_vocab_size)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)))
    store = checkpoints.Checkpoints(str(workdir), config.keep_checkpoints)
    try:
        state, meta = store.restore_latest(target)
    finally:
        store.close()
    assert meta["step"] == 20
    return jax.tree.map(np.asarray, (state.params, state.ema_params))


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory) -> dict:
    """One process with two devices and two processes with one each, trained side by side (they
    share nothing but the compilation cache): their workdirs and the two processes' outputs."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    single = subprocess.Popen(command(one), cwd=REPO, env=devices(env, 2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        outputs = train_two_processes(env, two)
        single_output = single.communicate(timeout=TIMEOUT)[0]
    finally:
        single.kill()
        single.wait()
    assert single.returncode == 0, single_output[-3000:]
    return dict(one=one, two=two, outputs=outputs)


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices(uninterrupted):
    one, two, (first, second) = uninterrupted["one"], uninterrupted["two"], uninterrupted["outputs"]
    # One writer: process 0 prints the progress and final lines; process 1 none of them.
    assert "step 20/20" in first and "final | step 20" in first
    assert "step 20/20" not in second and "final |" not in second
    assert "batch shapes [(24, 8), (16, 12)]" in first  # data.max_tokens=220 over 2 devices x 2 micro-batches
    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [5, 10, 15, 20, 20]
    losses = [[r["train_loss"] for r in rows if "train_loss" in r] for rows in (rows_one, rows_two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert rows_two[-1]["dev_loss"] == pytest.approx(rows_one[-1]["dev_loss"], rel=1e-5)
    assert rows_two[-1]["dev_bleu"] == rows_one[-1]["dev_bleu"]
    assert len(os.listdir(two / "tb")) == 1
    # The two-process checkpoint restores in one process, with the same parameters.
    params_one, params_two = final_params(one), final_params(two)
    assert jax.tree.structure(params_one) == jax.tree.structure(params_two)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_distributed_dev_bleu_equals_one_process_decoding(uninterrupted):
    """Dev BLEU decoded over two processes is what one process with one device gets from the same
    checkpoint (beam search on a mesh: tests/test_sharded_decoding.py)."""
    two = str(uninterrupted["two"])
    translator = Translator.from_workdir(two)
    dev = data.load_corpus(translator.config.data, two)
    hypotheses = translator.translate(dev.dev_src_text, search="greedy")
    assert metrics(two)[-1]["dev_bleu"] == sacrebleu_score(hypotheses, dev.dev_tgt_text)[0]


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_and_a_killed_one_stops_the_other(env, uninterrupted, tmp_path):
    """SIGTERM to process 1 only: both save the same checkpoint and exit 143. Resumed, process 1 is
    killed (SIGKILL) right after a save: process 0's next collective fails, and it exits at once
    with one error line (status 3) rather than wait for the dead process (JAX's shutdown). Resumed again,
    the run ends bit-identical to the uninterrupted one."""
    workdir, every5 = tmp_path / "w", "--config.checkpoint_every_steps=5"
    runs = start_two_processes(env, workdir, every5, inject=({}, {"S2S_SIGNAL_AT_BATCH": "7"}))
    outputs = finish(runs)
    assert [run.returncode for run in runs] == [128 + signal.SIGTERM] * 2, outputs[0][-3000:]
    saved = re.findall(r"SIGTERM: saved checkpoint step (\d+) in ", outputs[0] + outputs[1])
    assert saved and set(saved) == {"9"}, outputs  # the step after the signal's, in both

    runs = start_two_processes(env, workdir, every5, inject=({}, {"S2S_KILL_AFTER_SAVE": "15"}))
    runs[1].wait(timeout=TIMEOUT)
    died = time.monotonic()
    assert runs[1].returncode == -signal.SIGKILL
    output = finish(runs[:1])[0]
    waited = time.monotonic() - died
    print(f"process 0 exited with status {runs[0].returncode} {waited:.1f} s after process 1 was killed")
    assert runs[0].returncode == 3 and waited < 60, output[-3000:]  # train.PEER_LOST
    assert "another one has stopped" in output and "Traceback" not in output, output[-3000:]
    assert "resumed from" in output and "at step 9" in output

    train_two_processes(env, workdir, every5)
    reference = uninterrupted["two"]
    assert [without_timings(row) for row in metrics(workdir)] == [without_timings(r) for r in metrics(reference)]
    for got, want in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(final_params(reference))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_token_batches_bind_the_checkpoint_to_the_device_count(env, uninterrupted, tmp_path):
    """max_tokens // bucket is rounded to a multiple of the devices times the micro-batches (2): 2
    devices give the buckets 8 and 12 rows 24 and 16, one device 26 and 18. Resuming on one device is refused in one line, and
    nothing of the workdir changes."""
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted["one"], workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if "run.lock" not in p.name)
    result = subprocess.run(command(workdir), cwd=REPO, env=devices(env, 1), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: {workdir}/checkpoints: step 20 was trained on batches of [24, 16] rows (buckets "
                      "[8, 12]) over 2 devices; data.max_tokens=220 gives [26, 18] over this run's 1 (rows are a "
                      "multiple of the device count times optimizer.accumulate_steps): resume on 2 devices or use a new --workdir"], result.stdout
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if "run.lock" not in p.name) == before


def test_each_process_holds_its_block_of_rows():
    mesh = parallel.make_mesh()
    assert parallel.process_rows(8, mesh).tolist() == list(range(8))  # one process holds every row
    batch = np.arange(16).reshape(8, 2)
    assert np.asarray(parallel.shard_batch(batch, mesh)).tolist() == batch.tolist()


@pytest.mark.parametrize("values, message", [
    (dict(num_processes=2), "needs distributed.coordinator_address="),
    (dict(coordinator_address="localhost", num_processes=2), "must be '' (one process), 'HOST:PORT' or 'auto'"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "process_id=2 must be below"),
])
def test_bad_distributed_settings_name_the_key(values, message):
    config = tiny.get_config()
    config.distributed.update(values)
    with pytest.raises(ValueError, match=re.escape(message)):
        parallel.check_distributed(config.distributed)


def test_the_layout_is_free_to_change_on_resume(tmp_path):
    config = tiny.get_config()
    configuration.save(config, str(tmp_path))
    config.distributed.update(coordinator_address="host0:1234", num_processes=4, process_id=3)
    assert len(configuration.check_workdir(config, str(tmp_path))) == 3
