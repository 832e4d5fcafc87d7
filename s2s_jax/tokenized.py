"""The training split tokenized once, on disk: training memory stays flat in the corpus size.

A folder (workdir/corpus/) holds, for n kept pairs and each side (src, tgt):
  train.{side}.ids       every pair's piece ids, concatenated (no EOS); the smallest unsigned dtype
                         that holds vocab_size - 1
  train.{side}.lengths   the lengths index, one entry per pair (the smallest dtype holding max_len)
  train.{side}.offsets   int64[n + 1]: pair i is ids[offsets[i] : offsets[i + 1]]
  progress.json          while preparing: the last pair consumed and the output sizes, to resume
  meta.json              written last: what it was made from (`key`), dtypes and counts

`prepare` appends one chunk of pairs at a time and records its progress after each, so a run
killed while preparing resumes where it stopped; `open_split` memory-maps the ids and offsets and
loads only the lengths.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SIDES = ("src", "tgt")
CHUNK_PAIRS = 50_000  # pairs tokenized and appended per step of the preparation
_FORMAT = 1


class RaggedIds(Sequence):
    """Read-only id sequences stored back to back: item i is an int array of length lengths[i]."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
        self.ids, self.offsets, self.lengths = ids, offsets, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self.ids[start:start + int(self.lengths[i])]


def _files(folder: str, side: str) -> dict[str, str]:
    return {part: os.path.join(folder, f"train.{side}.{part}") for part in ("ids", "lengths", "offsets")}


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, record: dict) -> None:
    """Atomic, durable write."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_ready(folder: str, key: dict) -> bool:
    meta = _read_json(os.path.join(folder, "meta.json"))
    return meta is not None and meta.get("key") == key


def prepare(folder: str, key: dict, pairs: Callable[[dict | None], Iterator[tuple[dict, str, str]]],
            encode: Callable[[list[str], list[str]], tuple[list, list]], *, max_len: int,
            dtypes: dict[str, str], total: int | None = None) -> None:
    """Tokenizes the pairs into `folder` unless it already holds them for `key` (a JSON-able record
    of everything the content depends on).

    pairs(position) yields (position, src, tgt) from the start (position None) or after a position
        it yielded before; a position is a JSON-able dict.
    encode(src_lines, tgt_lines) -> (src ids per line, tgt ids per line).
    Pairs with a side of 0 or more than max_len pieces are dropped and counted. `total` (pairs, if
    known) only serves the progress lines.
    """
    if is_ready(folder, key):
        return
    progress_path = os.path.join(folder, "progress.json")
    progress = _read_json(progress_path)
    if progress is None or progress.get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        progress = dict(key=key, position=None, pairs=0, too_long=0,
                        sizes={side: {part: 0 for part in ("ids", "lengths", "offsets")} for side in SIDES})
    else:
        logger.info("corpus: resuming the preparation of %s after %s pairs", folder, f"{progress['pairs']:,}")
    outputs = {side: {part: open(path, "r+b" if os.path.exists(path) else "w+b")
                      for part, path in _files(folder, side).items()} for side in SIDES}
    try:
        for side in SIDES:  # drop what a kill left after the last recorded chunk
            for part, f in outputs[side].items():
                f.truncate(progress["sizes"][side][part])
                f.seek(0, os.SEEK_END)
        for side in SIDES:
            if not progress["sizes"][side]["offsets"]:  # a fresh folder: offsets start at 0
                outputs[side]["offsets"].write(np.zeros(1, np.int64).tobytes())
        _append_chunks(outputs, progress, progress_path, pairs, encode, max_len, dtypes, total)
    finally:
        for files in outputs.values():
            for f in files.values():
                f.close()
    meta = dict(format=_FORMAT, key=key, dtypes=dtypes, pairs=progress["pairs"], too_long=progress["too_long"])
    _write_json(os.path.join(folder, "meta.json"), meta)
    if os.path.exists(progress_path):  # absent when there was no pair at all
        os.remove(progress_path)


def _append_chunks(outputs, progress, progress_path, pairs, encode, max_len, dtypes, total) -> None:
    """Tokenizes and appends CHUNK_PAIRS pairs at a time, recording the progress after each chunk."""
    started, done_before = time.time(), progress["pairs"] + progress["too_long"]
    stream = pairs(progress["position"])
    ends = {side: int(np.frombuffer(_last_offset(outputs[side]["offsets"]), np.int64)[0]) for side in SIDES}
    while True:
        chunk = list(itertools.islice(stream, CHUNK_PAIRS))
        if not chunk:
            break
        ids = dict(zip(SIDES, encode([src for _, src, _ in chunk], [tgt for _, _, tgt in chunk])))
        keep = [i for i in range(len(chunk)) if all(1 <= len(ids[side][i]) <= max_len for side in SIDES)]
        for side in SIDES:
            kept = [ids[side][i] for i in keep]
            lengths = np.fromiter(map(len, kept), np.int64, len(kept))
            files = outputs[side]
            files["ids"].write(np.fromiter((t for seq in kept for t in seq), dtypes["ids"],
                                           int(lengths.sum())).tobytes())
            files["lengths"].write(lengths.astype(dtypes["lengths"]).tobytes())
            files["offsets"].write((ends[side] + np.cumsum(lengths)).tobytes())
            ends[side] += int(lengths.sum())
        for files in outputs.values():
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        progress.update(position=chunk[-1][0], pairs=progress["pairs"] + len(keep),
                        too_long=progress["too_long"] + len(chunk) - len(keep),
                        sizes={side: {part: f.tell() for part, f in outputs[side].items()} for side in SIDES})
        _write_json(progress_path, progress)
        consumed = progress["pairs"] + progress["too_long"]
        rate = (consumed - done_before) / max(time.time() - started, 1e-9)
        of = f" of {total:,} ({100 * consumed / total:.0f}%)" if total else ""
        logger.info("corpus: tokenized %s pairs%s, %s pairs/s", f"{consumed:,}", of, f"{rate:,.0f}")


def _last_offset(f) -> bytes:
    f.seek(-8, os.SEEK_END)
    value = f.read(8)
    f.seek(0, os.SEEK_END)
    return value


def open_split(folder: str) -> tuple[RaggedIds, RaggedIds, dict]:
    """(src, tgt, meta) of a prepared folder: ids and offsets memory-mapped, lengths loaded."""
    meta = _read_json(os.path.join(folder, "meta.json"))
    sides = []
    for side in SIDES:
        files = _files(folder, side)
        lengths = np.fromfile(files["lengths"], meta["dtypes"]["lengths"])
        offsets = np.memmap(files["offsets"], np.int64, mode="r")
        ids = (np.memmap(files["ids"], meta["dtypes"]["ids"], mode="r") if offsets[-1]
               else np.zeros(0, meta["dtypes"]["ids"]))  # numpy cannot map an empty file
        sides.append(RaggedIds(ids, offsets, lengths))
    return sides[0], sides[1], meta
