"""Data pipeline: parallel text, sentencepiece tokenizers, bucketed batches, synthetic tasks.

Pure numpy/Python. Every batch has a fixed shape ``[batch_size, boundary]`` drawn from a
small set, so a jitted train step compiles once per bucket.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

from s2s_jax import BOS_ID, EOS_ID, PAD_ID, UNK_ID, files, tokenized

IdSeqs = list[list[int]]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message starts with 'path:line: ' (or 'path: ' when no line)."""


def _error(path: str, message: str, line: int | None = None) -> DataError:
    where = f"{path}:{line}" if line is not None else path
    return DataError(f"{where}: {message}")


# --------------------------------------------------------------------------- reading


def iter_lines(path: str, *, start: int = 0, first_line: int = 1,
               digest=None) -> Iterator[tuple[int, str, int]]:
    """Yields (line number, text, byte offset after the line) of a strict UTF-8 file, read as a
    stream from byte `start` (the line numbered `first_line`); `digest` (a hashlib object) is fed
    every byte read.

    Only '\\n' separates lines (a trailing '\\r' is dropped), so Unicode line separators
    inside a sentence cannot shift the alignment of a parallel corpus; a '\\r' inside a line (a
    file with CR-only line endings) is a DataError. A leading BOM is dropped.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _error(path, f"cannot read file ({e.strerror or e})") from e
    with f:
        if start:  # a pipe cannot seek: only a resumed read does
            f.seek(start)
        offset, number = start, first_line
        for raw in f:
            if digest is not None:
                digest.update(raw)
            offset += len(raw)
            line = raw[3:] if offset == len(raw) and raw.startswith(b"\xef\xbb\xbf") else raw
            line = line.removesuffix(b"\n")
            carriage_return = line.find(b"\r")
            if 0 <= carriage_return < len(line) - 1:
                raise _error(path, f"carriage return (\\r) inside the line, at byte {carriage_return + 1}: lines "
                                   "must end with \\n (CR-only line endings? convert them, e.g. with tr '\\r' '\\n')",
                             number)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = line[e.start]
                raise _error(path, f"invalid UTF-8 (byte 0x{byte:02x} at column {e.start + 1})", number) from None
            yield number, text.removesuffix("\r"), offset
            number += 1


def read_lines(path: str) -> list[str]:
    """Every line of a strict UTF-8 file (see iter_lines), without line endings."""
    return [text for _, text, _ in iter_lines(path)]


class Pair(NamedTuple):
    """A line pair of a parallel corpus, with the byte offsets after it in both files."""
    number: int  # line number, from 1
    src: str
    tgt: str
    src_end: int
    tgt_end: int


def iter_parallel(src_path: str, tgt_path: str, *, after: tuple[int, int, int] = (0, 0, 0),
                  digests=(None, None)) -> Iterator[Pair]:
    """Yields every line pair of aligned source/target files, or those after `after`, a pair's
    (number, src_end, tgt_end); DataError when one file has more lines than the other."""
    count, src_start, tgt_start = after
    src = iter_lines(src_path, start=src_start, first_line=count + 1, digest=digests[0])
    tgt = iter_lines(tgt_path, start=tgt_start, first_line=count + 1, digest=digests[1])
    for number, s, src_end in src:
        t_line = next(tgt, None)
        if t_line is None:
            raise _error(src_path, f"{number + sum(1 for _ in src)} lines, but {tgt_path} has {count} lines")
        yield Pair(number, s, t_line[1], src_end, t_line[2])
        count = number
    extra = sum(1 for _ in tgt)
    if extra:
        raise _error(src_path, f"{count} lines, but {tgt_path} has {count + extra} lines")


def _check_on_empty(on_empty: str) -> None:
    if on_empty not in ("skip", "error"):
        raise ValueError(f"on_empty must be 'skip' or 'error', got {on_empty!r}")


def is_blank(pair: Pair, on_empty: str, src_path: str, tgt_path: str) -> bool:
    """True for a pair with an empty or whitespace-only side (on_empty="skip"); DataError naming
    the file and line instead with on_empty="error"."""
    if pair.src.strip() and pair.tgt.strip():
        return False
    if on_empty == "error":
        raise _error(src_path if not pair.src.strip() else tgt_path, "empty line", pair.number)
    return True


def read_parallel(src_path: str, tgt_path: str, *, on_empty: str = "skip") -> tuple[list[str], list[str], int]:
    """Reads aligned source/target files; returns (src, tgt, number of skipped empty pairs).

    A pair with an empty or whitespace-only side is dropped and counted (on_empty="skip")
    or raises DataError (on_empty="error").
    """
    _check_on_empty(on_empty)
    keep_src, keep_tgt, skipped = [], [], 0
    for pair in iter_parallel(src_path, tgt_path):
        if is_blank(pair, on_empty, src_path, tgt_path):
            skipped += 1
        else:
            keep_src.append(pair.src)
            keep_tgt.append(pair.tgt)
    return keep_src, keep_tgt, skipped


# --------------------------------------------------------------------------- tokenizers


def _content_ids(row) -> list[int]:
    """Ids of one output row up to the first EOS, without PAD and BOS."""
    ids = []
    for i in row:
        i = int(i)
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            ids.append(i)
    return ids


class Tokenizer:
    """Thin wrapper over a sentencepiece model with ids PAD=0 BOS=1 EOS=2 UNK=3."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp

    @classmethod
    def train(cls, lines: list[str], vocab_size: int, model_type: str = "unigram") -> Tokenizer:
        """Trains deterministically on lines, in memory (save_tokenizers writes the model).

        vocab_size is an upper bound: a corpus too small for it yields a smaller vocabulary.
        ValueError (one line) when sentencepiece cannot train, e.g. vocab_size below the characters.
        """
        if not lines:
            raise ValueError("cannot train a tokenizer on no lines")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                character_coverage=1.0,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        except RuntimeError as e:
            reason = " ".join(str(e).split("] ")[-1].split())
            too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", reason)
            if too_small:
                raise ValueError(f"vocabulary too small: this text needs at least {too_small[2]} pieces "
                                 "(one per distinct character, plus the special pieces)") from None
            raise ValueError(f"sentencepiece cannot train ({reason})") from None
        return cls(spm.SentencePieceProcessor(model_proto=model.getvalue()))

    @classmethod
    def load(cls, model_path: str) -> Tokenizer:
        """Loads a saved model; DataError if missing, unreadable or with other special ids."""
        if not os.path.isfile(model_path):
            raise _error(model_path, "tokenizer model not found")
        try:
            with open(model_path, "rb") as f:
                sp = spm.SentencePieceProcessor(model_proto=f.read())
        except (OSError, RuntimeError) as e:
            raise _error(model_path, f"cannot load sentencepiece model ({' '.join(str(e).split())})") from e
        specials = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise _error(model_path, f"special ids (pad, bos, eos, unk) are {specials}, expected (0, 1, 2, 3)")
        return cls(sp)

    def model_proto(self) -> bytes:
        """The serialized sentencepiece model: the bytes that save_tokenizers writes."""
        return self.sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, lines: list[str]) -> IdSeqs:
        """Piece ids per line, without BOS/EOS."""
        return self.sp.encode(list(lines), out_type=int)

    def decode(self, ids_batch) -> list[str]:
        """Text per row: stops at the first EOS, drops PAD/BOS, detokenizes."""
        return self.sp.decode([_content_ids(row) for row in ids_batch])


class IdTokenizer:
    """Tokenizer for synthetic tasks: tokens are the ids themselves, written as space-separated ints."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, lines: list[str]) -> IdSeqs:
        out = []
        for line in lines:
            ids = [int(tok) for tok in line.split()]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"ids {bad} outside [0, {self.vocab_size}) in {line!r}")
            out.append(ids)
        return out

    def decode(self, ids_batch) -> list[str]:
        return [" ".join(map(str, _content_ids(row))) for row in ids_batch]


# --------------------------------------------------------------------------- synthetic tasks

_SYNTHETIC_TARGETS = {
    "copy": lambda src: list(src),
    "reverse": lambda src: src[::-1],
    "sort": sorted,
}


def synthetic_task(
    name: str, num_examples: int, vocab_size: int, min_len: int, max_len: int, seed: int
) -> tuple[IdSeqs, IdSeqs]:
    """(source, target) id sequences for "copy", "reverse" or "sort".

    Source tokens are uniform in [4, vocab_size), lengths uniform in [min_len, max_len].
    """
    if name not in _SYNTHETIC_TARGETS:
        raise ValueError(f"unknown synthetic task {name!r}; expected one of {sorted(_SYNTHETIC_TARGETS)}")
    if vocab_size <= UNK_ID + 1:
        raise ValueError(f"synthetic vocab_size must exceed {UNK_ID + 1}, got {vocab_size}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_examples)
    tokens = rng.integers(UNK_ID + 1, vocab_size, size=int(lengths.sum()))
    src = [chunk.tolist() for chunk in np.split(tokens, np.cumsum(lengths)[:-1])] if num_examples else []
    target = _SYNTHETIC_TARGETS[name]
    return src, [target(s) for s in src]


# --------------------------------------------------------------------------- batching


class Batch(NamedTuple):
    """A fixed-shape batch; all arrays int32. Filler rows have index -1 and carry no loss."""

    src: np.ndarray  # [B, L] source ids + EOS, then PAD
    src_len: np.ndarray  # [B] real source length incl. EOS (filler rows: 1, src=[EOS])
    tgt_in: np.ndarray  # [B, L] BOS + target ids, then PAD
    tgt_out: np.ndarray  # [B, L] target ids + EOS, then PAD
    index: np.ndarray  # [B] position of the pair in the input lists; -1 for filler rows


def pair_length(src: Sequence[int], tgt: Sequence[int]) -> int:
    """Padded length a pair needs: room for EOS after the source and after the target."""
    return max(len(src), len(tgt)) + 1


def sequence_lengths(seqs: Sequence) -> np.ndarray:
    """int64[len(seqs)]: the length of each sequence (the stored index of tokenized.RaggedIds)."""
    if isinstance(seqs, tokenized.RaggedIds):
        return seqs.lengths.astype(np.int64)
    return np.fromiter(map(len, seqs), np.int64, len(seqs))


def bucket_for(length: int, boundaries: Sequence[int]) -> int:
    """Index of the smallest boundary >= length (boundaries ascending), or -1 if none."""
    i = bisect.bisect_left(boundaries, length)
    return i if i < len(boundaries) else -1


def padded_length(length: int, boundaries: Sequence[int]) -> int:
    """The smallest bucket boundary >= length, else length rounded up to a multiple of 16."""
    bucket = bucket_for(length, boundaries)
    return int(boundaries[bucket]) if bucket >= 0 else -(-length // 16) * 16


def _check_boundaries(boundaries: Sequence[int]) -> list[int]:
    b = [int(x) for x in boundaries]
    if not b or b[0] < 2 or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"bucket boundaries must be strictly increasing integers >= 2, got {list(boundaries)}")
    return b


def make_batch(src_ids: IdSeqs, tgt_ids: IdSeqs, indices: Sequence[int], batch_size: int, length: int) -> Batch:
    """Pads the pairs at `indices` to [batch_size, length]; missing rows become filler rows."""
    if len(indices) > batch_size:
        raise ValueError(f"{len(indices)} pairs do not fit a batch of {batch_size}")
    shape = (batch_size, length)
    src, tgt_in, tgt_out = (np.full(shape, PAD_ID, np.int32) for _ in range(3))
    src_len = np.ones(batch_size, np.int32)
    index = np.full(batch_size, -1, np.int32)
    src[:, 0] = EOS_ID
    tgt_in[:, 0] = BOS_ID
    for row, i in enumerate(indices):
        s, t = src_ids[i], tgt_ids[i]
        if pair_length(s, t) > length:
            raise ValueError(f"pair {i} (lengths {len(s)}, {len(t)}) does not fit length {length} with EOS")
        src[row, : len(s)] = s
        src[row, len(s)] = EOS_ID
        src_len[row] = len(s) + 1
        tgt_in[row, 1 : len(t) + 1] = t
        tgt_out[row, : len(t)] = t
        tgt_out[row, len(t)] = EOS_ID
        index[row] = i
    return Batch(src, src_len, tgt_in, tgt_out, index)


def rows_per_bucket(boundaries: Sequence[int], *, batch_size: int, max_tokens: int = 0,
                    row_multiple: int = 1) -> list[int]:
    """Rows of a training batch in each bucket: `batch_size` everywhere when `max_tokens` is 0,
    else max_tokens // boundary rounded down to a multiple of `row_multiple` (the device count),
    so that no batch holds more than max_tokens padded positions per side. ValueError (one line)
    when a bucket would get no rows."""
    if max_tokens == 0:
        return [batch_size] * len(boundaries)
    rows = [max_tokens // length // row_multiple * row_multiple for length in boundaries]
    if not all(rows):
        length = boundaries[rows.index(0)]
        raise ValueError(f"data.max_tokens={max_tokens} leaves bucket {length} no rows: its rows are a "
                         f"multiple of the {row_multiple} devices, so it needs at least {length} x "
                         f"{row_multiple} = {length * row_multiple} tokens")
    return rows


class TrainBatches:
    """Endless, deterministic training batches: `batch(n)` is a pure function of the batch number.

    Each pair goes to the bucket of the smallest boundary >= pair_length. Every batch of a bucket
    has that bucket's number of rows (`rows_per_bucket`: batch_size sentences, or as many as fit
    max_tokens). Epoch e uses rng = np.random.default_rng([seed, e]): pairs are shuffled within
    each bucket, each bucket is cut into full batches (the remainder is dropped, different pairs
    each epoch), and the order of all batches of the epoch is shuffled. Every epoch has the same
    number of batches.
    """

    def __init__(self, src_ids: IdSeqs, tgt_ids: IdSeqs, *, batch_size: int, boundaries: Sequence[int], seed: int,
                 max_tokens: int = 0, row_multiple: int = 1):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} source but {len(tgt_ids)} target sequences")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.boundaries = _check_boundaries(boundaries)
        self.src_ids, self.tgt_ids, self.seed = src_ids, tgt_ids, seed
        self.bucket_rows = rows_per_bucket(self.boundaries, batch_size=batch_size, max_tokens=max_tokens,
                                           row_multiple=row_multiple)
        lengths = np.maximum(sequence_lengths(src_ids), sequence_lengths(tgt_ids)) + 1  # pair_length
        buckets = np.searchsorted(self.boundaries, lengths)  # bucket_for; len(boundaries) if too long
        too_long = int(np.count_nonzero(buckets == len(self.boundaries)))
        if too_long:
            raise ValueError(
                f"{too_long} pairs need more than the largest boundary {self.boundaries[-1]} "
                "(length incl. EOS); filter them out first (filter_pairs)"
            )
        self._members = [np.flatnonzero(buckets == b) for b in range(len(self.boundaries))]
        self._batches_per_bucket = [len(m) // rows for m, rows in zip(self._members, self.bucket_rows)]
        self.batches_per_epoch = sum(self._batches_per_bucket)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no bucket holds a full batch: bucket sizes {[len(m) for m in self._members]} for "
                f"boundaries {self.boundaries}, batches of {self.bucket_rows} rows; use more training pairs "
                "or smaller batches"
            )
        self.shapes = [(rows, length) for length, rows, n
                       in zip(self.boundaries, self.bucket_rows, self._batches_per_bucket) if n]
        self._plan_epoch: int | None = None
        self._plan: list[tuple[int, np.ndarray]] = []

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(length, pair indices) of every batch of the epoch, in order; cached for the current epoch."""
        if epoch != self._plan_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            buckets = zip(self.boundaries, self._members, self._batches_per_bucket, self.bucket_rows)
            for length, members, n, rows in buckets:
                chosen = rng.permutation(members)[: n * rows]
                batches.extend((length, chunk) for chunk in chosen.reshape(n, rows))  # [n, rows]
            self._plan = [batches[k] for k in rng.permutation(len(batches))]
            self._plan_epoch = epoch
        return self._plan

    def _planned(self, number: int) -> tuple[int, np.ndarray]:
        if number < 0:
            raise ValueError(f"batch number must be >= 0, got {number}")
        epoch, k = divmod(number, self.batches_per_epoch)
        return self._epoch_plan(epoch)[k]

    def size(self, number: int) -> int:
        """The number of rows of batch `number` (its bucket's)."""
        return len(self._planned(number)[1])

    def batch(self, number: int, rows: np.ndarray | None = None) -> Batch:
        """Batch number `number` (global counter; epoch = number // batches_per_epoch); only its
        `rows` (ascending row numbers) if given: a process reads just the pairs it feeds."""
        length, indices = self._planned(number)
        if rows is not None:
            indices = indices[rows]
        return make_batch(self.src_ids, self.tgt_ids, indices, len(indices), length)


def eval_batches(src_ids: IdSeqs, tgt_ids: IdSeqs, *, batch_size: int, boundaries: Sequence[int]) -> list[Batch]:
    """Every pair exactly once, sorted by length and grouped by bucket (restore order via Batch.index).

    Pairs longer than the largest boundary share one extra bucket whose length is the longest
    pair rounded up to a multiple of 16. The last batch of each bucket is padded with filler rows.
    """
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} source but {len(tgt_ids)} target sequences")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bounds = _check_boundaries(boundaries)
    lengths = [pair_length(s, t) for s, t in zip(src_ids, tgt_ids)]
    if lengths and max(lengths) > bounds[-1]:
        bounds.append(padded_length(max(lengths), bounds))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bounds[bucket_for(lengths[i], bounds)], []).append(i)
    return [
        make_batch(src_ids, tgt_ids, members[start : start + batch_size], batch_size, length)
        for length, members in groups.items()
        for start in range(0, len(members), batch_size)
    ]


def filter_pairs(src_ids: IdSeqs, tgt_ids: IdSeqs, max_len: int) -> tuple[IdSeqs, IdSeqs, int]:
    """Keeps pairs with 1 <= len <= max_len on both sides; returns (src, tgt, number dropped)."""
    keep = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if 1 <= len(s) <= max_len and 1 <= len(t) <= max_len]
    return [src_ids[i] for i in keep], [tgt_ids[i] for i in keep], len(src_ids) - len(keep)


# --------------------------------------------------------------------------- corpus


class Corpus(NamedTuple):
    """Tokenizers plus tokenized train/dev data and the raw dev text."""

    src_tokenizer: Tokenizer | IdTokenizer
    tgt_tokenizer: Tokenizer | IdTokenizer
    train_src: IdSeqs | tokenized.RaggedIds  # files: memory-mapped from workdir/corpus/
    train_tgt: IdSeqs | tokenized.RaggedIds
    dev_src: IdSeqs
    dev_tgt: IdSeqs
    dev_src_text: list[str]  # raw dev text; for synthetic tasks the space-joined ids
    dev_tgt_text: list[str]
    stats: dict  # counts: train_pairs_read, train_empty_skipped, train_too_long, train_pairs, dev_pairs, ...
    provenance: dict | None = None  # what the tokenizers were trained from (provenance.json); None if synthetic


def _read_split(cfg, prefix: str, limit: int) -> tuple[list[str], list[str], int]:
    """Reads f"{prefix}.{lang}" for both languages; keeps the first `limit` pairs (0 = all)."""
    src_path, tgt_path = f"{prefix}.{cfg.src_lang}", f"{prefix}.{cfg.tgt_lang}"
    src, tgt, skipped = read_parallel(src_path, tgt_path, on_empty=cfg.on_empty)
    if not src:
        raise _error(src_path, f"no non-empty pairs (with {tgt_path})")
    if limit:
        src, tgt = src[:limit], tgt[:limit]
    return src, tgt, skipped


# workdir/tokenizers/ holds these files; provenance.json records what the models were trained from:
# {"format": 1, "train_src": {"path", "bytes", "sha256"}, "train_tgt": {...}, "src_lang", "tgt_lang",
#  "max_train_pairs", "vocab_size", "spm_model_type", "spm_sample_size", "joint_vocab",
#  "models": {"src.model": sha256, "tgt.model": sha256}[, "init_from": {"workdir", "provenance"}: a
#  warm start's reused tokenizers and the record of where they were trained]}; with joint_vocab both
#  files hold the one model.
_MODEL_FILES = ("src.model", "tgt.model")
_PROVENANCE = "provenance.json"
_PROVENANCE_FORMAT = 1
_PROVENANCE_KEYS = ("src_lang", "tgt_lang", "max_train_pairs", "vocab_size", "spm_model_type", "spm_sample_size",
                    "joint_vocab")
# Absent from the records of older versions: not compared then (configuration refuses a changed joint_vocab).
_LATER_KEYS = ("spm_sample_size", "joint_vocab")
SAMPLE_SEED = 0  # of the sentencepiece training sample: tokenizers do not depend on the run's seed


def _file_record(path: str) -> dict:
    """Absolute path, size and sha256 of a file, read as a stream."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        size = f.tell()
    return {"path": os.path.abspath(path), "bytes": size, "sha256": digest.hexdigest()}


class _Scan(NamedTuple):
    """One streaming pass over the training files."""
    record: dict  # the tokenizers' provenance, without the model hashes
    pairs_read: int  # non-empty pairs, at most max_train_pairs
    empty_skipped: int
    sample: tuple[list[str], list[str]] | None  # sentencepiece's training pairs, when asked for
    stamps: dict  # path -> (size, mtime_ns) of each training file before the pass


def sample_items(items: Iterator, size: int, seed: int) -> list:
    """A uniform random sample of `size` items of a stream (reservoir sampling, Algorithm R), in
    memory proportional to `size`; every item in stream order when there are no more than `size`."""
    rng, sample, draws = np.random.default_rng(seed), [], iter(())
    for seen, item in enumerate(items):
        if seen < size:
            sample.append(item)
            continue
        draw = next(draws, None)
        if draw is None:
            draws = iter(rng.random(1 << 16).tolist())
            draw = next(draws)
        slot = int(draw * (seen + 1))
        if slot < size:
            sample[slot] = item
    return sample


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file; None if it cannot be read (iter_lines reports why)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _train_pairs(cfg, stamps: dict, folder: str, position: dict | None = None) -> Iterator[tuple[dict, str, str]]:
    """(position, src, tgt) of the training pairs kept before tokenization (non-empty, at most
    max_train_pairs), from the start or after `position` (a dict this generator yielded). At the
    end, DataError if a training file's size or mtime differs from `stamps` (taken before the
    scan): the pairs tokenized into `folder` may mix old and new text."""
    src_path, tgt_path = f"{cfg.train_prefix}.{cfg.src_lang}", f"{cfg.train_prefix}.{cfg.tgt_lang}"
    kept = position["kept"] if position else 0
    after = (position["number"], position["src_end"], position["tgt_end"]) if position else (0, 0, 0)
    for pair in iter_parallel(src_path, tgt_path, after=after):
        if cfg.max_train_pairs and kept == cfg.max_train_pairs:
            break
        if not is_blank(pair, cfg.on_empty, src_path, tgt_path):
            kept += 1
            yield (dict(number=pair.number, src_end=pair.src_end, tgt_end=pair.tgt_end, kept=kept),
                   pair.src, pair.tgt)
    for path, stamp in stamps.items():
        if _stamp(path) != stamp:
            raise _error(path, f"changed while {folder} was being prepared from it (its size or modification "
                               f"time differs from when it was read); delete {folder} and rerun once it no "
                               "longer changes")


def _scan(cfg, with_sample: bool) -> _Scan:
    """Checks every line of the training files (UTF-8, equal line counts) in one streaming pass,
    hashing them and counting their pairs; with_sample: keeps a random sample of
    data.spm_sample_size pairs to train the tokenizers on."""
    src_path, tgt_path = f"{cfg.train_prefix}.{cfg.src_lang}", f"{cfg.train_prefix}.{cfg.tgt_lang}"
    _check_on_empty(cfg.on_empty)
    stamps = {path: _stamp(path) for path in (src_path, tgt_path)}
    digests, counts = (hashlib.sha256(), hashlib.sha256()), dict(pairs=0, empty=0)
    logged = time.time()

    def kept_pairs() -> Iterator[tuple[str, str]]:
        nonlocal logged
        for pair in iter_parallel(src_path, tgt_path, digests=digests):
            if is_blank(pair, cfg.on_empty, src_path, tgt_path):
                counts["empty"] += 1
            elif not cfg.max_train_pairs or counts["pairs"] < cfg.max_train_pairs:
                counts["pairs"] += 1
                yield pair.src, pair.tgt
            if time.time() - logged > 10:
                logger.info("corpus: read %s lines of %s", f"{pair.number:,}", src_path)
                logged = time.time()

    stream = kept_pairs()
    sample = sample_items(stream, cfg.spm_sample_size, SAMPLE_SEED) if with_sample else None
    for _ in stream:  # the rest: checked and hashed
        pass
    if not counts["pairs"]:
        raise _error(src_path, f"no non-empty pairs (with {tgt_path})")
    files = {side: {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
             for side, path, digest in zip(("train_src", "train_tgt"), (src_path, tgt_path), digests)}
    record = {"format": _PROVENANCE_FORMAT, **files, **{key: cfg[key] for key in _PROVENANCE_KEYS}}
    return _Scan(record, counts["pairs"], counts["empty"],
                 None if sample is None else ([s for s, _ in sample], [t for _, t in sample]), stamps)


def _read_provenance(path: str) -> dict:
    try:
        record = files.read_json(path)
    except files.UnreadableFile as e:
        raise DataError(str(e)) from e
    if not (isinstance(record, dict) and record.get("format") == _PROVENANCE_FORMAT
            and isinstance(record.get("models"), dict)):
        raise _error(path, f"not a tokenizer provenance record of format {_PROVENANCE_FORMAT}")
    return record


def _differences(old: dict, new: dict) -> list[str]:
    """'what: old → new' for every training file (by content) and data setting that differs."""

    def describe(file: dict) -> str:
        return f"{file.get('path')} ({file.get('bytes')} bytes, sha256 {str(file.get('sha256'))[:12]})"

    diffs = []
    for side in ("train_src", "train_tgt"):
        was = old.get(side) if isinstance(old.get(side), dict) else {}
        if (was.get("bytes"), was.get("sha256")) != (new[side]["bytes"], new[side]["sha256"]):
            diffs.append(f"training file {describe(was)} → {describe(new[side])}")
    diffs.extend(
        f"data.{key}: {old.get(key)!r} → {new[key]!r}" for key in _PROVENANCE_KEYS
        if old.get(key) != new[key] and (key in old or key not in _LATER_KEYS)
    )
    return diffs


def _saved_tokenizers(folder: str, record: dict) -> tuple[Tokenizer, Tokenizer, dict]:
    """Loads the tokenizers of `folder` after checking their provenance against `record`."""
    path = os.path.join(folder, _PROVENANCE)
    remedy = f"use a new --workdir (this one's checkpoints are bound to the tokenizers in {folder})"
    if not os.path.isfile(path):
        raise _error(path, f"missing, so nothing says what the tokenizers in {folder} were trained from "
                           f"(made by an older version or an interrupted run); {remedy}")
    old = _read_provenance(path)
    diffs = _differences(old, record)
    if diffs:
        differences = "; ".join(diffs)
        raise _error(path, f"the saved tokenizers were trained from other data or settings ({differences}); {remedy}")
    tokenizers = []
    for name in _MODEL_FILES:
        model_path = os.path.join(folder, name)
        tokenizers.append(Tokenizer.load(model_path))
        digest = _file_record(model_path)["sha256"]
        if digest != old["models"].get(name):
            raise _error(model_path, f"sha256 {digest[:12]} differs from the one in {_PROVENANCE}; {remedy}")
    return tokenizers[0], tokenizers[1], old


def _has_saved_tokenizers(workdir: str) -> bool:
    folder = os.path.join(workdir, "tokenizers")
    return any(os.path.exists(os.path.join(folder, name)) for name in (*_MODEL_FILES, _PROVENANCE))


def _train_tokenizer(cfg, lines: list[str], suffix: str) -> Tokenizer:
    """A tokenizer trained on `lines` as config.data says; DataError naming the training file(s)."""
    try:
        return Tokenizer.train(lines, cfg.vocab_size, cfg.spm_model_type)
    except ValueError as e:
        raise _error(f"{cfg.train_prefix}.{suffix}", f"data.vocab_size={cfg.vocab_size} "
                                                     f"(data.spm_model_type={cfg.spm_model_type}): {e}") from e


def _tokenizers(cfg, scan: _Scan, workdir: str, reuse: tuple | None) -> tuple[Tokenizer, Tokenizer, dict]:
    """The tokenizers of workdir/tokenizers/ if made from the same data, else those of `reuse`
    (src, tgt, origin: a warm start's), else new ones trained in memory on the scan's sample; with
    their provenance (a reused pair's records its origin). Writes nothing (save_tokenizers does)."""
    if _has_saved_tokenizers(workdir):
        return _saved_tokenizers(os.path.join(workdir, "tokenizers"), scan.record)
    if reuse is not None:
        src_tok, tgt_tok, origin = reuse
        models = {name: hashlib.sha256(tok.model_proto()).hexdigest() for name, tok in zip(_MODEL_FILES, (src_tok, tgt_tok))}
        return src_tok, tgt_tok, {**scan.record, "models": models, "init_from": origin}
    if cfg.joint_vocab:  # one model of both sides' lines, for both
        joint = _train_tokenizer(cfg, scan.sample[0] + scan.sample[1], f"{{{cfg.src_lang},{cfg.tgt_lang}}}")
        tokenizers = [joint, joint]
    else:
        tokenizers = [_train_tokenizer(cfg, lines, lang)
                      for lines, lang in zip(scan.sample, (cfg.src_lang, cfg.tgt_lang))]
    models = {name: hashlib.sha256(tok.model_proto()).hexdigest() for name, tok in zip(_MODEL_FILES, tokenizers)}
    return tokenizers[0], tokenizers[1], {**scan.record, "models": models}


def save_tokenizers(corpus: Corpus, workdir: str) -> None:
    """Writes the corpus's tokenizers to workdir/tokenizers/: {src,tgt}.model and provenance.json.

    Call once every check of the run has passed. The three files appear together (written to a
    temporary folder that is then renamed). No-op when the folder already holds these tokenizers
    or the task is synthetic.
    """
    if corpus.provenance is None:
        return
    folder = os.path.join(workdir, "tokenizers")
    path = os.path.join(folder, _PROVENANCE)
    if os.path.isfile(path) and _read_provenance(path) == corpus.provenance:
        return
    tmp = os.path.join(workdir, f".tokenizers.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, tok in zip(_MODEL_FILES, (corpus.src_tokenizer, corpus.tgt_tokenizer)):
            files.write_atomic(os.path.join(tmp, name), tok.model_proto())
        files.write_json(os.path.join(tmp, _PROVENANCE), corpus.provenance)
        files.replace(tmp, folder)  # atomic; replaces an empty folder, fails on a non-empty one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _corpus_errors():
    """tokenized.CorpusError (a corpus file that differs from its record) as a DataError."""
    try:
        yield
    except tokenized.CorpusError as error:
        raise DataError(str(error)) from None


def _load_files(cfg, workdir: str, writes: bool, sync: Callable[[], None], reuse: tuple | None) -> Corpus:
    scan = _scan(cfg, with_sample=not _has_saved_tokenizers(workdir) and reuse is None)
    dev_src, dev_tgt, dev_skipped = _read_split(cfg, cfg.dev_prefix, cfg.max_dev_pairs)
    src_tok, tgt_tok, provenance = _tokenizers(cfg, scan, workdir, reuse)
    folder = os.path.join(workdir, "corpus")
    key = dict(tokenizers=provenance, max_len=cfg.max_len)
    if writes:
        def encode(src_lines, tgt_lines):
            return src_tok.encode(src_lines), tgt_tok.encode(tgt_lines)

        dtypes = dict(ids=np.min_scalar_type(max(src_tok.vocab_size, tgt_tok.vocab_size) - 1).name,
                      lengths=np.min_scalar_type(cfg.max_len).name)
        with _corpus_errors():
            tokenized.prepare(folder, key, functools.partial(_train_pairs, cfg, scan.stamps, folder), encode,
                              max_len=cfg.max_len, dtypes=dtypes, total=scan.pairs_read)
    sync()
    if not tokenized.is_ready(folder, key):
        raise _error(folder, "the tokenized training split is missing or was made from other data "
                             "(process 0 prepares it: is the workdir on a filesystem all processes share?)")
    with _corpus_errors():  # the writer reads the whole split once more; the others check sizes only
        src_ids, tgt_ids, meta = tokenized.open_split(folder, checksums=writes)
    stats = {
        "train_pairs_read": scan.pairs_read,
        "train_empty_skipped": scan.empty_skipped,
        "train_too_long": meta["too_long"],
        "train_pairs": meta["pairs"],
        "dev_pairs": len(dev_src),
        "dev_empty_skipped": dev_skipped,
    }
    dev_src_ids, dev_tgt_ids = src_tok.encode(dev_src), tgt_tok.encode(dev_tgt)
    return Corpus(src_tok, tgt_tok, src_ids, tgt_ids, dev_src_ids, dev_tgt_ids, dev_src, dev_tgt, stats, provenance)


def _load_synthetic(cfg) -> Corpus:
    def make(size: int, seed: int) -> tuple[IdSeqs, IdSeqs]:
        return synthetic_task(
            cfg.task, size, cfg.synthetic_vocab_size, cfg.synthetic_min_len, cfg.synthetic_max_len, seed
        )

    train_src, train_tgt = make(cfg.synthetic_train_size, cfg.synthetic_seed)
    dev_src, dev_tgt = make(cfg.synthetic_dev_size, cfg.synthetic_seed + 1)
    src_ids, tgt_ids, too_long = filter_pairs(train_src, train_tgt, cfg.max_len)
    tok = IdTokenizer(cfg.synthetic_vocab_size)
    stats = {
        "train_pairs_read": len(train_src),
        "train_empty_skipped": 0,
        "train_too_long": too_long,
        "train_pairs": len(src_ids),
        "dev_pairs": len(dev_src),
        "dev_empty_skipped": 0,
    }
    return Corpus(tok, tok, src_ids, tgt_ids, dev_src, dev_tgt, tok.decode(dev_src), tok.decode(dev_tgt), stats)


def load_corpus(cfg, workdir: str, *, writes: bool = True, sync: Callable[[], None] = lambda: None,
                reuse: tuple | None = None) -> Corpus:
    """Builds the corpus for cfg (config.data): task "files" or a synthetic task.

    For "files": the training files are read as a stream; the tokenizers of workdir/tokenizers/
    are used if their provenance matches cfg and the training files (DataError naming the
    difference otherwise, or when they have no provenance), else new ones are trained in memory on
    a random sample of data.spm_sample_size pairs: save them with save_tokenizers once the run's
    checks have passed. The training split is tokenized once into workdir/corpus/ (`tokenized`;
    resumed if interrupted, reused while the data and tokenizers are the same) and memory-mapped;
    a training file that changes meanwhile, or a corpus file that differs from its record, is a
    DataError. Several processes: the one with writes=True prepares it and checks the crc32 of
    its files; `sync()` (a barrier) is called before every process opens it and checks their
    sizes. Synthetic tasks write nothing. reuse: (src, tgt, origin) tokenizers of a warm start,
    used (and their origin recorded in the provenance) when the workdir has none yet.
    """
    if cfg.task == "files":
        return _load_files(cfg, workdir, writes, sync, reuse)
    if cfg.task in _SYNTHETIC_TARGETS:
        return _load_synthetic(cfg)
    raise ValueError(f"unknown data task {cfg.task!r}; expected 'files' or one of {sorted(_SYNTHETIC_TARGETS)}")
