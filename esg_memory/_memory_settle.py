"""Two-phase delete of `EditMemory` (internals, mixed into the class).

An exact delete has two parts of very different cost: the edit leaving (its keys out of the index,
its record gone: microseconds) and its *holders* — the edits whose neighbour set held it — being
re-fitted without it (neighbour search + scope fits: ~1 ms with a dozen edits, tens of ms at 10k).
With ``MemoryConfig.settle`` other than ``"sync"``, `delete` does only the first part, as one
journaled write, and records the deletion as *pending*. Until it is settled, the holders keep the
scopes they had while the deleted edit existed: a state the memory really was in (less the deleted
edit, which no longer routes anywhere), so a reader never sees a half-made scope.

*Settling* is the second part, `_memory_state.Plan.release` for every pending deletion, committed as
its own ordinary journaled write (op ``settle``). It runs in a background thread (``"background"``),
and synchronously before any other write, `save`/`compact`/`make_durable`/`close`, `history`, or an
explicit `settle`. Afterwards the memory equals, bit for bit, one that never had the deleted edits:
`release` reproduces the holders' half of `Plan.remove` (see the `_memory_state` docstring).

Crash safety: a deferred delete record carries ``deferred: true`` and the deleted edit's answer (the
one fact about it that `release` needs: whether it gave its holders negatives). Replaying a journal
whose last deferred deletes have no settle record after them leaves them pending; `load`/`open`
then settle them (journaled when opened for writing), so the loaded state is the settled one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._memory_state import EditState, blobs_of

if TYPE_CHECKING:
    from .memory import EditMemory

__all__ = ["SETTLE_MODES", "SettleMixin", "WriterMutex"]

logger = logging.getLogger("esg_memory.memory")

#: ``MemoryConfig.settle`` values: see `esg_memory.types.MemoryConfig.settle`.
SETTLE_MODES = ("background", "sync", "manual")

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


class _GaveWay(Exception):
    """A background settle stopped for a waiting writer (internal; nothing was applied)."""


class _DropPlan:
    """The part of `_memory_state.Plan` that `EditMemory._apply` and the journal read: one edit leaves."""

    def __init__(self, eid: int) -> None:
        self.over: dict[int, EditState | None] = {eid: None}
        self.changed_vec: set[int] = set()
        self.new_cross: dict = {}
        self.refit_log: list[int] = []


class SettleMixin:
    """Deferred delete, `settle` and `pending_refits` of `EditMemory` (see the module docstring)."""

    def _init_settle(self: EditMemory) -> None:
        self._pending: dict[int, str | None] = {}  # deleted id -> its answer, holders not yet re-fitted
        self._settle_running = False  # a background settler is (about to be) running; under _wlock
        self._settle_wake = threading.Event()
        self._settle_thread: threading.Thread | None = None
        self.last_settle_error: str | None = None

    @property
    def pending_refits(self: EditMemory) -> Mapping[int, tuple[int, ...]]:
        """Deleted edits whose holders are not re-fitted yet: deleted id -> holder ids (read-only)."""
        with self._lock:
            holders = self._derived_index().holders
            return MappingProxyType({d: tuple(sorted(holders.get(d, ()))) for d in sorted(self._pending)})

    def settle(self: EditMemory) -> None:
        """Re-fit the holders of every pending delete now; returns when nothing is pending.

        A no-op when nothing is pending. Raises what the re-fit's write raises (the journal's
        errors for a durable memory); the deletions then stay pending and are retried next time.
        """
        if not self._pending:
            return
        with self._wlock:
            self._settle_locked()

    def _settle_locked(self: EditMemory, give_way: bool = False) -> None:
        """`settle` for a caller that holds the writer lock (every write path starts with it).

        ``give_way`` (the background settler): raise `_GaveWay` between two re-fits when another
        writer waits for the lock; the plan is dropped and the deletions stay pending.
        """
        if not self._pending:
            return
        pend = dict(self._pending)
        plan = self._plan()

        def check() -> None:
            if give_way and self._wlock.contended:
                raise _GaveWay

        affected: set[int] = set()
        for eid in sorted(pend):
            check()
            affected |= plan.release(eid, pend[eid])
        plan.refit_all(affected, before_each=check)

        def done() -> None:
            for e in pend:
                self._pending.pop(e, None)

        self._commit(plan, after=done, op={"op": "settle", "deleted": sorted(pend)})
        logger.info("settled deletes %s; re-fitted neighbours %s", sorted(pend), sorted(affected))

    def _forget(self: EditMemory, st: EditState) -> None:
        """Bookkeeping of a delete, run inside its commit: the id is retired, its files dropped."""
        self._retired.add(st.id)
        for k in [k for k in self._attachments if k[0] == st.id]:
            del self._attachments[k]
        self._gc_blobs(blobs_of(st))

    def _delete_deferred(self: EditMemory, st: EditState) -> bool:
        """Phase one of a delete (caller holds the writer lock); False when ``settle="sync"``."""
        if self.config.settle == "sync":
            return False
        holders = self._derived_index().holders.get(st.id)
        op: dict[str, Any] = {"op": "delete", "edit_id": st.id}
        if holders:
            op.update(deferred=True, answer=st.current.answer)

        def after() -> None:
            self._forget(st)
            if holders:
                self._pending[st.id] = st.current.answer

        self._commit(_DropPlan(st.id), after=after, op=op)
        logger.info("deleted edit %d; holders %s re-fitted when settled", st.id, sorted(holders or ()))
        if holders and self.config.settle == "background":
            self._start_settler()
        return True

    # ------------------------------------------------------------------ background settling
    def _start_settler(self: EditMemory) -> None:
        """Wake the settler thread, or start it (caller holds the writer lock)."""
        self._settle_wake.set()
        if self._settle_running:
            return  # it decides to exit only under the writer lock, seeing this wake-up
        self._settle_running = True
        t = threading.Thread(target=self._settler, name="esg-settle", daemon=True)
        self._settle_thread = t
        t.start()

    def _settler(self: EditMemory) -> None:
        delay = SETTLE_DELAY_S
        try:
            while True:
                woke = self._settle_wake.wait(SETTLER_IDLE_S)
                if woke:
                    time.sleep(delay)
                with self._wlock:
                    if not self._settle_wake.is_set() and not self._pending:
                        self._settle_running = False
                        return
                    self._settle_wake.clear()
                    try:
                        self._settle_locked(give_way=True)
                        delay = SETTLE_DELAY_S
                    except _GaveWay:
                        self._settle_wake.set()  # again once the writer is through
                        delay = min(SETTLE_BACKOFF_MAX_S, 2 * delay)
        except Exception as e:  # the deletions stay pending; the next write or settle() retries
            self.last_settle_error = f"{type(e).__name__}: {e}"
            logger.error("background settling failed: %s", self.last_settle_error)
            with self._wlock:
                self._settle_running = False
