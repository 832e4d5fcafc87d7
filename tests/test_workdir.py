"""One workdir, several invocations of train.py: a concurrent second run, a changed config, a
rerun of a finished run. Real subprocesses on a shrunk configs/tiny.py sharing one compilation cache.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

ARGS = ["--config=configs/tiny.py", "--config.num_train_steps=40", "--config.log_every_steps=20",
        "--config.eval_every_steps=40", "--config.checkpoint_every_steps=20",
        "--config.data.synthetic_train_size=256", "--config.data.synthetic_dev_size=16",
        "--config.eval.batch_size=16", "--config.data.bucket_boundaries=(12,)"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train(env, workdir, *extra, timeout=240):
    return subprocess.run([sys.executable, "train.py", *ARGS, *extra, f"--workdir={workdir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_a_second_run_on_a_held_workdir_stops_at_once_naming_the_holder(env, tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *ARGS, "--config.num_train_steps=100000",
                              f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # the first run holds the lock once it trains
            if "step 20/" in line:
                break
        started = time.time()
        second = train(env, workdir)
        assert time.time() - started < 30  # at once: no data, no compilation
        line = error_line(second)
        assert f"pid {first.pid}" in line and "host" in line and str(workdir) in line
        assert first.poll() is None  # the holder goes on
    finally:
        first.kill()
        first.wait()
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(row)["step"] for row in f]
    assert steps == sorted(set(steps))  # one writer: no interleaved rows


def test_changed_run_is_refused_and_finished_run_is_not_redone(env, tmp_path):
    workdir = tmp_path / "run"
    assert train(env, workdir).returncode == 0
    summary_path, config_path = workdir / "summary.json", workdir / "config.json"
    summary, config = summary_path.read_bytes(), config_path.read_bytes()

    line = error_line(train(env, workdir, "--config.seed=7", "--config.data.batch_size=16"))
    assert "seed: 42 → 7" in line and "data.batch_size: 32 → 16" in line and "--workdir" in line
    assert config_path.read_bytes() == config  # nothing written

    rerun = train(env, workdir)  # finished: prints the final line, keeps summary.json as it was
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines()[-1].startswith("final | step 40 |")
    assert summary_path.read_bytes() == summary

    longer = train(env, workdir, "--config.num_train_steps=60")  # a free key: continues
    assert longer.returncode == 0, longer.stderr
    assert json.loads(summary_path.read_text())["steps"] == 60
    assert "num_train_steps: 40 → 60" in longer.stdout
