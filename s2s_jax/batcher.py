"""Dynamic batching for the server (`s2s_jax.serve`): one worker thread decodes the sentences of
concurrent requests together.

A request is a `Job`: its sentences, a decode function and a key. The worker takes the first queued
job, waits up to `max_wait_s` after its arrival for more (not at all when jobs queued up while it
was decoding), takes every queued job up to `max_batch` sentences, and decodes each group of jobs
with the same key in one call of the decode function, on their sentences back to back. The
decode driver fills fixed-shape calls per source bucket (`s2s_jax.driver`), so a sentence's result
does not depend on the other sentences of the call: each job gets exactly what it would get
decoded alone. Jobs whose result would depend on their position (sampling keys follow the line;
forced prefixes change the call's shape) have key None and are decoded alone. When a group fails
(a job's bad sentence), each of its jobs is decoded alone, so each gets its own result or error.

The queue is bounded in sentences (`QueueFull` when a job would overflow it); a job whose future
is cancelled (its request timed out) before the worker takes it is dropped. `stop_waiting` makes the
worker decode what is queued at once (the server got SIGTERM); `close` stops taking jobs, lets the
worker finish the queued ones, and joins it.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple


class QueueFull(Exception):
    """The queue holds too many sentences for this job; retry later."""


class Closed(Exception):
    """The batcher is stopping and takes no new job."""


class Job(NamedTuple):
    """One request's work: decode(sentences) -> one result per sentence, for these sentences."""
    sentences: list[str]
    decode: Callable[[list[str]], list]
    key: Hashable | None  # jobs with equal keys (not None) may share calls
    future: Future        # gets a Done
    queued: float         # time.monotonic() when submitted


class Done(NamedTuple):
    """A job's results and how long it waited in the queue and took to decode (seconds)."""
    results: list
    wait_s: float
    decode_s: float


class Batcher:
    """The queue and its worker thread (see the module docstring)."""

    def __init__(self, max_wait_s: float, max_queue: int, max_batch: int):
        self.max_wait_s, self.max_queue, self.max_batch = max_wait_s, max_queue, max_batch
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # sentences in self._jobs
        self._closed = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        """Sentences waiting for the worker."""
        return self._queued

    def submit(self, sentences: Sequence[str], decode: Callable[[list[str]], list], key: Hashable | None) -> Future:
        """Queues a job; its future gets a Done (or the decode's exception). Raises QueueFull
        when the queue cannot take its sentences now, Closed once `close` was called."""
        job = Job(list(sentences), decode, key, Future(), time.monotonic())
        with self._changed:
            if self._closed:
                raise Closed("the server is stopping")
            if self._queued and self._queued + len(job.sentences) > self.max_queue:
                raise QueueFull(f"the queue holds {self._queued} sentences (limit {self.max_queue})")
            self._jobs.append(job)
            self._queued += len(job.sentences)
            self._changed.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Takes no new job, lets the worker finish the queued ones, and waits for it."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join(timeout)

    def stop_waiting(self) -> None:
        """From now on the worker decodes what is queued without waiting for more (the server is
        stopping). Safe in a signal handler: the condition's lock is reentrant."""
        with self._changed:
            self.max_wait_s = 0.0
            self._changed.notify()

    # ------------------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while jobs := self._take():
            groups: dict[Any, list[Job]] = {}
            for number, job in enumerate(jobs):  # key None: a group of its own
                groups.setdefault(number if job.key is None else ("key", job.key), []).append(job)
            for group in groups.values():
                _decode(group)

    def _take(self) -> list[Job]:
        """The next jobs to decode, at most max_batch sentences (at least one job), once the first
        has waited max_wait_s; [] once closed and empty. Cancelled jobs are dropped."""
        with self._changed:
            while True:
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return []
                while self._queued < self.max_batch and not self._closed and (
                        left := self._jobs[0].queued + self.max_wait_s - time.monotonic()) > 0:
                    self._changed.wait(left)
                taken = self._pop()
                if taken:
                    return taken

    def _pop(self) -> list[Job]:
        """Takes queued jobs off the queue, at most max_batch sentences (at least one job); the
        cancelled ones are dropped."""
        taken, sentences = [], 0
        while self._jobs and (not taken or sentences + len(self._jobs[0].sentences) <= self.max_batch):
            job = self._jobs.popleft()
            self._queued -= len(job.sentences)
            if job.future.set_running_or_notify_cancel():
                taken.append(job)
                sentences += len(job.sentences)
        return taken


def _decode(jobs: list[Job]) -> None:
    """Decodes the jobs' sentences in one call and gives each job its results; if that fails and
    there are several jobs, decodes each alone."""
    start = time.monotonic()
    try:
        results = jobs[0].decode([s for job in jobs for s in job.sentences])
    except Exception as error:  # noqa: BLE001 - a request's error goes to its future
        if len(jobs) > 1:
            for job in jobs:
                _decode([job])
        else:
            jobs[0].future.set_exception(error)
        return
    seconds, offset = time.monotonic() - start, 0
    for job in jobs:
        job.future.set_result(Done(results[offset:offset + len(job.sentences)], start - job.queued, seconds))
        offset += len(job.sentences)
