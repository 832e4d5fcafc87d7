"""Tests for s2s_jax.tokenized: the on-disk training split is checked, never trusted blindly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s2s_jax import data, tokenized
from tests.test_data import as_lists, small_corpus

REPO = Path(__file__).resolve().parents[1]


def test_ragged_ids_index_like_a_list():
    ids = tokenized.RaggedIds(np.arange(6), np.array([0, 1, 3, 6]), np.array([1, 2, 3]))
    assert [ids[i].tolist() for i in (-1, -3, 2)] == [[3, 4, 5], [0], [3, 4, 5]]
    assert [seq.tolist() for seq in ids] == [[0], [1, 2], [3, 4, 5]]
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"index {bad} out of range for 3 sequences"):
            ids[bad]


def prepared(tmp_path: Path, **overrides):
    """(config, workdir) of a workdir whose corpus and tokenizers are saved."""
    cfg, workdir = small_corpus(tmp_path, max_len=30, **overrides), tmp_path / "w"
    data.save_tokenizers(data.load_corpus(cfg, str(workdir)), str(workdir))
    return cfg, workdir


def damage(path: Path, how: str) -> None:
    content = path.read_bytes()
    changes = {"odd size": content[:-1], "empty": b"", "half": content[:len(content) // 2],
               "longer": content + b"\0" * 8, "same size": bytes([content[0] ^ 1]) + content[1:]}
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(changes[how])


@pytest.mark.parametrize("name, how, expected", [
    ("train.src.ids", "odd size", r"[\d,]+ bytes, but meta\.json records [\d,]+ \(the file was changed\)"),
    ("train.tgt.lengths", "empty", r"0 bytes, but meta\.json records [\d,]+"),
    ("train.src.offsets", "half", r"156 bytes, but meta\.json records 312"),
    ("train.tgt.ids", "longer", r"[\d,]+ bytes, but meta\.json records [\d,]+"),
    ("train.src.ids", "same size", r"its content differs from the crc32 in meta\.json \(the file was changed\)"),
    ("train.tgt.offsets", "missing", r"missing"),
])
def test_a_corpus_file_that_differs_from_meta_is_one_line_naming_it(tmp_path, name, how, expected):
    cfg, workdir = prepared(tmp_path)
    folder = workdir / "corpus"
    damage(folder / name, how)
    with pytest.raises(data.DataError, match=rf"^{folder / name}: {expected}.*; delete {folder} to prepare it again$"):
        data.load_corpus(cfg, str(workdir))
    if how != "same size":  # processes 1..n check sizes only (they read just their rows)
        with pytest.raises(data.DataError, match=rf"^{folder / name}: "):
            data.load_corpus(cfg, str(workdir), writes=False)


class Killed(Exception):
    """Stands for a kill: nothing after the raise runs."""


def interrupted_preparation(tmp_path: Path, monkeypatch):
    """(config, workdir) of a preparation killed in its third chunk of 70 pairs."""
    cfg, workdir = small_corpus(tmp_path, max_len=30), tmp_path / "w"
    monkeypatch.setattr(tokenized, "CHUNK_PAIRS", 70)
    calls, real_encode = [], data.Tokenizer.encode

    def encode_then_die(self, lines):
        calls.append(len(lines))
        if len(calls) == 5:
            raise Killed
        return real_encode(self, lines)

    monkeypatch.setattr(data.Tokenizer, "encode", encode_then_die)
    with pytest.raises(Killed):
        data.load_corpus(cfg, str(workdir))
    monkeypatch.setattr(data.Tokenizer, "encode", real_encode)
    return cfg, workdir


@pytest.mark.parametrize("how, expected", [
    ("half", r"[\d,]+ bytes, but progress\.json records [\d,]+ \(the file was changed\)"),
    ("same size", r"its content differs from the crc32 in progress\.json"),
    ("missing", "missing"),
])
def test_a_resumed_preparation_refuses_a_file_that_changed(tmp_path, monkeypatch, how, expected):
    """Before: a shrunk ids file was zero-filled and trained on."""
    cfg, workdir = interrupted_preparation(tmp_path, monkeypatch)
    folder = workdir / "corpus"
    damage(folder / "train.src.ids", how)
    with pytest.raises(data.DataError, match=rf"^{folder}/train.src.ids: {expected}.*; delete {folder} to prepare"):
        data.load_corpus(cfg, str(workdir))
    assert not (folder / "meta.json").exists()


def test_a_resumed_preparation_drops_what_a_kill_left_after_the_record(tmp_path, monkeypatch):
    cfg, workdir = interrupted_preparation(tmp_path, monkeypatch)
    ids = workdir / "corpus" / "train.tgt.ids"
    ids.write_bytes(ids.read_bytes() + b"\1" * 6)  # written by the killed chunk, not recorded
    resumed = data.load_corpus(cfg, str(workdir))
    whole = data.load_corpus(cfg, str(tmp_path / "whole"))
    assert as_lists(resumed.train_tgt) == as_lists(whole.train_tgt)


def test_a_training_file_changed_while_preparing_is_refused(tmp_path, monkeypatch):
    """Before: the split mixed the text read before and after the change."""
    cfg, workdir = small_corpus(tmp_path, max_len=30), tmp_path / "w"
    monkeypatch.setattr(tokenized, "CHUNK_PAIRS", 70)
    real_encode = data.Tokenizer.encode

    def encode_while_rewriting(self, lines):
        os.utime(tmp_path / "train.en", ns=(0, 10**9))  # as `cp` of other text over it would
        return real_encode(self, lines)

    monkeypatch.setattr(data.Tokenizer, "encode", encode_while_rewriting)
    with pytest.raises(data.DataError) as error:
        data.load_corpus(cfg, str(workdir))
    folder = workdir / "corpus"
    assert str(error.value) == (f"{tmp_path}/train.en: changed while {folder} was being prepared from it (its size "
                                "or modification time differs from when it was read); delete "
                                f"{folder} and rerun once it no longer changes")
    assert not (folder / "meta.json").exists()


def test_a_signal_stops_the_preparation_between_chunks(tmp_path, monkeypatch):
    """SIGTERM while tokenizing: Interrupted (status 143) after the chunk, the previous handler
    back in place; a rerun resumes."""
    cfg, workdir = small_corpus(tmp_path, max_len=30), tmp_path / "w"
    monkeypatch.setattr(tokenized, "CHUNK_PAIRS", 70)
    real_encode, calls = data.Tokenizer.encode, []

    def encode_signalled(self, lines):
        calls.append(len(lines))
        if len(calls) == 3:  # the second chunk's source side
            os.kill(os.getpid(), signal.SIGTERM)
        return real_encode(self, lines)

    monkeypatch.setattr(data.Tokenizer, "encode", encode_signalled)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(tokenized.Interrupted) as stop:
        data.load_corpus(cfg, str(workdir))
    assert stop.value.code == 143 and signal.getsignal(signal.SIGTERM) is previous
    assert stop.value.message == (f"SIGTERM: stopped preparing {workdir}/corpus after 140 pairs; "
                                  "rerun the same command to resume the preparation")
    assert json.loads((workdir / "corpus" / "progress.json").read_text())["position"]["kept"] == 140


def test_ctrl_c_stops_train_py_while_preparing_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A real `python train.py` (chunks of 40 pairs): SIGINT once the first chunk is written ends
    it with status 130 and one line; the rerun resumes and yields the uninterrupted split."""
    from configs import demo
    small_corpus(tmp_path)
    cfg, workdir = demo.get_config().data, tmp_path / "w"
    cfg.update(train_prefix=str(tmp_path / "train"), dev_prefix=str(tmp_path / "dev"), vocab_size=200)
    args = [f"--config={REPO}/configs/demo.py", f"--workdir={workdir}", "--compilation_cache=off",
            *(f"--config.data.{key}={cfg[key]}" for key in ("train_prefix", "dev_prefix", "vocab_size"))]
    # The child waits for the signal after its first progress line: the point it stops at is fixed.
    # It polls the preparation's own record of the signal (signal.pause() after the print would
    # wait forever when the signal lands between the two).
    child = ("import logging, runpy, signal, sys, time\n"
             "from s2s_jax import tokenized\n"
             "tokenized.CHUNK_PAIRS = 40\n"
             "class Pause(logging.Handler):\n"
             "    def emit(self, record):\n"
             "        if record.getMessage().startswith('corpus: tokenized 40 pairs'):\n"
             "            signals = signal.getsignal(signal.SIGINT).__self__\n"
             "            print('waiting', flush=True)\n"
             "            while not signals.received:\n"
             "                time.sleep(0.01)\n"
             "tokenized.logger.addHandler(Pause())\n"
             "sys.argv = ['train.py', *sys.argv[1:]]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    with subprocess.Popen([sys.executable, "-c", child, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as run:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line == "waiting\n":
                run.send_signal(signal.SIGINT)
        assert run.wait() == 130, "".join(lines)
    output = [line for line in lines if "corpus:" not in line and line != "waiting\n"]
    assert len(output) == 1 and output[0].endswith(f"SIGINT: stopped preparing {workdir}/corpus after 40 pairs; "
                                                   "rerun the same command to resume the preparation\n"), lines
    monkeypatch.setattr(tokenized, "CHUNK_PAIRS", 40)
    encoded, real_encode = [], data.Tokenizer.encode

    def counted_encode(self, lines):
        encoded.append(len(lines))
        return real_encode(self, lines)

    monkeypatch.setattr(data.Tokenizer, "encode", counted_encode)
    resumed = data.load_corpus(cfg, str(workdir))
    assert encoded == [40] * 12 + [20] * 4  # the 260 pairs after the first chunk (each side), then dev
    monkeypatch.undo()
    whole = data.load_corpus(cfg, str(tmp_path / "whole"))
    for name in tokenized.FILES:  # chunks of 10,000 pairs: the same bytes
        assert (workdir / "corpus" / name).read_bytes() == (tmp_path / "whole" / "corpus" / name).read_bytes()
    assert resumed.stats == whole.stats
