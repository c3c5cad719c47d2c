"""Durable edit-memory directories: snapshot + write-ahead journal + writer lock.

Layout of a durable directory ``P``::

    P/writer.lock          flock'ed by the one writer; holds its pid
    P/snapshot/            a plain `EditMemory.save` directory whose memory.json records
                           ``journal: {lsn, lineage}``: the last journal record it holds
    P/journal/<lsn>.wal    journal segments (`esg_memory.persist.journal`), named by their first lsn

The lock file and the journal live *beside* the snapshot, never inside it, because a compaction
swaps ``P/snapshot`` as a whole (`index.atomic_directory`). Compaction, step by step, with
what a crash at each point leaves:

1. under the memory's writer lock: start a new journal segment at ``L + 1`` (``L`` = last lsn)
   and take a consistent copy of the state (dict copies; the index saves itself into a
   temp dir). Crash: old snapshot + all segments; replay gives the same state.
2. without locks (writers go on journaling into the new segment): write the snapshot into a
   temp dir, fsync, swap it in. Crash before the swap: as in 1. After: the new snapshot says
   ``lsn = L``, replay skips records <= L (segments before ``L + 1`` are not even read).
3. delete the segments before ``L + 1``. Crash midway: leftovers are ignored, then removed.

Readers (`load_durable`) take no lock: they read the snapshot and then the segments, and retry
if a compaction swapped the snapshot under them.

This module works on `MemorySnapshot`s, `Op`s and `Change`s, and on a memory only through its
public methods (`snapshot`, `from_snapshot`, `settle`, `set_journal`, `origin`, `loaded_from`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index import fsync_dir, read_regular_file, recover_dir

from ..config import JournalConfig
from ..errors import ConfigError, FormatError, LockError
from ..memory.ops import Change, Op
from ..memory.state import MemorySnapshot
from .journal import JournalWriter, encode_abort, encode_record, list_segments, live_records, read_journal
from .replay import replay
from .snapshot import read_snapshot, save_snapshot

__all__ = [
    "Durable",
    "Loaded",
    "WriterLock",
    "attach_durable",
    "install",
    "is_durable",
    "load_any",
    "load_durable",
    "open_durable",
    "save_into",
]

logger = logging.getLogger("esg_memory.durable")

SNAPSHOT = "snapshot"
JOURNAL = "journal"
# a plain snapshot's entries, of every format version (2 packs what 1 kept in the blobs/ and
# attachments/ directories): converting a plain directory in place removes them once the durable
# snapshot is in
_PLAIN_FILES = (
    "memory.json",
    "keys.safetensors",
    "blobs.safetensors",
    "attachments.safetensors",
    "blobs",
    "attachments",
    "index",
)


def is_durable(path: Path) -> bool:
    return (path / SNAPSHOT).is_dir() or (path / f"{SNAPSHOT}.old").is_dir()


# ------------------------------------------------------------------------------------ lock
class WriterLock:
    """Exclusive ``flock`` on ``P/writer.lock``; the kernel releases it when the holder dies."""

    FILE = "writer.lock"

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            logger.warning("no fcntl here: %s is not protected against a second writer", self.path)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = "unknown pid" if holder is None else f"pid {holder}"
            if holder == os.getpid():
                who += " (this process: another open EditMemory)"
            raise LockError(f"{self.path.parent} is already opened for writing by {who}") from None
        stale = _read_pid(fd)
        if stale is not None and stale != os.getpid():
            logger.warning("taking over the writer lock of %s from pid %d, which is gone",
                           self.path.parent, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # a clean release leaves no pid behind
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ reading
def _ident(snap: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(snap / "memory.json")
        return st.st_ino, st.st_mtime_ns
    except OSError:
        return None


@dataclass(frozen=True)
class Loaded:
    """A durable directory as read: its snapshot, the change its journal makes, where it ends."""

    snapshot: MemorySnapshot
    replayed: Change
    last: int  # lsn of the last journal record
    segments: list
    position: dict[str, Any]  # the snapshot's {"lsn", "lineage"}

    def origin(self, path: Path) -> tuple[str, str, int]:
        return (str(path.resolve()), self.position["lineage"], self.last)


def load_durable(path: Path, encoder: Any, backend: str | None, *, attempts: int = 20) -> Loaded:
    """Read a durable directory (snapshot + journal) without taking its lock; retries a swapped snapshot."""
    for attempt in range(attempts):
        snap = path / SNAPSHOT
        if not snap.is_dir():  # a compaction between its two renames
            snap = path / f"{SNAPSHOT}.old"
        ident = _ident(snap)
        try:
            data = read_snapshot(snap, encoder, backend)
            pos = data.journal
            if pos is None:
                raise FormatError(f"{snap}: a durable snapshot must record its journal position")
            records, segs = read_journal(path / JOURNAL, pos["lsn"])
            change = replay(data.edits, int(data.encoder.dim), live_records(records))
            last = records[-1][0] if records else pos["lsn"]
            if records:
                logger.info("replayed %d journal records onto %s", len(records), snap)
            return Loaded(data, change, last, segs, dict(pos))
        except (FormatError, OSError) as e:
            # a compaction swapped the snapshot (and may have dropped the segments it held) under us
            moved = _ident(path / SNAPSHOT) != ident
            if not moved or attempt == attempts - 1:
                if isinstance(e, OSError) and not isinstance(e, FormatError):
                    raise FormatError(f"{path}: unreadable ({e})") from None
                raise
            time.sleep(0.01 * (attempt + 1))  # a compaction is swapping files: read again
    raise FormatError(f"{path}: could not be read")  # attempts < 1


def _memory(cls: Any, loaded: Loaded, path: Path, settle: bool) -> Any:
    return cls.from_snapshot(
        loaded.snapshot, replayed=loaded.replayed, origin=loaded.origin(path), settle=settle
    )


def load_any(cls: Any, path: Path, encoder: Any, backend: str | None) -> Any:
    """`EditMemory.load`: a plain or durable directory, read without its lock, deletes settled in memory."""
    if path.is_dir() and is_durable(path):
        return _memory(cls, load_durable(path, encoder, backend), path, settle=True)
    return cls.from_snapshot(read_snapshot(path, encoder, backend))


# ------------------------------------------------------------------------------------ writer
class Durable:
    """The journal side of an open durable memory (`EditMemory.journal`)."""

    def __init__(self, path: Path, lock: WriterLock | None, writer: JournalWriter | None, lineage: str,
                 snapshot_lsn: int, config: JournalConfig) -> None:
        self.path = path
        self.lock = lock
        self.writer = writer
        self.lineage = lineage
        self.snapshot_lsn = snapshot_lsn
        self.config = config
        self.closed = False
        self.compactions = 0
        self.last_compact_error: str | None = None
        self._compact_mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def readonly(self) -> bool:
        return self.writer is None

    def check_writable(self) -> JournalWriter:
        """The journal writer; `ConfigError` when closed or read-only."""
        if self.closed:
            raise ConfigError(f"this memory was closed ({self.path}); reopen it with EditMemory.open")
        if self.writer is None:
            raise ConfigError(f"{self.path} was opened read-only")
        return self.writer

    # -- called by the memory under its writer lock, before a write is installed
    def log(self, op: Op, change: Change, attachment: bytes | None, stored: Any) -> int:
        """Append and fsync the write's record; returns its lsn. ``stored``: the images already held."""
        w = self.check_writable()
        new = {sha: data for sha, data in change.blobs.items() if sha not in stored}
        return w.append(encode_record(op, change, attachment, new))

    def abort(self, lsn: int) -> None:
        w = self.check_writable()
        try:
            w.append(encode_abort(lsn))
        except BaseException as e:
            w.broken = f"record {lsn} could not be applied nor voided ({type(e).__name__}: {e})"
            raise

    def after_write(self, mem: Any) -> None:
        cfg = self.config
        if not cfg.compact_bytes or self.writer is None or self.writer.bytes_since_rotate < cfg.compact_bytes:
            return
        if not cfg.background:
            # inline, but never waiting for a compaction another thread runs (it waits for our lock)
            self.compact(mem, blocking=False)
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._background, args=(mem,), name="esg-compact", daemon=True)
        self._thread.start()

    def _background(self, mem: Any) -> None:
        try:
            self.compact(mem)
        except Exception as e:  # the journal still holds everything; the next trigger retries
            self.last_compact_error = f"{type(e).__name__}: {e}"
            logger.error("background compaction of %s failed: %s", self.path, self.last_compact_error)

    def wait(self) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    # -- compaction
    def compact(self, mem: Any, blocking: bool = True) -> int | None:
        """Snapshot + truncate the journal (see the module docstring); returns the snapshot's lsn.

        Lock order: the compaction mutex, then the memory's writer lock (taken by `mem.snapshot`).
        ``blocking=False`` (used by a writer that already holds the writer lock) skips when another
        compaction runs.
        """
        self.check_writable()
        if not self._compact_mutex.acquire(blocking=blocking):
            return None
        tmp_index = self.path / f".compact-{uuid.uuid4().hex}.index"
        try:
            at: list[int] = []

            def rotate() -> None:  # under the writer lock, after pending deletes are settled
                w = self.check_writable()
                at.append(w.next_lsn - 1)
                w.rotate()

            view = mem.snapshot(index_dir=tmp_index, while_locked=rotate)
            lsn = at[0]
            self._write_snapshot(view, lsn)
            self._drop_segments_before(lsn + 1)
            self.compactions += 1
            self.last_compact_error = None
            return lsn
        finally:
            shutil.rmtree(tmp_index, ignore_errors=True)
            self._compact_mutex.release()

    def _write_snapshot(self, view: MemorySnapshot, lsn: int) -> None:
        t0 = time.perf_counter()
        save_snapshot(view, self.path / SNAPSHOT, journal={"lsn": lsn, "lineage": self.lineage})
        self.snapshot_lsn = lsn
        logger.info("compacted %s at lsn %d in %.2fs", self.path, lsn, time.perf_counter() - t0)

    def _drop_segments_before(self, lsn: int) -> None:
        jdir = self.path / JOURNAL
        gone = False
        for first, p in list_segments(jdir):
            if first < lsn:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                gone = True
        if gone:
            fsync_dir(jdir)

    def close(self, mem: Any) -> None:
        if self.closed:
            return
        try:
            self.wait()
            if self.writer is not None and self.config.compact_on_close and self.writer.bytes_since_rotate:
                self.compact(mem)
        finally:
            self.closed = True
            if self.writer is not None:
                self.writer.close()
            if self.lock is not None:
                self.lock.release()


# ------------------------------------------------------------------------------------ opening
def _clean(path: Path) -> None:
    """Remove what a crash can leave behind: temp dirs, half-made segments, converted plain files."""
    recover_dir(path / SNAPSHOT)
    for p in path.iterdir():
        if p.name.startswith((f".{SNAPSHOT}.", ".compact-")) or p.name == f"{SNAPSHOT}.old":
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in _PLAIN_FILES and (path / SNAPSHOT).is_dir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    jdir = path / JOURNAL
    if jdir.is_dir():
        for p in jdir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()


def install(mem: Any, path: Path, lock: WriterLock, config: JournalConfig, disk_last: int = 0) -> Durable:
    """Make ``path`` hold ``mem`` (snapshot at lsn ``disk_last``, empty journal after it); lock held."""
    jdir = path / JOURNAL
    if not is_durable(path):
        shutil.rmtree(jdir, ignore_errors=True)  # a conversion cut short
    writer = JournalWriter(jdir, None, disk_last + 1)
    lineage = uuid.uuid4().hex
    try:
        save_snapshot(mem.snapshot(), path / SNAPSHOT, journal={"lsn": disk_last, "lineage": lineage})
    except BaseException:
        writer.close()
        raise
    d = Durable(path, lock, writer, lineage, disk_last, config)
    d._drop_segments_before(disk_last + 1)
    _clean(path)
    logger.info("%s now holds a durable memory of %d edits", path, len(mem))
    return d


def _resume(path: Path, lock: WriterLock, config: JournalConfig, last: int, segs: list, pos: dict) -> Durable:
    tail = segs[-1] if segs else None
    if tail is not None and tail.first_lsn > last + 1:
        raise FormatError(f"{path}: journal segment {tail.path.name} is past lsn {last}")
    writer = JournalWriter(path / JOURNAL, tail, last + 1)
    return Durable(path, lock, writer, pos["lineage"], pos["lsn"], config)


def _config(config: Any) -> JournalConfig:
    config = JournalConfig() if config is None else config
    if not isinstance(config, JournalConfig):
        raise ConfigError(f"journal must be a JournalConfig, not {type(config).__name__}")
    return config


def open_durable(cls: Any, path: Path, encoder: Any, backend: str | None, readonly: bool,
                 config: JournalConfig | None) -> Any:
    """`EditMemory.open` (see there)."""
    config = _config(config)
    if readonly:
        mem = load_any(cls, path, encoder, backend)
        mem.set_journal(Durable(path, None, None, "", 0, config))
        return mem
    _refuse_foreign(path)
    if encoder is None and not path.exists():
        raise ConfigError(f"{path} holds no memory yet; pass encoder= to create one")
    lock = WriterLock(path).acquire()
    try:
        if is_durable(path):
            _clean(path)
            loaded = load_durable(path, encoder, backend, attempts=1)
            mem = _memory(cls, loaded, path, settle=False)
            mem.set_journal(_resume(path, lock, config, loaded.last, loaded.segments, loaded.position))
            mem.settle()  # a crash left deletes pending: their settle record is written now
        else:
            mem = _fresh_or_plain(cls, path, encoder, backend)
            mem.set_journal(install(mem, path, lock, config))
        return mem
    except BaseException:
        lock.release()
        raise


def _refuse_foreign(path: Path) -> None:
    """Refuse (before creating anything in it) a directory that holds something other than a memory."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    if is_durable(path) or (path / "memory.json").is_file():
        return
    extra = sorted(p.name for p in path.iterdir() if p.name not in (WriterLock.FILE, JOURNAL))
    if extra:
        raise ConfigError(f"{path} is not an esg-memory directory (it holds {', '.join(extra[:5])})")


def _fresh_or_plain(cls: Any, path: Path, encoder: Any, backend: str | None) -> Any:
    if (path / "memory.json").is_file():
        logger.info("converting the plain memory directory %s to a durable one", path)
        return load_any(cls, path, encoder, backend)
    if encoder is None:
        raise ConfigError(f"{path} holds no memory yet; pass encoder= to create one")
    return cls(encoder, backend=backend or "flat")


def _snapshot_position(path: Path) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(read_regular_file(path / SNAPSHOT / "memory.json").decode("utf-8"))
        pos = doc["journal"]
        if isinstance(pos, dict) and isinstance(pos.get("lsn"), int) and isinstance(pos.get("lineage"), str):
            return pos
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    raise FormatError(f"{path / SNAPSHOT}: no readable journal position in memory.json")


def _disk_position(path: Path) -> tuple[dict[str, Any], int, list]:
    """(snapshot journal position, last lsn on disk, parsed segments) without loading the memory."""
    pos = _snapshot_position(path)
    records, segs = read_journal(path / JOURNAL, pos["lsn"])
    return pos, records[-1][0] if records else pos["lsn"], segs


def _refuse_stale(mem: Any, path: Path, pos: dict[str, Any], last: int) -> None:
    """Writing a copy loaded from ``path`` back over it is refused if another writer moved it on since."""
    loaded = mem.loaded_from
    if loaded is not None and loaded[0] == str(path.resolve()) and loaded[1:] != (pos["lineage"], last):
        raise LockError(
            f"{path} was changed by another writer since this memory was loaded from it (journal at lsn "
            f"{last}, loaded at {loaded[2]}); load it again instead of overwriting those writes"
        )


def save_into(mem: Any, path: Path) -> None:
    """`EditMemory.save` into a durable directory this memory is not open on: replace its content."""
    lock = WriterLock(path).acquire()
    try:
        _clean(path)
        pos, last, _ = _disk_position(path)
        _refuse_stale(mem, path, pos, last)
        d = install(mem, path, lock, JournalConfig(compact_on_close=False), disk_last=last)
        d.lock = None  # released below
        d.close(mem)
    finally:
        lock.release()


def attach_durable(mem: Any, path: Path, config: JournalConfig | None) -> Durable:
    """Make a live (non-durable) memory durable at ``path`` (see `EditMemory.make_durable`)."""
    config = _config(config)
    _refuse_foreign(path)
    lock = WriterLock(path).acquire()
    try:
        if is_durable(path):
            _clean(path)
            pos, last, segs = _disk_position(path)
            _refuse_stale(mem, path, pos, last)
            if mem.origin == (str(path.resolve()), pos["lineage"], last):
                return _resume(path, lock, config, last, segs, pos)
            logger.warning("replacing the memory in %s (at lsn %d) with this one (%d edits)",
                           path, last, len(mem))
            return install(mem, path, lock, config, disk_last=last)
        return install(mem, path, lock, config)
    except BaseException:
        lock.release()
        raise
