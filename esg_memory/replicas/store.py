"""`Store`: one edit memory in a PostgreSQL database — schema, the ordered change log, snapshot rows.

Tables (created on first use, versioned in ``esg_schema``)::

    esg_schema    (name text PRIMARY KEY, value text)        format, record format, lineage
    esg_log       (seq bigint PRIMARY KEY, op text, record bytea, committed_at timestamptz)
    esg_snapshot  (seq bigint PRIMARY KEY, packed bytea, created_at timestamptz)

``esg_log`` is the source of truth: record ``seq`` is the journal record (`esg_memory.persist.journal`
`encode_record`: the typed `Op` plus every state it installs — keys, thresholds, adapters, images) of
the write that took the memory from position ``seq - 1`` to ``seq``; the row's transaction commit is
its commit marker. A write is appended with *compare-and-append*: ``INSERT`` at exactly the position
after the one its writer planned on; the primary key refuses it when another replica got there first
(`StaleStateError` inside the library: catch up, re-plan). ``esg_snapshot`` holds packed snapshots
(`esg_memory.persist.snapshot` directories in one safetensors blob) at some log positions, so a new
replica reads a snapshot and the log after it instead of the whole log. Records are never rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import select
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from ..config import StoreConfig
from ..errors import ConfigError, FormatError, StaleStateError, StoreUnavailableError

__all__ = ["SCHEMA_VERSION", "Store", "is_store_url"]

logger = logging.getLogger("esg_memory.replicas")

SCHEMA_VERSION = 1
CHANNEL = "esg_log"  # LISTEN/NOTIFY channel: the payload is the new record's seq
_SCHEMES = ("postgresql://", "postgres://")
_LOCK_KEY = 0x65736721  # pg_advisory_xact_lock key serialising schema creation ("esg!")

_DDL = (
    "CREATE TABLE IF NOT EXISTS esg_schema (name text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS esg_log (seq bigint PRIMARY KEY CHECK (seq > 0), op text NOT NULL, "
    "record bytea NOT NULL, committed_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE IF NOT EXISTS esg_snapshot (seq bigint PRIMARY KEY CHECK (seq >= 0), "
    "packed bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp())",
)


def is_store_url(path: Any) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) connection URL."""
    return isinstance(path, str) and path.startswith(_SCHEMES)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a PostgreSQL store needs psycopg: pip install 'esg-memory[postgres]'") from None
    return psycopg


class Store:
    """Connections to one memory's database and the few statements the replicas need.

    The write connection is shared by this process's writers (a lock serialises them; writes are
    serialised by the memory's writer lock anyway). Connection failures surface as
    `StoreUnavailableError` and drop the connection, so the next call reconnects.
    """

    def __init__(self, url: str, config: StoreConfig | None = None) -> None:
        if not is_store_url(url):
            raise ConfigError(f"not a PostgreSQL URL: {url!r} (postgresql://...)")
        self.url = url
        self.config = config or StoreConfig()
        self._pg = _psycopg()
        self.driver_error: type[Exception] = self._pg.Error  # what the driver raises (the follower retries)
        self._conn: Any = None
        self._lock = threading.Lock()
        self.lineage = ""

    def __repr__(self) -> str:
        return f"Store({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        """The URL without its password — in the user part or a ``password=`` parameter (for messages
        and logs)."""
        head, sep, rest = self.url.partition("://")
        rest, q, query = rest.partition("?")
        creds, at, host = rest.rpartition("@")
        rest = f"{creds.split(':')[0]}@{host}" if at else rest
        if q:
            parts = query.split("&")
            query = "&".join("password=***" if p.lower().startswith("password=") else p for p in parts)
        return f"{head}{sep}{rest}{q}{query}"

    # ------------------------------------------------------------------ connections
    def connect(self, autocommit: bool = False) -> Any:
        """A new connection (`StoreUnavailableError` when the server cannot be reached)."""
        try:
            return self._pg.connect(self.url, autocommit=autocommit,
                                    connect_timeout=max(1, round(self.config.connect_timeout_s)))
        except self._pg.OperationalError as e:
            raise StoreUnavailableError(f"cannot reach the store {self.safe_url}: {_first_line(e)}") from None

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """The shared write connection inside one transaction; dropped on a connection failure."""
        with self._lock:
            if self._conn is not None and (self._conn.closed or _hung_up(self._conn)):
                self._drop()
            if self._conn is None:
                self._conn = self.connect()
            conn = self._conn
            try:
                yield conn
                conn.commit()
            except self._pg.OperationalError as e:
                self._drop()
                raise StoreUnavailableError(f"lost the store {self.safe_url}: {_first_line(e)}") from None
            except self._pg.errors.InsufficientPrivilege as e:
                # the role this URL logs in as may not do that (e.g. write, or create the tables)
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise ConfigError(f"{self.safe_url}: {_first_line(e)}") from None
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------------ schema
    def ensure_schema(self, create: bool = True) -> bool:
        """Create the tables (once, whichever replica comes first); True when this call created them.

        Refuses a database written by a newer schema, or one holding something else under our names.
        ``create=False`` (a read-only replica, which may connect with a role that can only read):
        no DDL; `ConfigError` for a database holding no memory yet.
        """
        with self._session() as conn:
            if not create:
                if conn.execute("SELECT to_regclass('esg_schema') IS NULL").fetchone()[0]:
                    raise ConfigError(f"{self.safe_url} holds no memory yet (open it writable, or migrate)")
                rows = dict(conn.execute("SELECT name, value FROM esg_schema").fetchall())
            else:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                for ddl in _DDL:
                    conn.execute(ddl)
                rows = dict(conn.execute("SELECT name, value FROM esg_schema").fetchall())
            created = create and not rows
            if created:
                from ..persist import JOURNAL_VERSION

                rows = {"format": "esg-memory-store", "schema_version": str(SCHEMA_VERSION),
                        "record_format": str(JOURNAL_VERSION), "lineage": uuid.uuid4().hex}
                for k, v in rows.items():
                    conn.execute("INSERT INTO esg_schema (name, value) VALUES (%s, %s)", (k, v))
        if rows.get("format") != "esg-memory-store":
            raise FormatError(f"{self.safe_url}: esg_schema does not describe an esg-memory store")
        try:
            version = int(rows.get("schema_version", ""))
        except ValueError:
            raise FormatError(f"{self.safe_url}: unreadable schema_version") from None
        if version > SCHEMA_VERSION:
            raise FormatError(f"{self.safe_url}: schema version {version} is newer than this esg-memory "
                              f"({SCHEMA_VERSION}); upgrade esg-memory")
        self.lineage = rows["lineage"]
        return created

    # ------------------------------------------------------------------ the log
    def append(self, seq: int, op: str, record: bytes) -> None:
        """Compare-and-append: record ``seq`` if nobody wrote it yet, in one transaction with its NOTIFY.

        `StaleStateError` when another writer appended ``seq`` first. A connection lost around the
        commit is resolved by reading ``seq`` back: it is our record (the write happened), another's
        (stale), or absent (`StoreUnavailableError`: not applied).
        """
        try:
            with self._session() as conn:
                cur = conn.execute("INSERT INTO esg_log (seq, op, record) VALUES (%s, %s, %s) "
                                   "ON CONFLICT (seq) DO NOTHING", (seq, op, record))
                if cur.rowcount != 1:
                    raise StaleStateError(f"log position {seq} was taken by another writer")
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
        except StoreUnavailableError:
            if self._holds(seq, record):
                return
            raise

    def notify(self, channel: str, payload: str = "") -> None:
        """NOTIFY ``channel`` (a follower's own wake-up channel, see `Follower.stop`)."""
        with self._session() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def _holds(self, seq: int, record: bytes) -> bool:
        """After an ambiguous commit: is ``record`` at ``seq``? (`StaleStateError` if another is.)"""
        try:
            with self._session() as conn:
                row = conn.execute("SELECT record FROM esg_log WHERE seq = %s", (seq,)).fetchone()
        except StoreUnavailableError:
            return False  # still unknown: the follower applies it from the log if it did land
        if row is None:
            return False
        if hashlib.sha256(bytes(row[0])).digest() == hashlib.sha256(record).digest():
            return True
        raise StaleStateError(f"log position {seq} was taken by another writer")

    def records_after(self, seq: int, conn: Any = None, limit: int = 10_000) -> list[tuple[int, bytes]]:
        """Log records after ``seq``, in order (at most ``limit``: the caller asks again)."""
        q = "SELECT seq, record FROM esg_log WHERE seq > %s ORDER BY seq LIMIT %s"
        if conn is not None:
            return [(int(s), bytes(r)) for s, r in conn.execute(q, (seq, limit)).fetchall()]
        with self._session() as c:
            return [(int(s), bytes(r)) for s, r in c.execute(q, (seq, limit)).fetchall()]

    def head(self) -> int:
        """The last log position (0 for an empty log)."""
        with self._session() as conn:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM esg_log").fetchone()[0])

    # ------------------------------------------------------------------ snapshots
    def put_snapshot(self, seq: int, packed: bytes) -> bool:
        """Store the packed snapshot of position ``seq`` (replicas agree bit for bit: first one wins)."""
        with self._session() as conn:
            cur = conn.execute(
                "INSERT INTO esg_snapshot (seq, packed) VALUES (%s, %s) ON CONFLICT DO NOTHING", (seq, packed)
            )
            return cur.rowcount == 1

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        """(position, packed snapshot) of the newest snapshot, or None for a store holding none yet."""
        with self._session() as conn:
            row = conn.execute("SELECT seq, packed FROM esg_snapshot ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def drop_snapshots_before(self, seq: int) -> None:
        with self._session() as conn:
            conn.execute("DELETE FROM esg_snapshot WHERE seq < %s", (seq,))


def _hung_up(conn: Any) -> bool:
    """Did the server end this idle connection (a restart, ``pg_terminate_backend``, an idle timeout)?

    An idle connection of ours has nothing to read unless the server sent its goodbye (a FATAL
    message, then EOF). Checking costs no round trip, and catching it *before* a statement is sent
    keeps the next write unambiguous: it simply runs on a new connection instead of failing.
    """
    try:
        ready, _, _ = select.select([conn.fileno()], [], [], 0)
    except Exception:  # no usable socket any more (closed under us): as good as hung up
        return True
    return bool(ready)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
