"""`RWLock`, a small writer-preferring readers-writer lock: public, the index and the service both use it.

Searches hold the read side (FAISS releases the GIL while it searches, so readers really run in
parallel); mutations hold the write side only for the short moment they change shared state.
Writers are additionally serialised by a plain mutex so that a slow rebuild can run outside the
write lock on a private copy while readers keep using the old structure (copy-on-write).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["RWLock"]


class RWLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)  # `with self._mutex` is the cheaper way in
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self.writer_mutex = threading.RLock()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            self.release_read()

    def acquire_read(self) -> None:
        """`read` without the context manager, for hot paths: pair it with `release_read` in a
        ``try``/``finally``. (A generator-based ``with`` costs a single-query index match ~10 us.)"""
        with self._mutex:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._mutex:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
