"""Tests for s2s_jax.checkpoints: which steps the store keeps, which one inference loads, exact
restore, and unreadable steps. A tiny flax TrainState (Adam) stands in for the model's."""
import json
import logging
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from s2s_jax import checkpoints

KEEP = 2


def make_state(step: int) -> train_state.TrainState:
    """A train state whose every float leaf depends on `step`, with nonzero Adam moments."""
    params = {"dense": {"kernel": jnp.full((3, 2), 0.5, jnp.float32), "bias": jnp.zeros((2,), jnp.float32)},
              "scale": jnp.asarray([1.0, -0.0, 1e-40], jnp.float32)}  # -0.0 and a denormal
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.1))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25 * step + 0.125), params)
    return state.apply_gradients(grads=grads).replace(step=jnp.asarray(step, jnp.int32))


def meta(state) -> dict:
    return dict(step=int(state.step), window={}, param_shapes=checkpoints.param_shapes(state.params))


def leaves(state) -> list[tuple[str, str, tuple, bytes]]:
    """Every leaf of the state as (path, dtype, shape, raw bytes): equal means bit-identical."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return [(jax.tree_util.keystr(path), str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes())
            for path, x in flat]


def disk_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def expected_steps(saves, keep=KEEP) -> tuple[list[int], int | None]:
    """Reference: after each save, keep the `keep` newest steps and the step with the highest dev
    BLEU (the newest of equals). Returns (kept steps, best step or None)."""
    kept, best = [], None
    for step, bleu in saves:
        kept.append((step, bleu))
        scored = [(s, b) for s, b in reversed(kept) if b is not None]
        best = max(scored, key=lambda sb: sb[1])[0] if scored else None
        kept = [(s, b) for s, b in kept if (s, b) in kept[-keep:] or s == best]
    return [s for s, _ in kept], best


def assert_loads_best_or_latest(workdir, saves):
    kept, best = expected_steps(saves)
    want = best if best is not None else kept[-1]
    store = checkpoints.Checkpoints(workdir, KEEP)
    try:
        assert store.steps() == kept
        state, restored_meta = store.restore_best_or_latest(jax.eval_shape(lambda: make_state(0)))
    finally:
        store.close()
    assert restored_meta["step"] == want
    assert leaves(state) == leaves(make_state(want))


CASES = {
    "no BLEU at all": [(1, None), (2, None), (3, None), (4, None)],
    "best survives newer steps without BLEU": [(1, None), (2, 10.0), (3, None), (4, None), (5, None)],
    "a lower BLEU does not replace the best": [(1, 30.0), (2, 20.0), (3, None), (4, None), (5, 25.0), (6, None)],
    "a higher BLEU replaces the best": [(1, 5.0), (2, 10.0), (3, 7.0), (4, None), (5, 12.0), (6, None), (7, None)],
    "equal BLEU: the newer is best": [(1, 10.0), (2, 10.0), (3, None), (4, None)],
    "the newest step is the best": [(1, None), (2, 1.0), (3, None), (4, 2.0)],
    "BLEU 0 still beats no BLEU": [(1, 0.0), (2, None), (3, None), (4, None)],
}


@pytest.mark.parametrize("saves", CASES.values(), ids=CASES.keys())
def test_keeps_the_last_steps_and_the_best(tmp_path, saves):
    workdir = str(tmp_path)
    store = checkpoints.Checkpoints(workdir, KEEP)
    try:
        for i, (step, bleu) in enumerate(saves):
            state = make_state(step)
            store.save(step, state, meta(state), dev=None if bleu is None else {"dev_bleu": bleu})
            assert store.good_step == step
            assert store.steps() == disk_steps(workdir) == expected_steps(saves[:i + 1])[0], saves[:i + 1]
    finally:
        store.close()
    assert_loads_best_or_latest(workdir, saves)  # a new store reads the ranking back from disk


@pytest.mark.parametrize("saves", CASES.values(), ids=CASES.keys())
def test_prune_deletes_what_a_killed_run_left(tmp_path, saves):
    """A run killed after a save, before deleting the older steps, leaves them all: prune (called by
    the next training run) deletes exactly those the policy would have."""
    workdir = str(tmp_path)
    everything = checkpoints.Checkpoints(workdir, keep=len(saves))  # deletes nothing: as if killed
    try:
        for step, bleu in saves:
            state = make_state(step)
            everything.save(step, state, meta(state), dev=None if bleu is None else {"dev_bleu": bleu})
    finally:
        everything.close()
    assert disk_steps(workdir) == [step for step, _ in saves]
    store = checkpoints.Checkpoints(workdir, KEEP)
    try:
        store.prune()
        assert store.steps() == disk_steps(workdir) == expected_steps(saves)[0]
    finally:
        store.close()
    assert_loads_best_or_latest(workdir, saves)


@pytest.mark.parametrize("seed", range(3))
def test_random_saves_across_reopened_stores(tmp_path, seed):
    """Steps with and without BLEU in random order; the store is closed and reopened at random
    points, as a resumed run does: the best step is remembered across runs."""
    rng = random.Random(seed)
    workdir, saves = str(tmp_path), []
    store = checkpoints.Checkpoints(workdir, KEEP)
    try:
        for step in range(1, 13):
            bleu = rng.choice([None, None, float(rng.randrange(4))])
            state = make_state(step)
            store.save(step, state, meta(state), dev=None if bleu is None else {"dev_bleu": bleu})
            saves.append((step, bleu))
            assert disk_steps(workdir) == expected_steps(saves)[0], saves
            if rng.random() < 0.3:
                store.close()
                assert_loads_best_or_latest(workdir, saves)
                store = checkpoints.Checkpoints(workdir, KEEP)
    finally:
        store.close()
    assert_loads_best_or_latest(workdir, saves)


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract target", "concrete target"])
def test_restore_equals_saved_bit_for_bit(tmp_path, abstract):
    saved = make_state(3)
    store = checkpoints.Checkpoints(str(tmp_path), KEEP)
    store.save(3, saved, meta(saved), dev={"dev_bleu": 1.5})
    store.close()
    target = make_state(0)  # other values, same structure
    assert leaves(target) != leaves(saved)
    store = checkpoints.Checkpoints(str(tmp_path), KEEP)
    try:
        for restore in (store.restore_latest, store.restore_best_or_latest):
            state, restored_meta = restore(jax.eval_shape(lambda: target) if abstract else target)
            assert leaves(state) == leaves(saved)
            assert {k: restored_meta[k] for k in meta(saved)} == meta(saved)
    finally:
        store.close()


def _break_checksum(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record["checksums"]["params/scale"] ^= 1
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def test_unreadable_best_step_falls_back_to_the_latest(tmp_path, caplog):
    workdir = str(tmp_path)
    store = checkpoints.Checkpoints(workdir, KEEP)
    for step, bleu in ((1, 9.0), (2, None), (3, None)):
        store.save(step, make_state(step), meta(make_state(step)), dev=None if bleu is None else {"dev_bleu": bleu})
    store.close()
    _break_checksum(workdir, 1)
    store = checkpoints.Checkpoints(workdir, KEEP)
    with caplog.at_level(logging.WARNING, logger="s2s_jax.checkpoints"):
        state, _ = store.restore_best_or_latest(jax.eval_shape(lambda: make_state(0)))
    store.close()
    assert int(state.step) == 3
    assert f"skipping unreadable checkpoint {os.path.join(workdir, 'checkpoints', '1')}" in caplog.text


def test_unreadable_latest_step_is_moved_aside_when_reached_again(tmp_path, caplog):
    workdir = str(tmp_path)
    store = checkpoints.Checkpoints(workdir, KEEP)
    for step in (1, 2):
        store.save(step, make_state(step), meta(make_state(step)), dev={"dev_bleu": float(step)})
    store.close()
    _break_checksum(workdir, 2)
    store = checkpoints.Checkpoints(workdir, KEEP)
    try:
        with caplog.at_level(logging.WARNING, logger="s2s_jax.checkpoints"):
            state, _ = store.restore_latest(jax.eval_shape(lambda: make_state(0)))
        assert int(state.step) == 1 and store.good_step == 1
        assert "checksum mismatch in params/scale" in caplog.text
        store.save(2, make_state(2), meta(make_state(2)), dev={"dev_bleu": 2.0})  # training reached step 2 again
    finally:
        store.close()
    aside = os.path.join(workdir, "checkpoints", "2.unreadable-0")
    assert os.path.isdir(aside) and "moved unreadable checkpoint" in caplog.text
    assert disk_steps(workdir) == [1, 2]
    assert_loads_best_or_latest(workdir, [(1, 1.0), (2, 2.0)])
