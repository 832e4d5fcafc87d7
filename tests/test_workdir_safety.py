"""The workdir contract: readers change nothing, checkpoints that do not load are never silently
replaced by a fresh run, and a checkpoint is bound to the tokenizers it was trained with."""
import logging
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
    return steps.init_state(make_model(config.model, vocab, vocab), config.optimizer, config.num_train_steps, config.seed)


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


# ----------------------------------------------------------------------------- training runs
def _tiny_copy(tiny_workdir, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_workdir, workdir)
    return workdir


def test_training_refuses_checkpoints_none_of_which_loads(tiny_workdir, tmp_path, tiny_config):
    """Never a silent restart from step 0: one error naming each step; the workdir unchanged."""
    from s2s_jax import training
    workdir = _tiny_copy(tiny_workdir, tmp_path)
    saved = _checkpoint_steps(workdir)
    for step in saved:
        _truncate_state_files(workdir, step)
    before = _tree(workdir)
    tiny_config.num_train_steps += 100
    with pytest.raises(checkpoints.CheckpointError) as info:
        training.train_and_evaluate(tiny_config, workdir)
    message = str(info.value)
    assert all(f"step {step}: " in message for step in saved) and "\n" not in message, message
    assert _tree(workdir) == before


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def test_final_line_names_the_checkpoint_step_after_num_train_steps_is_lowered(tiny_workdir, tmp_path,
                                                                                 tiny_config, capsys):
    """A run past the new end (no summary of that step): the summary and final line name the
    restored step, not num_train_steps."""
    from s2s_jax import training
    workdir = _tiny_copy(tiny_workdir, tmp_path)
    last = _checkpoint_steps(workdir)[-1]
    os.remove(os.path.join(workdir, "summary.json"))
    tiny_config.num_train_steps = last - 50
    summary = training.train_and_evaluate(tiny_config, workdir)
    assert summary["steps"] == last
    assert f"final | step {last} |" in capsys.readouterr().out


def test_diverging_loss_stops_the_run(tmp_path, tiny_config):
    from s2s_jax import training
    tiny_config.optimizer.update(learning_rate=10.0, warmup_steps=0)
    tiny_config.on_nonfinite = "skip"
    workdir = str(tmp_path / "w")
    with pytest.raises(training.DivergedError) as info:
        training.train_and_evaluate(tiny_config, workdir)
    message = str(info.value)
    assert "diverging loss at step " in message and "last good checkpoint: " in message, message
    assert "\n" not in message


def _files_run(tmp_path):
    """A files config (4 pairs, batch 4) and its workdir's path."""
    from tests.test_reliability import _files_config, _write_corpus
    _write_corpus(tmp_path)
    config = _files_config(tmp_path)
    config.data.batch_size = 4
    return config, str(tmp_path / "w")


def test_a_refused_files_run_leaves_no_corpus_behind(tmp_path):
    """A checkpoint of another model shape is refused after the corpus was prepared: the run
    removes the corpus folder it created (the workdir is as before)."""
    from tests.test_reliability import _expect_error
    config, workdir = _files_run(tmp_path)
    _saved(workdir, steps=(1,))
    _expect_error(checkpoints.CheckpointError, config, workdir, "another model shape")


def test_new_tokenizers_do_not_resume_an_old_checkpoint(tmp_path):
    """A checkpoint of this model's shapes, trained with other tokenizers (as after deleting
    W/tokenizers when the data changed), is refused, and the workdir is left as it was."""
    from s2s_jax.models import make_model
    from tests.test_reliability import _expect_error
    config, workdir = _files_run(tmp_path)
    vocab = config.data.vocab_size
    state = steps.init_state(make_model(config.model, vocab, vocab), config.optimizer, config.num_train_steps, config.seed)
    store = checkpoints.Checkpoints(workdir, keep=1, tokenizers="0" * 64)
    store.save(2, state, dict(window={}, param_shapes=checkpoints.param_shapes(state.params)))
    store.close()
    _expect_error(checkpoints.CheckpointError, config, workdir, "was trained with other tokenizers")


def test_a_reader_whose_step_the_run_prunes_meanwhile_loads_the_new_one(tmp_path, caplog):
    """The race of translating while a run trains (keep 1): the reader lists step 1, the run saves
    step 2 and prunes step 1 before the reader restores it. The reader lists again and loads
    step 2, without warnings; before, it failed with 'no checkpoint loads'."""
    writer = checkpoints.Checkpoints(str(tmp_path), keep=1)
    writer.save(1, make_state(1), meta(make_state(1)))
    reader = checkpoints.Checkpoints.reader(str(tmp_path))
    assert reader.steps() == [1]
    restore = reader._restore

    def run_saves_first(step, target):  # the run saves and prunes between listing and reading
        if step == 1:
            writer.save(2, make_state(2), meta(make_state(2)))
        return restore(step, target)

    reader._restore = run_saves_first
    try:
        with caplog.at_level(logging.WARNING):
            state, saved = reader.restore_best_or_latest(TARGET)
    finally:
        reader.close()
        writer.close()
    assert saved["step"] == 2 and int(state.step) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
