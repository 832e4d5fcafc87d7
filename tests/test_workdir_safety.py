"""The workdir contract: readers change nothing, checkpoints that do not load are never silently
replaced by a fresh run, and a checkpoint is bound to the tokenizers it was trained with."""
import os
import shutil

import jax
import pytest

from s2s_jax import checkpoints, steps
from tests.test_checkpoints import make_state, meta
from tests.test_reliability import _tree

TARGET = jax.eval_shape(lambda: make_state(0))


def _planted_copy(tiny_workdir, tmp_path) -> str:
    """A copy of the tiny workdir with a save in progress (orbax's temporary folder) planted in it."""
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_workdir, workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", "400.orbax-checkpoint-tmp-1234", "state"))
    return workdir


def test_translator_and_reader_store_change_nothing(tiny_workdir, tmp_path):
    from s2s_jax import translate
    workdir = _planted_copy(tiny_workdir, tmp_path)
    before = _tree(workdir)
    translate.Translator.from_workdir(workdir)
    store = checkpoints.Checkpoints.reader(workdir)
    try:
        store.restore_best_or_latest(jax.eval_shape(lambda: _tiny_state(workdir)))
        with pytest.raises(checkpoints.CheckpointError, match="read-only"):
            store.prune()
    finally:
        store.close()
    assert _tree(workdir) == before


def _tiny_state(workdir):
    from s2s_jax import configuration
    from s2s_jax.models import make_model
    config = configuration.load(workdir)
    vocab = config.data.synthetic_vocab_size
    return steps.init_state(config, make_model(config.model, vocab, vocab))


def test_reader_of_an_empty_workdir_creates_nothing(tmp_path):
    store = checkpoints.Checkpoints.reader(str(tmp_path))
    store.close()
    assert os.listdir(tmp_path) == []


def _truncate_state_files(workdir, step):
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _saved(tmp_path, steps=(1, 2), tokenizers=None) -> str:
    workdir = str(tmp_path)
    store = checkpoints.Checkpoints(workdir, keep=len(steps), tokenizers=tokenizers)
    for step in steps:
        store.save(step, make_state(step), meta(make_state(step)))
    store.close()
    return workdir


def test_no_loadable_checkpoint_is_an_error_naming_each_step(tmp_path):
    workdir = _saved(tmp_path)
    for step in (1, 2):
        _truncate_state_files(workdir, step)
    before = _tree(workdir)
    store = checkpoints.Checkpoints(workdir, keep=2)
    try:
        with pytest.raises(checkpoints.CheckpointError) as info:
            store.restore_latest(TARGET)
    finally:
        store.close()
    message, directory = str(info.value), os.path.join(workdir, "checkpoints")
    assert "\n" not in message and "step 1: " in message and "step 2: " in message, message
    assert f"move {directory} aside or use a new --workdir" in message, message
    assert _tree(workdir) == before


def test_an_io_error_is_not_an_unreadable_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    workdir = _saved(tmp_path)

    def denied(self, step, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(str(self.directory), str(step)))

    store = checkpoints.Checkpoints(workdir, keep=2)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
    try:
        with pytest.raises(checkpoints.CheckpointError, match=r"cannot read checkpoint .*2: PermissionError"):
            store.restore_latest(TARGET)
    finally:
        monkeypatch.undo()
        store.close()


def test_the_warning_for_an_unreadable_step_is_short(tmp_path, caplog):
    workdir = _saved(tmp_path)
    _truncate_state_files(workdir, 2)
    store = checkpoints.Checkpoints(workdir, keep=2)
    try:
        state, _ = store.restore_latest(TARGET)
    finally:
        store.close()
    assert int(state.step) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and len(warnings[0]) < 400, warnings


def test_checkpoint_of_other_tokenizers_is_refused(tmp_path):
    workdir = _saved(tmp_path, tokenizers="a" * 64)
    for store in (checkpoints.Checkpoints(workdir, keep=2, tokenizers="b" * 64),
                  checkpoints.Checkpoints.reader(workdir, tokenizers="b" * 64)):
        try:
            with pytest.raises(checkpoints.CheckpointError, match="trained with other tokenizers"):
                store.restore_latest(TARGET)
        finally:
            store.close()


def test_checkpoint_without_a_tokenizer_fingerprint_is_accepted(tmp_path):
    workdir = _saved(tmp_path)
    store = checkpoints.Checkpoints.reader(workdir, tokenizers="b" * 64)
    try:
        state, saved = store.restore_latest(TARGET)
    finally:
        store.close()
    assert int(state.step) == 2 and "tokenizers" not in saved
