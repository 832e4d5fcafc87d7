"""Weight averaging: the moving average of the parameters (optimizer.ema_decay) against a numpy
recurrence, what a run with it checkpoints and decodes with, and `python -m s2s_jax.average`
against numpy means of the checkpoints read back by orbax alone.

Exact resume with the average (kill -9) and two processes against one are tests/test_reliability.py
and tests/test_multiprocess.py, whose runs keep an average and accumulate gradients."""
import functools
import json
import os
import shutil
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from s2s_jax import average, checkpoints, configuration, data, steps, training
from s2s_jax.models import make_model
from s2s_jax.schedules import make_schedule
from s2s_jax.translate import Translator
from tests.conftest import REPO

DECAY, VOCAB = 0.9, 20


def ema_reference(initial: list, trajectory: list[list], decay: float) -> list:
    """The average after each step, in float64: e <- d e + (1 - d) p with d = min(decay, (1+t)/(10+t))."""
    ema = [np.asarray(x, np.float64) for x in initial]
    for t, params in enumerate(trajectory, start=1):
        d = min(decay, (1 + t) / (10 + t))
        ema = [d * e + (1 - d) * np.asarray(p, np.float64) for e, p in zip(ema, params)]
    return ema


def test_moving_average_follows_the_numpy_recurrence_and_skips_nonfinite_steps():
    config = tiny.get_config()
    config.optimizer.ema_decay = DECAY
    model = make_model(config.model, VOCAB, VOCAB)
    state = steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)
    assert steps.inference_params(state) is state.ema_params
    src, tgt = data.synthetic_task("reverse", 16, VOCAB, 2, 6, seed=0)
    batch = data.make_batch(src, tgt, list(range(16)), batch_size=16, length=8)
    step = jax.jit(functools.partial(steps.train_step, model=model, tf_schedule=make_schedule("constant"),
                                     fast_path_only=True, label_smoothing=0.0, base_rng=jax.random.PRNGKey(0),
                                     ema_decay=DECAY))
    initial, trajectory = jax.tree.leaves(state.params), []
    for _ in range(25):  # past step 80 / 9 the decay is DECAY
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        trajectory.append(jax.tree.leaves(state.params))
    for got, want in zip(jax.tree.leaves(state.ema_params), ema_reference(initial, trajectory, DECAY)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # A non-finite step (a source id far outside the vocabulary: NaN embeddings) moves nothing.
    src_bad = np.asarray(batch.src).copy()
    src_bad[0, 0] = 10**6
    after, metrics = step(state, batch._replace(src=src_bad))
    assert not bool(metrics["finite"]) and int(after.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves(after.ema_params), jax.tree.leaves(state.ema_params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- a run with an average
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """60 steps of configs/tiny.py with a moving average and 2 micro-batches; checkpoints 20, 40, 60."""
    workdir = str(tmp_path_factory.mktemp("ema") / "w")
    config = tiny.get_config()
    config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 60, 20, 60
    config.keep_checkpoints = 3
    config.optimizer.ema_decay, config.optimizer.accumulate_steps = DECAY, 2
    config.data.synthetic_dev_size, config.eval.batch_size = 32, 32
    config.data.bucket_boundaries = (12,)
    training.train_and_evaluate(config, workdir)
    return workdir


def raw_checkpoint(workdir: str, step: int) -> dict:
    """{'params/...': array, 'ema_params/...': array, ...} of one checkpoint, read by orbax alone."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state, sep="/").items()}


def flat(params) -> dict:
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def group(leaves: dict, name: str) -> dict:
    return {k.removeprefix(f"{name}/"): v for k, v in leaves.items() if k.startswith(f"{name}/")}


def test_run_decodes_and_evaluates_with_the_average(run):
    saved = raw_checkpoint(run, 60)
    ema, params = group(saved, "ema_params"), group(saved, "params")
    assert sorted(ema) == sorted(params) and any(not np.array_equal(ema[k], params[k]) for k in ema)
    translator = Translator.from_workdir(run)
    assert all(np.array_equal(v, ema[k]) for k, v in flat(translator.params).items())
    # The logged dev loss is the average's, not the raw parameters'.
    config = configuration.load(run)
    corpus = data.load_corpus(config.data, run)
    batches = data.eval_batches(corpus.dev_src, corpus.dev_tgt, batch_size=32, boundaries=(12,))
    eval_step = jax.jit(functools.partial(steps.eval_step, model=translator.model))

    def dev_loss(weights):
        sums = [eval_step(weights, batch) for batch in batches]
        return sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)

    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        logged = json.load(f)["dev_loss"]
    raw = jax.tree.map(np.asarray, flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()}))
    assert dev_loss(translator.params) == pytest.approx(logged, rel=1e-6)
    assert abs(dev_loss(raw) - logged) > 1e-4


# ----------------------------------------------------------------------------- python -m s2s_jax.average
def snapshot(workdir: str) -> dict:
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                       os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, dirs, names in os.walk(workdir) for name in dirs + names}


@pytest.mark.parametrize("raw", [False, True], ids=["ema", "raw"])
def test_average_writes_the_mean_as_a_workdir_and_leaves_the_run_alone(run, tmp_path, raw):
    before = snapshot(run)
    output, record = average.average(run, chosen=[20, 60], output=str(tmp_path / "avg"), raw=raw)
    assert snapshot(run) == before
    name = "params" if raw else "ema_params"
    assert record == dict(workdir=os.path.abspath(run), steps=[20, 60], weights=name)
    want = {k: (v.astype(np.float64) + group(raw_checkpoint(run, 60), name)[k]) / 2
            for k, v in group(raw_checkpoint(run, 20), name).items()}
    loaded = Translator.from_workdirs([output, run])  # an ensemble with its run: same tokenizers
    got = flat(loaded.params[0])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-8)
    assert configuration.load(output).optimizer.ema_decay == 0.0
    assert sorted(os.listdir(tmp_path)) == ["avg"]  # no temporary folder left


def test_average_last_takes_the_newest_and_names_its_output(run):
    output, record = average.average(run, last=2)
    try:
        assert output == f"{run}-avg2-60" and record["steps"] == [40, 60]
        with pytest.raises(ValueError, match=f"--output {output} exists"):
            average.average(run, last=2)
    finally:
        shutil.rmtree(output)


@pytest.mark.parametrize("last, chosen, message", [
    (4, None, r"--last=4: \S+ holds 3 checkpoints \(steps \[20, 40, 60\]\); keep more"),
    (None, [20, 50], r"--steps: no checkpoint step 50 in \S+ \(steps \[20, 40, 60\]\)"),
    (None, [20, 20], r"--steps=20,20 names a step twice"),
    (2, [20], r"give exactly one of --last=N and --steps=a,b,c"),
])
def test_choose_steps_refuses_in_one_line(last, chosen, message):
    with pytest.raises(ValueError, match=message):
        average.choose_steps([20, 40, 60], last, chosen, "w/checkpoints")


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(run, tmp_path):
    """A step of another vocabulary among the run's: the command stops with one line, status 1."""
    workdir = str(tmp_path / "w")
    shutil.copytree(run, workdir)
    config = configuration.load(workdir)
    other = steps.init_state(make_model(config.model, VOCAB + 5, VOCAB + 5), config.optimizer, 60, 0)
    store = checkpoints.Checkpoints(workdir, keep=5)
    store.save(80, other, dict(step=80, param_shapes=checkpoints.param_shapes(other.params)))
    store.close()
    result = subprocess.run([sys.executable, "-m", "s2s_jax.average", f"--workdir={workdir}", "--last=2"],
                            cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"average: checkpoint {os.path.join(workdir, 'checkpoints', '80')} was made with another model "
        "shape or vocabulary: "), result.stderr
    assert not [name for name in os.listdir(tmp_path) if name != "w"]
