"""Several processes: two train.py processes on localhost (gloo, one CPU device each) train the same
model as one process with two devices, on the same global batches; process 0 alone writes the
metrics. Real subprocesses on a shrunk configs/tiny.py sharing one compilation cache."""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from s2s_jax import checkpoints, configuration, parallel, steps
from s2s_jax.models import make_model
from tests.conftest import REPO

ARGS = ["--config=configs/tiny.py", "--config.num_train_steps=20", "--config.log_every_steps=5",
        "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20",
        "--config.data.synthetic_train_size=256", "--config.data.synthetic_dev_size=16",
        "--config.eval.batch_size=16", "--config.data.bucket_boundaries=(12,)"]
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


def train_two_processes(env, workdir) -> list[str]:
    """Runs processes 0 and 1 of one run; returns their outputs (stdout + stderr)."""
    address = f"localhost:{free_port()}"
    runs = [subprocess.Popen(command(workdir, f"--config.distributed.coordinator_address={address}",
                                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                             cwd=REPO, env=devices(env, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
    try:
        outputs = [run.communicate(timeout=TIMEOUT)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
            run.wait()
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
    return outputs


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def final_params(workdir) -> dict:
    """The last checkpoint's parameters, restored here (one process, one device: orbax needs the
    target's sharding to restore a checkpoint saved on another topology)."""
    config = tiny.get_config()
    model = make_model(config.model, config.data.synthetic_vocab_size, config.data.synthetic_vocab_size)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: steps.init_state(config, model)))
    store = checkpoints.Checkpoints(str(workdir), config.keep_checkpoints)
    try:
        state, meta = store.restore_latest(target)
    finally:
        store.close()
    assert meta["step"] == 20
    return jax.tree.map(np.asarray, state.params)


def test_two_processes_train_as_one_process_with_two_devices(env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # The one-process run goes on beside the two-process one (they share nothing but the cache).
    single = subprocess.Popen(command(one), cwd=REPO, env=devices(env, 2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        first, second = train_two_processes(env, two)
        single_output = single.communicate(timeout=TIMEOUT)[0]
    finally:
        single.kill()
        single.wait()
    assert single.returncode == 0, single_output[-3000:]
    # One writer: process 0 prints the progress and final lines; process 1 none of them.
    assert "step 20/20" in first and "final | step 20" in first
    assert "step 20/20" not in second and "final |" not in second
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
