"""`MicroBatcher`: groups queued generate jobs with equal options into one model call.

None of this imports FastAPI, so the service core can be used (and benchmarked) in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MicroBatcher", "OverloadedError"]

# the flat layout's logger name (esg_memory/serve_batch.py): logging configurations keep matching
logger = logging.getLogger("esg_memory.serve_batch")


class OverloadedError(RuntimeError):
    """The generate queue is full (the HTTP layer answers 503 so clients back off)."""


@dataclass
class _Job:
    key: Hashable
    rows: int
    payload: Any
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Groups queued jobs with equal keys into one call of ``run(key, payloads) -> results``.

    One worker thread: the first queued job opens a batch; jobs with the same key queued within
    ``wait_s`` join it (FIFO, up to ``max_rows`` rows). Jobs with other keys keep their place. If a
    batch of several jobs fails, each job is retried alone so one bad request cannot fail others.
    """

    def __init__(
        self,
        run: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
        max_rows: int = 16,
        wait_s: float = 0.003,
        max_queue: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
        name: str = "esg-batcher",
    ) -> None:
        if max_rows < 1 or wait_s < 0 or max_queue < 1:
            raise ValueError("max_rows and max_queue must be >= 1 and wait_s >= 0")
        self._run = run
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, payload: Any, rows: int = 1) -> Future:
        """Queue a job; its future resolves to the job's result (or raises its error)."""
        job = _Job(key, max(1, int(rows)), payload)
        with self._cond:
            if self._closed:
                raise OverloadedError("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise OverloadedError(f"{len(self._queue)} generate requests are already queued")
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs, finish the queued ones, join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.wait_s
            while rows < self.max_rows:
                for job in list(self._queue):
                    if job.key == first.key and rows + job.rows <= self.max_rows:
                        self._queue.remove(job)
                        batch.append(job)
                        rows += job.rows
                left = deadline - time.monotonic()
                if rows >= self.max_rows or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if live:
                self._execute(live)

    def _execute(self, jobs: list[_Job]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(jobs), sum(j.rows for j in jobs))
        try:
            results = list(self._run(jobs[0].key, [j.payload for j in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(jobs)} jobs")
        except BaseException as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            logger.warning("a batch of %d jobs failed (%s); retrying them one by one", len(jobs), exc)
            for job in jobs:
                try:
                    job.future.set_result(self._run(job.key, [job.payload])[0])
                except BaseException as one:
                    job.future.set_exception(one)
            return
        for job, res in zip(jobs, results, strict=True):
            job.future.set_result(res)
