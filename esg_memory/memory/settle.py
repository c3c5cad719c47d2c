"""Two-phase delete: the writer lock that knows who waits, and the background thread that settles.

An exact delete has two parts of very different cost: the edit leaving (its keys out of the index,
its record gone: microseconds) and its *holders* — the edits whose neighbour set held it — being
re-fitted without it (neighbour search + scope fits: ~1 ms with a dozen edits, tens of ms at 10k).
With ``MemoryConfig.settle`` other than ``"sync"``, `delete` does only the first part, as one
journaled write, and records the deletion as *pending*. Until it is settled, the holders keep the
scopes they had while the deleted edit existed: a state the memory really was in (less the deleted
edit, which no longer routes anywhere), so a reader never sees a half-made scope.

*Settling* is the second part, `esg_memory.memory.plan.Plan.release` for every pending deletion, committed as
its own ordinary journaled write (op ``settle``). It runs in a background thread (``"background"``),
and synchronously before any other write, `save`/`compact`/`make_durable`/`close`, `history`, or an
explicit `settle`. Afterwards the memory equals, bit for bit, one that never had the deleted edits:
`release` reproduces the holders' half of `Plan.remove` (see the `esg_memory.memory.plan` docstring).

Crash safety: a deferred delete record carries ``deferred: true`` and the deleted edit's answer (the
one fact about it that `release` needs: whether it gave its holders negatives). Replaying a journal
whose last deferred deletes have no settle record after them leaves them pending; `load`/`open`
then settle them (journaled when opened for writing), so the loaded state is the settled one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["GaveWay", "Settler", "WriterMutex"]

logger = logging.getLogger("esg_memory.memory")

#: The settler waits this long before taking the writer lock: the delete call returns without the
#: settler holding the GIL against it, and a burst of deletes is settled as one write.
SETTLE_DELAY_S = 0.002
#: An idle settler thread exits after this long (a delete wakes a live one: no thread start per delete).
SETTLER_IDLE_S = 2.0
#: After giving way to a writer, the settler waits up to this long (doubling from SETTLE_DELAY_S) before
#: trying again, so a burst of deletes is not slowed by settle attempts it keeps interrupting.
SETTLE_BACKOFF_MAX_S = 0.1


class WriterMutex:
    """The memory's writer lock (reentrant) that also tells a background settle a writer is waiting.

    A settle re-fits the deleted edits' holders under this lock, which takes tens of ms in a dense
    memory; the settler checks `contended` between two re-fits and gives way (its plan is dropped,
    nothing was applied) so that a delete or any other write waits for at most one re-fit.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    @property
    def contended(self) -> bool:
        return self._waiting > 0

    def __enter__(self) -> WriterMutex:
        if not self._lock.acquire(blocking=False):  # the owner re-entering never counts as waiting
            with self._count:
                self._waiting += 1
            try:
                self._lock.acquire()
            finally:
                with self._count:
                    self._waiting -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class GaveWay(Exception):
    """A background settle stopped for a waiting writer (nothing was applied; deletions stay pending)."""


class Settler:
    """The background settling thread of one memory.

    ``settle`` is the memory's settle-under-the-writer-lock (called with ``give_way=True``, it raises
    `GaveWay` between two re-fits when another writer waits); ``has_pending`` tells whether any
    deferred delete is left. The thread starts on the first deferred delete, is woken by later ones
    (no thread start per delete) and exits after `SETTLER_IDLE_S` without work.
    """

    def __init__(self, wlock: WriterMutex, settle: Callable[[bool], None], has_pending: Callable[[], bool]):
        self._wlock = wlock
        self._settle = settle
        self._has_pending = has_pending
        self._running = False  # a thread is (about to be) running; read and written under the writer lock
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def wake(self) -> None:
        """Wake the thread, or start it (caller holds the writer lock)."""
        self._wake.set()
        if self._running:
            return  # it decides to exit only under the writer lock, seeing this wake-up
        self._running = True
        t = threading.Thread(target=self._run, name="esg-settle", daemon=True)
        self._thread = t
        t.start()

    def _run(self) -> None:
        delay = SETTLE_DELAY_S
        try:
            while True:
                woke = self._wake.wait(SETTLER_IDLE_S)
                if woke:
                    time.sleep(delay)
                with self._wlock:
                    if not self._wake.is_set() and not self._has_pending():
                        self._running = False
                        return
                    self._wake.clear()
                    try:
                        self._settle(True)
                        delay = SETTLE_DELAY_S
                    except GaveWay:
                        self._wake.set()  # again once the writer is through
                        delay = min(SETTLE_BACKOFF_MAX_S, 2 * delay)
        except Exception as e:  # the deletions stay pending; the next write or settle() retries
            self.last_error = f"{type(e).__name__}: {e}"
            logger.error("background settling failed: %s", self.last_error)
            with self._wlock:
                self._running = False
