"""Data parallelism: the same tiny run on 1 and on 2 (virtual CPU) devices gives the same losses.

The runs also evaluate with beam search, which must report greedy and beam dev BLEU."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

RUN = """
import json, sys
import jax
from configs import tiny
from s2s_jax import training
config = tiny.get_config()
config.num_train_steps = 40
config.log_every_steps = 10
config.eval_every_steps = 40
config.checkpoint_every_steps = 40
config.data.synthetic_train_size = 640
config.data.synthetic_dev_size = 32
config.eval.batch_size = 32
config.eval.search = "beam"
config.data.bucket_boundaries = (12,)  # one batch shape: one compilation per function
summary = training.train_and_evaluate(config, sys.argv[1])
print(json.dumps(dict(devices=jax.device_count(), dev_loss=summary["dev_loss"],
                      beam=summary["dev_bleu_beam"], greedy=summary["dev_bleu"])))
"""


def train(workdirs: dict[int, str]) -> dict[int, tuple[dict, list[float]]]:
    """Runs the tiny run once per {devices: workdir}, side by side; returns (summary, train losses)."""
    runs = {}
    for devices, workdir in workdirs.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        runs[devices] = subprocess.Popen([sys.executable, "-c", RUN, workdir], cwd=REPO, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for devices, run in runs.items():
            stdout, stderr = run.communicate(timeout=300)
            assert run.returncode == 0, stderr[-2000:]
            with open(os.path.join(workdirs[devices], "metrics.jsonl"), encoding="utf-8") as f:
                losses = [row["train_loss"] for row in map(json.loads, f) if "train_loss" in row]
            results[devices] = json.loads(stdout.strip().splitlines()[-1]), losses
    finally:
        for run in runs.values():
            run.kill()
            run.wait()
    return results


@pytest.mark.slow
def test_two_devices_match_one(tmp_path):
    results = train({1: str(tmp_path / "one"), 2: str(tmp_path / "two")})
    (one, losses_one), (two, losses_two) = results[1], results[2]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert len(losses_one) == len(losses_two) == 4
    # Same batches, same updates; only the order of the cross-device sums differs.
    assert losses_two == pytest.approx(losses_one, rel=1e-3)
    assert two["dev_loss"] == pytest.approx(one["dev_loss"], rel=1e-3)
    # Dev BLEU (greedy and beam), decoded on the mesh, equals the one-device figure.
    assert (two["greedy"], two["beam"]) == (one["greedy"], one["beam"])
    # A checkpoint saved on two devices loads on this process's one device and translates as the
    # one-device model does.
    from s2s_jax.translate import Translator
    sentences = ["4 5 6", "7 8 9 10", "11 4"]
    assert (Translator.from_workdir(str(tmp_path / "two")).translate(sentences, search="greedy")
            == Translator.from_workdir(str(tmp_path / "one")).translate(sentences, search="greedy"))
