"""train.py's persistent compilation cache: a second identical run loads what the first compiled."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_tiny(workdir, cache_dir):
    """A 2-step configs/tiny.py run in a fresh process; returns its summary.json."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                          f"--compilation_cache={cache_dir}", "--config.num_train_steps=2",
                          "--config.eval_every_steps=2", "--config.data.synthetic_train_size=64",
                          "--config.data.synthetic_dev_size=8"],
                         check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_second_run_compiles_far_less(tmp_path):
    cache_dir = tmp_path / "cache"
    first = run_tiny(tmp_path / "first", cache_dir)
    assert os.listdir(cache_dir)
    second = run_tiny(tmp_path / "second", cache_dir)
    assert second["compile_s"] <= 0.5 * first["compile_s"], (first["compile_s"], second["compile_s"])
