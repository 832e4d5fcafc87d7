"""One run per workdir: an exclusive fcntl.flock on workdir/LOCK_NAME for the life of a run.

    with workdir_lock.hold(workdir):
        ...  # train

The kernel drops the lock when the holder's process ends, however it ends (kill -9 included), so a
lock is never stale. The holder writes its pid and host into the file; a second run fails at once
with WorkdirBusy naming them. On release the file is removed, and the workdir too if hold() created
it and nothing else was written there, so a run refused before writing leaves no trace.
"""
import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator

LOCK_NAME = "run.lock"


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run; the message says why, in one line."""


class WorkdirBusy(WorkdirError):
    """Another process holds the workdir; the message names its pid and host."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock for the body of the with statement; raises WorkdirBusy if taken."""
    created = not os.path.isdir(workdir)
    path = os.path.join(workdir, LOCK_NAME)
    fd = _lock(workdir, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        # Removed while still locked: a process that opened this file fails; a later one makes a new one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                os.rmdir(workdir)
        os.close(fd)


def _lock(workdir: str, path: str) -> int:
    """Opens and locks `path`; returns its descriptor once it is the file the path names."""
    while True:
        os.makedirs(workdir, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the holder removed the workdir it had created: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirBusy(f"{workdir}: in use by another run ({holder}); wait for it to end or "
                              "use another --workdir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder removed on release: lock the new one


def _holder(fd: int) -> str:
    """ "pid N on host H" from the lock file; the holder may not have written it yet."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "pid and host not written yet"
