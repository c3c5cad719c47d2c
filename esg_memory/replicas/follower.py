"""`Follower`: the thread that keeps one replica's memory at the head of the shared log.

It LISTENs on the store's channel (each append NOTIFYs it in the append's own transaction, so a
notification arrives only after the record is visible), and on every notification — or after
`StoreConfig.poll_s` without one — calls `EditMemory.sync`, which pulls and installs every record
after the replica's position. LISTEN is issued *before* the first pull, so no record committed
after that pull can go unnoticed.

Staleness: ``confirmed`` is the start time of the last moment the replica knew it had everything —
a pull that returned the head, or a wait for notifications that ended without error on a live
connection (a commit during that wait would have notified it). `stale_s` is the time since then;
beyond `StoreConfig.staleness_bound_s` the replica reports unhealthy (`SharedLog.health`). A lost
connection makes it unreachable: it retries with a growing pause, and catches up on reconnection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from typing import Any

from ..config import StoreConfig
from ..errors import EsgMemoryError
from .store import CHANNEL, Store

__all__ = ["Follower"]

logger = logging.getLogger("esg_memory.replicas")

_RETRY_MAX_S = 1.0


class Follower:
    """Applies other replicas' writes to one memory as the store announces them (see the module docstring)."""

    def __init__(self, store: Store, memory: Any, config: StoreConfig) -> None:
        self.store = store
        self._memory = weakref.ref(memory)  # a closed or dropped memory ends the thread
        self.config = config
        self.confirmed = time.monotonic()
        self.reachable = True
        self.last_error: str | None = None
        self.applied_records = 0
        self._stop = threading.Event()
        self._conn: Any = None
        # a channel of its own: `stop` notifies it to end the wait for notifications at once (a
        # cancel does not interrupt that wait, which would otherwise last up to poll_s)
        self._wake = f"esg_wake_{uuid.uuid4().hex[:16]}"
        self._thread = threading.Thread(target=self._run, name="esg-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._conn is not None and self._thread.is_alive():
            with contextlib.suppress(EsgMemoryError):  # unreachable: the thread is not waiting on it
                self.store.notify(self._wake)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def stale_s(self) -> float:
        return max(0.0, time.monotonic() - self.confirmed)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        pause = 0.05
        while not self._stop.is_set():
            try:
                self._follow()
                pause = 0.05
            except (EsgMemoryError, self.store.driver_error, OSError) as e:
                if self._stop.is_set():
                    break
                self._unreachable(e)
                self._stop.wait(pause)
                pause = min(_RETRY_MAX_S, pause * 2)
            finally:
                self._close_conn()
        self._close_conn()

    def _follow(self) -> None:
        conn = self.store.connect(autocommit=True)
        self._conn = conn
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f"LISTEN {self._wake}")
        while not self._stop.is_set():
            t0 = time.monotonic()
            mem = self._memory()
            if mem is None:
                self._stop.set()
                return
            self.applied_records += mem.sync()
            del mem
            self._confirm(t0)
            t0 = time.monotonic()
            # wait for a notification (or poll_s); several notifications are folded into one pull
            for _ in conn.notifies(timeout=self.config.poll_s, stop_after=1):
                pass
            if not self._stop.is_set():
                conn.execute("SELECT 1")  # the connection is alive: nothing went unnotified meanwhile
                self._confirm(t0)

    def _confirm(self, t0: float) -> None:
        if not self.reachable:
            logger.info("the store %s is reachable again", self.store.safe_url)
        self.reachable = True
        self.last_error = None
        self.confirmed = max(self.confirmed, t0)

    def _unreachable(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if self.reachable or msg != self.last_error:
            logger.warning("following %s: %s (retrying)", self.store.safe_url, msg)
        self.reachable = False
        self.last_error = msg

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may raise; nothing is left to release
                conn.close()
