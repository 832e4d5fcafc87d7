"""The files a run writes whole and the JSON it reads back: one atomic write, one JSON reader.

  write_atomic(path, content)  the new content or the old file, also after a kill or a power loss:
                               written to path + ".tmp" (same folder), fsynced, renamed over `path`
                               (`replace`: the rename made durable by an fsync of the folder).
  write_json(path, value)      write_atomic of `value` as JSON (indent 2, keys sorted, final newline).
  read_json(path)              the JSON value of a file; UnreadableFile naming the file otherwise.
"""
import json
import os


class UnreadableFile(ValueError):
    """A file that cannot be read or is not JSON; the message starts with its path."""


def replace(source: str, path: str) -> None:
    """Renames `source` (a file or a folder) to `path` atomically and durably (fsyncs the folder)."""
    os.replace(source, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_atomic(path: str, content: str | bytes) -> None:
    """Writes a whole file or nothing: a run killed mid-write leaves the old file (or none)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    replace(tmp, path)


def write_json(path: str, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise UnreadableFile(f"{path}: unreadable ({error})") from error
