"""`SharedLog`: the journal of a memory whose source of truth is a PostgreSQL store.

It is what `EditMemory.journal` is for a directory (`esg_memory.persist.Durable`), with two more
duties. **Writes**: `log` appends the write's record at the position after the one this replica has
applied (compare-and-append, `Store.append`); when another replica got there first it raises
`StaleStateError` and the memory's writer catches up (`pull`) and plans the write again — so no
write, and no neighbour re-fit, is ever computed on stale state. **Reads**: `pull` turns the records
other replicas appended into the one `Change` they make, through the journal's own decoding and
`esg_memory.persist.replay` (the code path of journal replay), which the memory installs. A
`Follower` thread calls it whenever the store notifies a new record.

Every replica installs the same records on the same states, so all converge to the same state, bit
for bit (the records are physical: they carry the re-fitted states, nothing is recomputed).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import StoreConfig
from ..errors import ConfigError, InternalError, StaleStateError
from ..memory.ops import Attach, Change, Op
from ..persist.journal import decode, encode_abort, encode_record, live_records
from ..persist.replay import replay
from .follower import Follower
from .pack import pack_snapshot
from .store import Store

__all__ = ["SharedLog"]

logger = logging.getLogger("esg_memory.replicas")


class SharedLog:
    """The shared store's side of one replica's memory (see the module docstring).

    ``applied``: the last log position this replica's state includes. It moves only under the
    memory's writer lock (writes and `pull` both hold it), so planning always sees a settled position.
    """

    path = None  # not a directory: `EditMemory.durable_path` is None for a shared memory
    shared = True

    def __init__(self, store: Store, applied: int, readonly: bool, config: StoreConfig) -> None:
        self.store = store
        self.applied = applied
        self.readonly = readonly
        self.config = config
        self.max_replans = config.max_replans  # read by the memory's writer (`Writer.replanned`)
        self.closed = False
        self.compactions = 0
        self.diverged: str | None = None  # set when this replica can no longer follow the log
        self.follower: Follower | None = None
        self._t0 = time.monotonic()

    def __repr__(self) -> str:
        return f"SharedLog({self.store.safe_url!r}, applied={self.applied})"

    # ------------------------------------------------------------------ the writer's side
    def check_writable(self) -> None:
        if self.closed:
            raise ConfigError(f"this memory was closed ({self.store.safe_url}); open it again")
        if self.readonly:
            raise ConfigError(f"{self.store.safe_url} was opened read-only")
        if self.diverged:
            raise InternalError(f"this replica stopped following {self.store.safe_url}: {self.diverged}")

    def log(self, op: Op, change: Change, attachment: Any, stored: Any) -> int:
        """Append the write's record right after ``applied``; `StaleStateError` if that position is taken."""
        self.check_writable()
        new = {sha: data for sha, data in change.blobs.items() if sha not in stored}
        seq = self.applied + 1
        self.store.append(seq, type(op).NAME if not isinstance(op, Attach) else "attach",
                          encode_record(op, change, attachment, new))
        self.applied = seq
        return seq

    def abort(self, lsn: int) -> None:
        """Void record ``lsn``, which this replica appended but could not install (the caller saw it fail)."""
        try:
            self.store.append(lsn + 1, "abort", encode_abort(lsn))
            self.applied = lsn + 1
        except BaseException as e:
            # another replica may already have planned on record lsn: this replica cannot follow any more
            self.diverged = f"record {lsn} could not be applied nor voided ({type(e).__name__}: {e})"
            raise

    def after_write(self, mem: Any) -> None:
        """Nothing to do: the store keeps every record; snapshots are written by `compact`."""

    # ------------------------------------------------------------------ the follower's side
    def pull(self, base: Any, dim: int) -> tuple[Change, int] | None:
        """(the change the records after ``applied`` make to ``base``, their count), or None when at the head.

        The caller holds the writer lock and installs the change (`EditMemory.sync`). An abort of a
        record this replica already installed cannot be undone here: the replica stops following
        (`diverged`; restart it: a fresh open honours the abort).
        """
        if self.diverged:
            raise InternalError(f"this replica stopped following {self.store.safe_url}: {self.diverged}")
        rows = self.store.records_after(self.applied)
        if not rows:
            return None
        if rows[0][0] != self.applied + 1:
            self.diverged = f"the log jumps from {self.applied} to {rows[0][0]}"
            raise InternalError(f"{self.store.safe_url}: {self.diverged}")
        first = decode(rows[0][0], rows[0][1])[0]
        if first["kind"] == "abort":
            self.diverged = f"record {first.get('lsn')} was voided after this replica applied it"
            logger.error("%s: %s; restart this replica", self.store.safe_url, self.diverged)
            raise InternalError(f"{self.store.safe_url}: {self.diverged}")
        change = replay(base, dim, live_records(rows))
        self.applied = rows[-1][0]
        return change, len(rows)

    def start_following(self, mem: Any) -> None:
        """Start the thread that applies other replicas' writes to ``mem`` as they are notified."""
        if self.follower is None:
            self.follower = Follower(self.store, mem, self.config)
            self.follower.start()

    def health(self) -> dict[str, Any]:
        """``healthy`` (within the staleness bound), ``store`` (ok / unreachable), ``stale_s``, ..."""
        f = self.follower
        stale = f.stale_s() if f is not None else time.monotonic() - self._t0
        reachable = f.reachable if f is not None else False
        bound = self.config.staleness_bound_s
        return {
            "healthy": bool(stale <= bound and not self.diverged and not self.closed),
            "store": "ok" if reachable else "unreachable",
            "stale_s": round(stale, 4),
            "staleness_bound_s": bound,
            "applied": self.applied,
            "diverged": self.diverged,
            "last_error": None if f is None else f.last_error,
        }

    # ------------------------------------------------------------------ snapshots, closing
    def wait(self) -> None:
        """Nothing runs in the background but the follower (`close` stops it)."""

    def compact(self, mem: Any) -> int:
        """Store a snapshot of this replica's state at its log position (new replicas start from it)."""
        self.check_writable()
        at: list[int] = []
        for attempt in range(1, self.max_replans + 1):
            # the snapshot settles pending deletes first: that settle record is a write like any
            # other, refused when another replica moved the log on — catch up and take it again
            mem.sync()
            try:
                view = mem.snapshot(while_locked=lambda: at.append(self.applied))
                break
            except StaleStateError:
                if attempt == self.max_replans:
                    raise
        seq = at[-1]
        packed = pack_snapshot(view, {"lsn": seq, "lineage": self.store.lineage})
        if self.store.put_snapshot(seq, packed):
            self.store.drop_snapshots_before(seq)
            self.compactions += 1
            logger.info("stored a snapshot of %s at position %d (%d bytes)",
                        self.store.safe_url, seq, len(packed))
        return seq

    def close(self, mem: Any) -> None:
        if self.closed:
            return
        self.closed = True
        if self.follower is not None:
            self.follower.stop()
        self.store.close()

