"""Tests for s2s_jax.data."""

import hashlib
import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from s2s_jax import BOS_ID, EOS_ID, PAD_ID, UNK_ID, data, files, sources, tokenized

REPO = Path(__file__).resolve().parents[1]
BIBLE = REPO / "data" / "bible-es-en"


def write(path: Path, content: bytes | str) -> str:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


@pytest.fixture(scope="module")
def bible_lines():
    return data.read_lines(str(BIBLE / "train.es"))[:2000], data.read_lines(str(BIBLE / "train.en"))[:2000]


@pytest.fixture(scope="module")
def es_tokenizer(bible_lines):
    return data.Tokenizer.train(bible_lines[0], vocab_size=500)


# --------------------------------------------------------------------------- reading


def test_read_lines_strips_endings_and_keeps_unicode_separators(tmp_path):
    path = write(tmp_path / "a.es", "uno\r\ndos\u2028tres\n\ncuatro")
    assert data.read_lines(path) == ["uno", "dos\u2028tres", "", "cuatro"]


def test_read_lines_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "name.es", b"hola\nmundo\nma\xf1ana\n")
    with pytest.raises(data.DataError, match=r"name\.es:3: invalid UTF-8 \(byte 0xf1 at column 3\)"):
        data.read_lines(path)


def test_cr_only_line_endings_are_one_line_naming_file_and_line(tmp_path):
    """Before: one long line, then `sentencepiece cannot train ()`."""
    path = write(tmp_path / "mac.es", "uno\r\ndos\rtres\rcuatro\r")
    with pytest.raises(data.DataError) as e:
        data.read_lines(path)
    assert str(e.value) == (f"{path}:2: carriage return (\\r) inside the line, at byte 4: lines must end with \\n "
                            "(CR-only line endings? convert them, e.g. with tr '\\r' '\\n')")
    cfg = small_corpus(tmp_path)
    write(tmp_path / "train.en", (tmp_path / "train.en").read_text().replace("\n", "\r"))
    with pytest.raises(data.DataError, match=rf"^{tmp_path}/train.en:1: carriage return"):
        data.load_corpus(cfg, str(tmp_path / "w"))


def test_read_lines_missing_file(tmp_path):
    missing = str(tmp_path / "missing.en")
    with pytest.raises(data.DataError) as e:
        data.read_lines(missing)
    assert str(e.value).startswith(f"{missing}: ")


def test_read_parallel_line_count_mismatch(tmp_path):
    src = write(tmp_path / "x.es", "a\nb\nc\n")
    tgt = write(tmp_path / "x.en", "a\nb\n")
    with pytest.raises(data.DataError) as e:
        data.read_parallel(src, tgt)
    msg = str(e.value)
    assert msg.startswith(f"{src}: ") and tgt in msg and "3" in msg and "2" in msg


def test_read_parallel_empty_lines(tmp_path):
    src = write(tmp_path / "x.es", "a\n \nc\nd\n")
    tgt = write(tmp_path / "x.en", "A\nB\nC\n\t\n")
    assert data.read_parallel(src, tgt) == (["a", "c"], ["A", "C"], 2)
    with pytest.raises(data.DataError, match=r"x\.es:2: empty line"):
        data.read_parallel(src, tgt, on_empty="error")
    with pytest.raises(ValueError, match="on_empty"):
        data.read_parallel(src, tgt, on_empty="ignore")


# --------------------------------------------------------------------------- tokenizers


def test_tokenizer_special_ids(es_tokenizer):
    sp = es_tokenizer.sp
    for piece, i in [("<pad>", PAD_ID), ("<s>", BOS_ID), ("</s>", EOS_ID), ("<unk>", UNK_ID)]:
        assert sp.id_to_piece(i) == piece and sp.piece_to_id(piece) == i
    assert 400 <= es_tokenizer.vocab_size <= 500


def test_tokenizer_round_trip(es_tokenizer, bible_lines):
    lines = bible_lines[0][:100]
    ids = es_tokenizer.encode(lines)
    assert all(ids_row and min(ids_row) > UNK_ID for ids_row in ids)
    assert es_tokenizer.decode(ids) == lines
    # Decoding stops at EOS and ignores PAD/BOS.
    row = [BOS_ID, *ids[0], EOS_ID, *ids[1], PAD_ID]
    assert es_tokenizer.decode(np.array([row + [PAD_ID]])) == [lines[0]]


def test_tokenizer_training_is_deterministic(es_tokenizer, bible_lines):
    assert data.Tokenizer.train(bible_lines[0], vocab_size=500).model_proto() == es_tokenizer.model_proto()


def test_tokenizer_small_corpus_caps_vocab_and_load(tmp_path):
    tok = data.Tokenizer.train(["hola mundo", "adios mundo"], vocab_size=8000)
    assert tok.vocab_size < 100
    path = write(tmp_path / "t.model", tok.model_proto())
    assert data.Tokenizer.load(path).vocab_size == tok.vocab_size
    with pytest.raises(data.DataError, match="nope.model"):
        data.Tokenizer.load(str(tmp_path / "nope.model"))
    with pytest.raises(data.DataError, match=r"bad\.model: cannot load sentencepiece model"):
        data.Tokenizer.load(write(tmp_path / "bad.model", b"not a model"))


def test_tokenizer_vocab_below_characters_is_one_line():
    with pytest.raises(ValueError, match=r"^vocabulary too small: this text needs at least 13 pieces"):
        data.Tokenizer.train(["hola mundo"], vocab_size=5)  # 8 letters, the word boundary, 4 specials


def test_id_tokenizer():
    tok = data.IdTokenizer(20)
    assert tok.encode(["4 5 19", ""]) == [[4, 5, 19], []]
    assert tok.decode([[BOS_ID, 4, 5, EOS_ID, 7], [9, PAD_ID, PAD_ID]]) == ["4 5", "9"]
    with pytest.raises(ValueError):
        tok.encode(["4 20"])


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_synthetic_tasks(name):
    src, tgt = data.synthetic_task(name, 200, vocab_size=30, min_len=2, max_len=9, seed=3)
    assert len(src) == len(tgt) == 200
    assert (src, tgt) == data.synthetic_task(name, 200, vocab_size=30, min_len=2, max_len=9, seed=3)
    assert {len(s) for s in src} == set(range(2, 10))
    assert min(map(min, src)) >= 4 and max(map(max, src)) < 30
    expected = {"copy": list, "reverse": lambda s: s[::-1], "sort": sorted}[name]
    assert all(t == expected(s) for s, t in zip(src, tgt))
    assert any(t != s for s, t in zip(src, tgt)) == (name != "copy")


def test_synthetic_unknown_task():
    with pytest.raises(ValueError, match="unknown"):
        data.synthetic_task("add", 10, 30, 1, 5, 0)


# --------------------------------------------------------------------------- batching


def random_pairs(n=500, max_len=40, seed=0):
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, size=rng.integers(1, max_len + 1)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 50, size=rng.integers(1, max_len + 1)).tolist() for _ in range(n)]
    return src, tgt


def assert_batch_consistent(batch, src_ids, tgt_ids):
    assert all(a.dtype == np.int32 for a in batch)
    for row, i in enumerate(batch.index):
        n = batch.src_len[row]
        assert batch.src[row, n - 1] == EOS_ID and (batch.src[row, n:] == PAD_ID).all()
        if i < 0:
            assert n == 1 and (batch.tgt_out[row] == PAD_ID).all()
            continue
        s, t = src_ids[i], tgt_ids[i]
        assert batch.src[row, : n - 1].tolist() == s
        m = len(t) + 1
        assert batch.tgt_in[row, 0] == BOS_ID and batch.tgt_out[row, m - 1] == EOS_ID
        assert (batch.tgt_in[row, 1:m] == batch.tgt_out[row, : m - 1]).all()
        assert batch.tgt_out[row, : m - 1].tolist() == t
        assert (batch.tgt_in[row, m:] == PAD_ID).all() and (batch.tgt_out[row, m:] == PAD_ID).all()


def test_bucket_for():
    assert [data.bucket_for(n, [8, 16, 32]) for n in (1, 8, 9, 32, 33)] == [0, 0, 1, 2, -1]


def test_padded_length():
    lengths = (1, 8, 9, 32, 33, 48, 49, 100)
    assert [data.padded_length(n, [8, 16, 32]) for n in lengths] == [8, 8, 16, 32, 48, 48, 64, 112]
    assert all(isinstance(data.padded_length(n, np.array([8, 16])), int) for n in (3, 20))


def test_make_batch_filler_rows():
    batch = data.make_batch([[5, 6]], [[7]], [0], batch_size=3, length=4)
    assert batch.src.tolist() == [[5, 6, EOS_ID, 0], [EOS_ID, 0, 0, 0], [EOS_ID, 0, 0, 0]]
    assert batch.tgt_in[0].tolist() == [BOS_ID, 7, 0, 0] and batch.tgt_out[0].tolist() == [7, EOS_ID, 0, 0]
    assert batch.src_len.tolist() == [3, 1, 1] and batch.index.tolist() == [0, -1, -1]
    with pytest.raises(ValueError):
        data.make_batch([[5, 6, 7, 8]], [[7]], [0], batch_size=1, length=4)


def test_train_batches_deterministic_shapes_and_epochs():
    src, tgt = random_pairs()
    kwargs = dict(batch_size=16, boundaries=[12, 24, 48], seed=7)
    stream = data.TrainBatches(src, tgt, **kwargs)
    n = stream.batches_per_epoch
    assert n > 0 and set(stream.shapes) <= {(16, 12), (16, 24), (16, 48)}
    first = [stream.batch(number) for number in range(2 * n)]
    again_stream = data.TrainBatches(src, tgt, **kwargs)
    again = [again_stream.batch(number) for number in range(2 * n)]
    assert all(all((x == y).all() for x, y in zip(a, b)) for a, b in zip(first, again))
    for epoch in (first[:n], first[n:]):
        indices = np.concatenate([b.index for b in epoch])
        assert (indices >= 0).all() and len(set(indices.tolist())) == len(indices)
        assert len(indices) > len(src) - 3 * 16
    assert [b.index.tolist() for b in first[:n]] != [b.index.tolist() for b in first[n:]]
    for b in first:
        assert b.src.shape in stream.shapes
        assert_batch_consistent(b, src, tgt)
    other_seed = data.TrainBatches(src, tgt, **{**kwargs, "seed": 8})
    assert other_seed.batch(0).index.tolist() != first[0].index.tolist()


def test_train_batches_resume_matches_a_run_from_zero():
    src, tgt = random_pairs()
    stream = data.TrainBatches(src, tgt, batch_size=16, boundaries=[12, 24, 48], seed=1)
    from_zero = [stream.batch(number) for number in range(3 * stream.batches_per_epoch)]
    fresh = data.TrainBatches(src, tgt, batch_size=16, boundaries=[12, 24, 48], seed=1)
    for number in (0, 5, stream.batches_per_epoch + 2, 3 * stream.batches_per_epoch - 1):
        assert (fresh.batch(number).index == from_zero[number].index).all()
    assert (fresh.batch(40).src == from_zero[40].src).all()


def test_train_batches_errors():
    src, tgt = random_pairs(n=50)
    with pytest.raises(ValueError, match="largest boundary"):
        data.TrainBatches(src, tgt, batch_size=4, boundaries=[16, 32], seed=0)
    with pytest.raises(ValueError, match="full batch"):
        data.TrainBatches(src[:3], tgt[:3], batch_size=4, boundaries=[64], seed=0)


def test_eval_batches_cover_every_pair_once():
    src, tgt = random_pairs(n=203, max_len=40)
    src.append(list(range(4, 74)))  # longer than every boundary: 71 with EOS -> extra bucket of 80
    tgt.append([5])
    batches = data.eval_batches(src, tgt, batch_size=16, boundaries=[12, 24, 32])
    indices = np.concatenate([b.index for b in batches])
    assert sorted(indices[indices >= 0].tolist()) == list(range(len(src)))
    assert {b.src.shape[1] for b in batches} == {12, 24, 32, 80}  # 33..41 and 71 share the extra bucket
    assert batches[-1].src.shape == (16, 80) and 203 in batches[-1].index
    lengths = [max(len(src[i]), len(tgt[i])) + 1 for b in batches for i in b.index if i >= 0]
    assert lengths == sorted(lengths)
    for b in batches:
        assert_batch_consistent(b, src, tgt)


def test_filter_pairs():
    src, tgt, dropped = data.filter_pairs([[4], [], [4] * 5, [4, 5]], [[4], [4], [4], [4] * 4], max_len=4)
    assert (src, tgt, dropped) == ([[4], [4, 5]], [[4], [4] * 4], 2)


# --------------------------------------------------------------------------- corpus


def data_config(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            task="files",
            train_prefix=str(BIBLE / "train"),
            dev_prefix=str(BIBLE / "dev"),
            src_lang="es",
            tgt_lang="en",
            vocab_size=500,
            spm_model_type="unigram",
            spm_sample_size=1_000_000,
            joint_vocab=False,
            max_len=64,
            on_empty="skip",
            max_train_pairs=1500,
            max_dev_pairs=50,
            synthetic_vocab_size=20,
            synthetic_min_len=1,
            synthetic_max_len=10,
            synthetic_train_size=300,
            synthetic_dev_size=40,
            synthetic_seed=5,
        )
    )
    cfg.update(overrides)
    return cfg


def test_load_corpus_synthetic(tmp_path):
    corpus = data.load_corpus(data_config(task="reverse", max_len=8), str(tmp_path))
    assert isinstance(corpus.src_tokenizer, data.IdTokenizer) and corpus.tgt_tokenizer.vocab_size == 20
    assert corpus.stats["train_pairs_read"] == 300 and corpus.stats["dev_pairs"] == 40
    assert corpus.stats["train_pairs"] + corpus.stats["train_too_long"] == 300
    assert max(map(len, corpus.train_src)) <= 8 and max(map(len, corpus.dev_src)) == 10
    assert all(t == s[::-1] for s, t in zip(corpus.train_src, corpus.train_tgt))
    assert corpus.dev_src != corpus.train_src[:40]
    assert corpus.dev_src_text == [" ".join(map(str, s)) for s in corpus.dev_src]
    assert not os.listdir(tmp_path)


def as_lists(seqs) -> list[list[int]]:
    return [[int(t) for t in seq] for seq in seqs]


def test_load_corpus_files_tokenizes_once_then_saves_and_reloads(tmp_path):
    cfg = data_config(max_len=40)
    workdir = tmp_path / "work"
    corpus = data.load_corpus(cfg, str(workdir))
    assert sorted(os.listdir(workdir)) == ["corpus"]  # the tokenized training split; no tokenizers yet
    stats = corpus.stats
    assert stats["train_pairs_read"] == 1500 and stats["dev_pairs"] == 50
    assert stats["train_pairs"] == len(corpus.train_src) == 1500 - stats["train_too_long"]
    # The memory-mapped split holds what tokenizing the files in memory gives.
    src, tgt, _ = data.read_parallel(f"{cfg.train_prefix}.es", f"{cfg.train_prefix}.en")
    expected = data.filter_pairs(corpus.src_tokenizer.encode(src[:1500]), corpus.tgt_tokenizer.encode(tgt[:1500]), 40)
    assert (as_lists(corpus.train_src), as_lists(corpus.train_tgt), stats["train_too_long"]) == expected
    assert corpus.dev_src_text[0] == data.read_lines(str(BIBLE / "dev.es"))[0]
    assert corpus.tgt_tokenizer.decode(corpus.dev_tgt[:5]) == corpus.dev_tgt_text[:5]

    data.save_tokenizers(corpus, str(workdir))
    folder = workdir / "tokenizers"
    assert sorted(os.listdir(workdir)) == ["corpus", "tokenizers"]
    assert sorted(os.listdir(folder)) == ["provenance.json", "src.model", "tgt.model"]
    for side, tok in (("src", corpus.src_tokenizer), ("tgt", corpus.tgt_tokenizer)):  # as translate loads them
        assert data.Tokenizer.load(str(folder / f"{side}.model")).model_proto() == tok.model_proto()

    written = {path: path.stat().st_mtime_ns for path in workdir.rglob("*")}
    again = data.load_corpus(cfg, str(workdir))
    data.save_tokenizers(again, str(workdir))
    assert {path: path.stat().st_mtime_ns for path in workdir.rglob("*")} == written  # all reused
    assert as_lists(again.train_src) == as_lists(corpus.train_src) and again.dev_tgt == corpus.dev_tgt


def small_corpus(folder: Path, **overrides):
    """The first 300 train and 20 dev pairs of the Bible corpus copied to folder; their data config."""
    for split, n in (("train", 300), ("dev", 20)):
        for lang in ("es", "en"):
            write(folder / f"{split}.{lang}", "\n".join(data.read_lines(str(BIBLE / f"{split}.{lang}"))[:n]) + "\n")
    return data_config(**{"train_prefix": str(folder / "train"), "dev_prefix": str(folder / "dev"),
                          "vocab_size": 200, "max_train_pairs": 0, **overrides})


def test_provenance_records_training_files_and_settings(tmp_path):
    cfg = small_corpus(tmp_path)
    data.save_tokenizers(data.load_corpus(cfg, str(tmp_path / "w")), str(tmp_path / "w"))
    record = json.loads((tmp_path / "w" / "tokenizers" / "provenance.json").read_text())
    train_es = (tmp_path / "train.es").read_bytes()
    assert record["train_src"] == {"path": str(tmp_path / "train.es"), "bytes": len(train_es),
                                   "sha256": hashlib.sha256(train_es).hexdigest()}
    assert record["train_tgt"]["path"] == str(tmp_path / "train.en")
    assert {k: record[k] for k in ("src_lang", "tgt_lang", "max_train_pairs", "vocab_size", "spm_model_type")} == {
        "src_lang": "es", "tgt_lang": "en", "max_train_pairs": 0, "vocab_size": 200, "spm_model_type": "unigram"}
    model = (tmp_path / "w" / "tokenizers" / "src.model").read_bytes()
    assert record["models"]["src.model"] == hashlib.sha256(model).hexdigest()


@pytest.mark.parametrize("change, expected", [
    ({"vocab_size": 300}, "data.vocab_size: 200 → 300"),
    ({"max_train_pairs": 100}, "data.max_train_pairs: 0 → 100"),
    ({"spm_model_type": "bpe"}, "data.spm_model_type: 'unigram' → 'bpe'"),
    ({"joint_vocab": True}, "data.joint_vocab: False → True"),
    ("train.en", "training file {folder}/train.en ("),
], ids=["vocab_size", "max_train_pairs", "spm_model_type", "joint_vocab", "train_file"])
def test_stale_tokenizers_are_refused_by_name(tmp_path, change, expected):
    cfg = small_corpus(tmp_path)
    workdir = tmp_path / "w"
    data.save_tokenizers(data.load_corpus(cfg, str(workdir)), str(workdir))
    if change == "train.en":
        lines = data.read_lines(str(tmp_path / "train.en"))
        write(tmp_path / "train.en", "\n".join(["In the beginning, a new verse.", *lines[1:]]) + "\n")
    else:
        cfg.update(change)
    with pytest.raises(data.DataError) as e:
        data.load_corpus(cfg, str(workdir))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{workdir}/tokenizers/provenance.json: ")
    assert expected.format(folder=tmp_path) in message
    assert message.endswith(f"use a new --workdir (this one's checkpoints are bound to the tokenizers in "
                            f"{workdir}/tokenizers)")
    assert message.count("→") == 1


def test_tokenizers_without_provenance_are_refused(tmp_path):
    cfg = small_corpus(tmp_path)
    workdir = tmp_path / "w"
    data.save_tokenizers(data.load_corpus(cfg, str(workdir)), str(workdir))
    folder = workdir / "tokenizers"
    model = folder / "src.model"
    model.write_bytes(data.Tokenizer.train(["hola mundo"], vocab_size=20).model_proto())
    with pytest.raises(data.DataError, match=rf"^{model}: sha256 [0-9a-f]{{12}} differs from the one in provenance"):
        data.load_corpus(cfg, str(workdir))
    (folder / "provenance.json").unlink()
    (folder / "tgt.model").unlink()  # an older version's half-written folder: src.model only
    with pytest.raises(data.DataError) as e:
        data.load_corpus(cfg, str(workdir))
    assert str(e.value) == (f"{folder}/provenance.json: missing, so nothing says what the tokenizers in {folder} "
                            "were trained from (made by an older version or an interrupted run); "
                            f"use a new --workdir (this one's checkpoints are bound to the tokenizers in {folder})")
    (folder / "provenance.json").write_text("{}")
    with pytest.raises(data.DataError, match=r"provenance\.json: not a tokenizer provenance record of format 1$"):
        data.load_corpus(cfg, str(workdir))


def test_save_tokenizers_is_atomic(tmp_path, monkeypatch):
    cfg = small_corpus(tmp_path)
    workdir = tmp_path / "w"
    corpus = data.load_corpus(cfg, str(workdir))
    written = []

    def disk_full(path, content):
        if path.endswith("provenance.json"):
            raise OSError(28, "No space left on device")
        written.append(path)

    monkeypatch.setattr(files, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space"):
        data.save_tokenizers(corpus, str(workdir))
    assert len(written) == 2 and os.listdir(workdir) == ["corpus"]  # models written, then nothing left behind
    monkeypatch.undo()
    (workdir / "tokenizers").mkdir()  # an empty folder is replaced
    data.save_tokenizers(corpus, str(workdir))
    assert sorted(os.listdir(workdir)) == ["corpus", "tokenizers"]
    assert data.load_corpus(cfg, str(workdir)).provenance == corpus.provenance


def test_vocab_size_too_small_is_one_line_naming_key_and_file(tmp_path):
    cfg = small_corpus(tmp_path, vocab_size=5)
    with pytest.raises(data.DataError) as e:
        data.load_corpus(cfg, str(tmp_path / "w"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}/train.es: data.vocab_size=5 (data.spm_model_type=unigram): "
                              "vocabulary too small: this text needs at least ")
    assert not (tmp_path / "w").exists()


def test_load_corpus_bad_file_writes_nothing(tmp_path):
    bad = tmp_path / "bad"
    write(tmp_path / "bad.es", "hola\nmundo\n")
    write(tmp_path / "bad.en", b"hello\nw\xffrld\n")
    workdir = tmp_path / "work"
    with pytest.raises(data.DataError, match=r"bad\.en:2: invalid UTF-8"):
        data.load_corpus(data_config(dev_prefix=str(bad)), str(workdir))
    assert not workdir.exists()


# --------------------------------------------------------------------------- on-disk training split


class Killed(Exception):
    """Stands for a kill: nothing after the raise runs."""


def test_interrupted_preparation_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run killed while tokenizing (here: the third chunk fails) keeps the chunks recorded before;
    the next run tokenizes only the rest and ends with the same split as an uninterrupted one."""
    cfg = small_corpus(tmp_path, max_len=30)
    monkeypatch.setattr(tokenized, "CHUNK_PAIRS", 70)
    whole = data.load_corpus(cfg, str(tmp_path / "whole"))
    encoded, die_at = [], [5]  # the source side of the third chunk
    real_encode = data.Tokenizer.encode

    def encode_then_die(self, lines):
        encoded.append(len(lines))
        if len(encoded) in die_at:
            die_at.clear()
            raise Killed
        return real_encode(self, lines)

    workdir = tmp_path / "w"
    monkeypatch.setattr(data.Tokenizer, "encode", encode_then_die)
    with pytest.raises(Killed):
        data.load_corpus(cfg, str(workdir))
    progress = json.loads((workdir / "corpus" / "progress.json").read_text())
    assert progress["position"]["kept"] == 140 and not (workdir / "corpus" / "meta.json").exists()
    encoded.clear()
    resumed = data.load_corpus(cfg, str(workdir))
    assert encoded == [70, 70, 70, 70, 20, 20, 20, 20]  # chunks 3 to 5 of 300 pairs (each side), then dev
    assert sorted(os.listdir(workdir / "corpus")) == sorted(os.listdir(tmp_path / "whole" / "corpus"))
    assert as_lists(resumed.train_src) == as_lists(whole.train_src)
    assert as_lists(resumed.train_tgt) == as_lists(whole.train_tgt)
    assert resumed.stats == whole.stats


def test_preparation_is_redone_for_other_data(tmp_path):
    cfg = small_corpus(tmp_path, max_len=30)
    first = data.load_corpus(cfg, str(tmp_path / "w"))
    shorter = data.load_corpus(small_corpus(tmp_path, max_len=20), str(tmp_path / "w"))
    assert shorter.stats["train_pairs"] < first.stats["train_pairs"]
    assert max(map(len, shorter.train_src)) <= 20


def test_sample_items_is_uniform_and_keeps_small_streams_whole():
    assert data.sample_items(iter(range(5)), 8, seed=0) == [0, 1, 2, 3, 4]
    sample = data.sample_items(iter(range(1000)), 10, seed=3)
    assert len(set(sample)) == 10 and sample == data.sample_items(iter(range(1000)), 10, seed=3)
    # Each of 4 items is the sample of one 1000 times out of 4000 (seeds 0..3999): binomial sd 27.
    counts = np.bincount([data.sample_items(iter(range(4)), 1, seed=s)[0] for s in range(4000)], minlength=4)
    assert all(abs(c - 1000) < 110 for c in counts), counts


def test_tokenizers_train_on_a_bounded_sample(tmp_path):
    full = data.load_corpus(small_corpus(tmp_path), str(tmp_path / "full"))
    cfg = small_corpus(tmp_path, spm_sample_size=100)
    sampled = data.load_corpus(cfg, str(tmp_path / "sampled"))
    assert sampled.provenance["spm_sample_size"] == 100
    assert sampled.src_tokenizer.model_proto() != full.src_tokenizer.model_proto()
    assert sampled.stats["train_pairs_read"] == full.stats["train_pairs_read"] == 300  # all tokenized
    data.save_tokenizers(sampled, str(tmp_path / "sampled"))
    with pytest.raises(data.DataError, match="data.spm_sample_size: 100 → 200"):
        data.load_corpus(small_corpus(tmp_path, spm_sample_size=200), str(tmp_path / "sampled"))


def test_a_process_reads_only_its_rows_of_a_batch(tmp_path):
    corpus = data.load_corpus(small_corpus(tmp_path), str(tmp_path / "w"))
    batches = data.TrainBatches(corpus.train_src, corpus.train_tgt, batch_size=8, boundaries=(16, 32, 65), seed=1)
    for number in (0, 5, 60):
        whole = batches.batch(number)
        half = batches.batch(number, np.arange(4, 8))
        for full_field, half_field in zip(whole, half):
            np.testing.assert_array_equal(half_field, full_field[4:8])


def test_other_processes_open_what_process_zero_prepared(tmp_path):
    """writes=False (processes 1..n): nothing is written; the split process 0 prepared (before
    the barrier, here `sync`) is opened, and its absence is a DataError naming the folder."""
    cfg, workdir = small_corpus(tmp_path), tmp_path / "w"
    with pytest.raises(data.DataError, match=r"corpus: the tokenized training split is missing"):
        data.load_corpus(cfg, str(workdir), writes=False)
    assert not workdir.exists()
    synced = []
    reader = data.load_corpus(cfg, str(workdir), writes=False,
                              sync=lambda: synced.append(data.load_corpus(cfg, str(workdir))))
    assert len(synced) == 1 and as_lists(reader.train_src) == as_lists(synced[0].train_src)


def test_long_sources_warn_once_inside_warn_long_once(es_tokenizer, caplog):
    """Dev evaluation decodes the same sources at every evaluation: one warning per sentence a run."""
    long = "y " * 40
    for _ in range(2):
        assert len(sources.source_ids(es_tokenizer, long, 3, 10, "truncate")) == 10
    assert len(caplog.records) == 2  # outside: every time, as translate does
    caplog.clear()
    warned = set()
    for _ in range(3):
        with sources.warn_long_once(warned):
            ids = [sources.source_ids(es_tokenizer, text, i, 10, "truncate") for i, text in enumerate(["a", long, long])]
    assert list(map(len, ids)) == [1, 10, 10]
    assert [r.getMessage()[:22] for r in caplog.records] == ["sentence 1 (line 2): 4", "sentence 2 (line 3): 4"]
    assert warned == {1, 2}
