"""Batches by tokens (data.max_tokens): rows per bucket, the epoch plan as a function of (seed,
batch number), per-process reading, the config checks and the resume rules. Fast: no training
(exact resume and two processes with token batches: tests/test_multiprocess.py)."""
import re

import numpy as np
import pytest

from configs import tiny
from s2s_jax import configuration, data
from s2s_jax.configuration import ConfigError
from tests.test_data import assert_batch_consistent, random_pairs

BOUNDARIES = [12, 24, 48]
MAX_TOKENS = 500  # rows 41, 20, 10; rounded to a multiple of 2 devices: 40, 20, 10


@pytest.mark.parametrize("max_tokens, multiple, rows", [
    (0, 4, [32, 32, 32, 32, 32]),  # off: data.batch_size everywhere
    (2000, 1, [125, 83, 62, 41, 30]),
    (2000, 4, [124, 80, 60, 40, 28]),
    (2000, 3, [123, 81, 60, 39, 30]),
])
def test_rows_per_bucket(max_tokens, multiple, rows):
    got = data.rows_per_bucket([16, 24, 32, 48, 65], batch_size=32, max_tokens=max_tokens, row_multiple=multiple)
    assert got == rows
    if max_tokens:
        assert all(r * length <= max_tokens and r % multiple == 0 for r, length in zip(got, [16, 24, 32, 48, 65]))


def test_a_bucket_without_rows_is_one_line_naming_the_key():
    with pytest.raises(ValueError) as info:
        data.rows_per_bucket([8, 16], batch_size=32, max_tokens=100, row_multiple=8)
    assert str(info.value) == ("data.max_tokens=100 leaves bucket 16 no rows: its rows are a multiple of the "
                               "8 devices, so it needs at least 16 x 8 = 128 tokens")


def _plan(seed=3, max_tokens=MAX_TOKENS, row_multiple=2):
    src, tgt = random_pairs(n=2000)
    return src, tgt, data.TrainBatches(src, tgt, batch_size=16, boundaries=BOUNDARIES, seed=seed,
                                       max_tokens=max_tokens, row_multiple=row_multiple)


def test_each_bucket_has_its_rows_and_an_epoch_uses_each_pair_at_most_once():
    src, tgt, batches = _plan()
    assert batches.bucket_rows == [40, 20, 10]
    assert batches.shapes == [(40, 12), (20, 24), (10, 48)]
    lengths = [data.pair_length(s, t) for s, t in zip(src, tgt)]
    members = [sum(1 for n in lengths if low < n <= high) for low, high in zip([0, *BOUNDARIES], BOUNDARIES)]
    assert batches.batches_per_epoch == sum(m // r for m, r in zip(members, [40, 20, 10]))
    for epoch in range(2):
        numbers = range(epoch * batches.batches_per_epoch, (epoch + 1) * batches.batches_per_epoch)
        epoch_batches = [batches.batch(n) for n in numbers]
        used = np.concatenate([b.index for b in epoch_batches])
        assert len(set(used.tolist())) == len(used) and (used >= 0).all()
        for number, batch in zip(numbers, epoch_batches):
            rows, length = batch.src.shape
            assert (rows, length) in batches.shapes and batches.size(number) == rows
            assert rows * length <= MAX_TOKENS
            bucket = BOUNDARIES.index(length)
            low = BOUNDARIES[bucket - 1] if bucket else 0
            assert all(low < lengths[i] <= length for i in batch.index)  # the pair's own bucket
            assert_batch_consistent(batch, src, tgt)
        per_bucket = [sum(b.src.shape[0] for b in epoch_batches if b.src.shape[1] == L) for L in BOUNDARIES]
        assert all(m - r < used_rows <= m for m, r, used_rows in zip(members, [40, 20, 10], per_bucket))


def test_the_plan_is_a_function_of_seed_and_batch_number():
    """A fresh plan (a resumed run) gives the same batch at any number; another seed another one;
    two processes reading their halves of the rows read the whole batch."""
    _, _, batches = _plan()
    _, _, fresh = _plan()
    count = batches.batches_per_epoch
    from_zero = [batches.batch(n) for n in range(2 * count + 3)]
    for number in (2 * count + 2, 0, count - 1, count, 7):
        for got, want in zip(fresh.batch(number), from_zero[number]):
            np.testing.assert_array_equal(got, want)
    assert [b.index.tolist() for b in from_zero[:count]] != [b.index.tolist() for b in from_zero[count:2 * count]]
    _, _, other = _plan(seed=4)
    assert [other.batch(n).index.tolist() for n in range(5)] != [b.index.tolist() for b in from_zero[:5]]
    for number in range(6):
        size = batches.size(number)
        halves = [batches.batch(number, rows) for rows in np.split(np.arange(size), 2)]  # process 0, 1
        for whole, *parts in zip(from_zero[number], *halves):
            np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_off_plans_batch_size_sentences_as_before():
    src, tgt = random_pairs(n=2000)
    plain = data.TrainBatches(src, tgt, batch_size=16, boundaries=BOUNDARIES, seed=3)
    assert plain.bucket_rows == [16, 16, 16] and {rows for rows, _ in plain.shapes} == {16}


def test_max_tokens_below_the_largest_bucket_is_refused_naming_it():
    config = tiny.get_config()  # buckets (8, 12)
    config.data.max_tokens = 11
    with pytest.raises(ConfigError) as info:
        configuration.check(config)
    assert str(info.value) == ("config: data.max_tokens=11 must be 0 (off: data.batch_size sentences) or at least "
                               "the largest bucket boundary 12 (each batch of a bucket holds max_tokens // "
                               "boundary rows)")
    config.data.max_tokens = 12
    configuration.check(config)


def test_on_resume_max_tokens_is_refused_and_batch_size_is_unused(tmp_path):
    config = tiny.get_config()
    config.data.max_tokens = 256
    configuration.save(config, str(tmp_path))
    config.data.batch_size = 8  # not read while max_tokens is on
    assert configuration.check_workdir(config, str(tmp_path)) == []
    config.data.max_tokens = 512
    with pytest.raises(ConfigError, match=re.escape("(data.max_tokens: 256 → 512)")):
        configuration.check_workdir(config, str(tmp_path))
