"""Durable edit-memory directories: snapshot + write-ahead journal + writer lock.

Layout of a durable directory ``P``::

    P/writer.lock          flock'ed by the one writer; holds its pid
    P/snapshot/            a plain `EditMemory.save` directory whose memory.json records
                           ``journal: {lsn, lineage}``: the last journal record it holds
    P/journal/<lsn>.wal    journal segments (`esg_memory.journal`), named by their first lsn

The lock file and the journal live *beside* the snapshot, never inside it, because a compaction
swaps ``P/snapshot`` as a whole (`index._fs.atomic_directory`). Compaction, step by step, with
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
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from index import fsync_dir, read_regular_file, recover_dir

from .config import JournalConfig
from .errors import ConfigError, FormatError, LockError
from .journal import (
    JournalWriter,
    encode_abort,
    encode_attach,
    encode_commit,
    list_segments,
    live_records,
    read_journal,
)
from .journal import replay as _replay

if TYPE_CHECKING:
    from .memory import EditMemory

__all__ = [
    "Durable",
    "JournalConfig",
    "WriterLock",
    "attach_durable",
    "install",
    "is_durable",
    "load_durable",
    "open_durable",
    "save_into",
]

logger = logging.getLogger("esg_memory.durable")

SNAPSHOT = "snapshot"
JOURNAL = "journal"
_PLAIN_FILES = ("memory.json", "keys.safetensors", "blobs", "attachments", "index")


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


def load_durable(cls: type[EditMemory], path: Path, encoder: Any, backend: str | None, *, attempts: int = 20,
                 settle: bool = True):
    """(memory, last lsn, parsed segments, snapshot journal position) of a durable directory.

    ``settle``: finish, in memory, the deletes the journal left pending (a crash between a deferred
    delete and its settle record); a writer passes False and settles them journaled once it holds
    the journal.
    """
    from .store import load_memory

    for attempt in range(attempts):
        snap = path / SNAPSHOT
        if not snap.is_dir():  # a compaction between its two renames
            snap = path / f"{SNAPSHOT}.old"
        ident = _ident(snap)
        try:
            mem = load_memory(cls, snap, encoder, backend)
            pos = mem._snapshot_journal
            if pos is None:
                raise FormatError(f"{snap}: a durable snapshot must record its journal position")
            records, segs = read_journal(path / JOURNAL, pos["lsn"])
            _replay(mem, live_records(records))
            if settle:
                mem.settle()  # not journaled: no journal is attached yet; replay redoes it the same
            last = records[-1][0] if records else pos["lsn"]
            mem._origin = mem._loaded_from = (str(path.resolve()), pos["lineage"], last)
            if records:
                logger.info("replayed %d journal records onto %s", len(records), snap)
            return mem, last, segs, pos
        except (FormatError, OSError) as e:
            # a compaction swapped the snapshot (and may have dropped the segments it held) under us
            moved = _ident(path / SNAPSHOT) != ident
            if not moved or attempt == attempts - 1:
                if isinstance(e, OSError) and not isinstance(e, FormatError):
                    raise FormatError(f"{path}: unreadable ({e})") from None
                raise
            time.sleep(0.01 * (attempt + 1))  # a compaction is swapping files: read again
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ writer
class _MovedIndex:
    """Stands in for the index in a captured state: it was already saved to ``src``."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def save(self, path: Path) -> None:
        os.rename(self.src, path)


class Durable:
    """The journal side of an open durable memory (``EditMemory._durable``)."""

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

    def _check(self) -> JournalWriter:
        if self.closed:
            raise ConfigError(f"this memory was closed ({self.path}); reopen it with EditMemory.open")
        if self.writer is None:
            raise ConfigError(f"{self.path} was opened read-only")
        return self.writer

    # -- called by EditMemory under its writer lock, before a write is applied
    def log_commit(self, op: dict[str, Any], plan: Any, blobs: dict[str, bytes],
                   known: dict[str, bytes]) -> int:
        w = self._check()
        new = {sha: data for sha, data in blobs.items() if sha not in known}
        return w.append(encode_commit(op, plan.over, set(plan.changed_vec), new))

    def log_attach(self, op: dict[str, Any], data: bytes) -> int:
        return self._check().append(encode_attach(op, data))

    def abort(self, lsn: int) -> None:
        w = self._check()
        try:
            w.append(encode_abort(lsn))
        except BaseException as e:
            w.broken = f"record {lsn} could not be applied nor voided ({type(e).__name__}: {e})"
            raise

    def after_write(self, mem: EditMemory) -> None:
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

    def _background(self, mem: EditMemory) -> None:
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
    def compact(self, mem: EditMemory, blocking: bool = True) -> int | None:
        """Snapshot + truncate the journal (see the module docstring); returns the snapshot's lsn.

        Lock order: the compaction mutex, then the memory's writer lock. ``blocking=False`` (used
        by a writer that already holds the writer lock) skips when another compaction runs.
        """
        self._check()
        if not self._compact_mutex.acquire(blocking=blocking):
            return None
        try:
            with mem._wlock:
                mem._settle_locked()  # a snapshot holds no pending delete (its record precedes it)
                w = self._check()
                lsn = w.next_lsn - 1
                w.rotate()
                view = self._capture(mem, lsn)
            try:
                self._write_snapshot(view, lsn)
            finally:
                shutil.rmtree(self.path / f".compact-{lsn}.index", ignore_errors=True)
            self._drop_segments_before(lsn + 1)
            self.compactions += 1
            self.last_compact_error = None
            return lsn
        finally:
            self._compact_mutex.release()

    def _capture(self, mem: EditMemory, lsn: int) -> SimpleNamespace:
        tmp_index = self.path / f".compact-{lsn}.index"
        shutil.rmtree(tmp_index, ignore_errors=True)
        mem._index.save(tmp_index)
        return SimpleNamespace(
            encoder=mem.encoder, config=mem.config, _backend=mem._backend, _next_id=mem._next_id,
            _retired=set(mem._retired), _pool=mem._pool, _pool_images=list(mem._pool_images),
            _pool_image_vecs=mem._pool_image_vecs, _edits=dict(mem._edits), _blobs=dict(mem._blobs),
            _attachments=dict(mem._attachments), _index=_MovedIndex(tmp_index),
        )

    def _write_snapshot(self, view: Any, lsn: int) -> None:
        from .store import save_memory

        t0 = time.perf_counter()
        save_memory(view, self.path / SNAPSHOT, journal={"lsn": lsn, "lineage": self.lineage})
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

    def close(self, mem: EditMemory) -> None:
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


def install(mem: EditMemory, path: Path, lock: WriterLock, config: JournalConfig,
            disk_last: int = 0) -> Durable:
    """Make ``path`` hold ``mem`` (snapshot at lsn ``disk_last``, empty journal after it); lock held."""
    from .store import save_memory

    jdir = path / JOURNAL
    if not is_durable(path):
        shutil.rmtree(jdir, ignore_errors=True)  # a conversion cut short
    writer = JournalWriter(jdir, None, disk_last + 1)
    lineage = uuid.uuid4().hex
    try:
        with mem._wlock:
            save_memory(mem, path / SNAPSHOT, journal={"lsn": disk_last, "lineage": lineage})
    except BaseException:
        writer.close()
        raise
    d = Durable(path, lock, writer, lineage, disk_last, config)
    d._drop_segments_before(disk_last + 1)
    _clean(path)
    logger.info("%s now holds a durable memory of %d edits", path, len(mem))
    return d


def _resume(mem: EditMemory, path: Path, lock: WriterLock, config: JournalConfig, last: int, segs: list,
            pos: dict) -> Durable:
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


def open_durable(cls: type[EditMemory], path: Path, encoder: Any, backend: str | None, readonly: bool,
                 config: JournalConfig | None) -> EditMemory:
    """`EditMemory.open` (see there)."""
    config = _config(config)
    if readonly:
        if not is_durable(path):
            from .store import load_memory

            mem = load_memory(cls, path, encoder, backend)
        else:
            mem = load_durable(cls, path, encoder, backend)[0]
        mem._durable = Durable(path, None, None, "", 0, config)
        return mem
    _refuse_foreign(path)
    if encoder is None and not path.exists():
        raise ConfigError(f"{path} holds no memory yet; pass encoder= to create one")
    lock = WriterLock(path).acquire()
    try:
        if is_durable(path):
            _clean(path)
            mem, last, segs, pos = load_durable(cls, path, encoder, backend, attempts=1, settle=False)
            mem._durable = _resume(mem, path, lock, config, last, segs, pos)
            mem.settle()  # a crash left deletes pending: their settle record is written now
        else:
            mem = _fresh_or_plain(cls, path, encoder, backend)
            mem._durable = install(mem, path, lock, config)
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


def _fresh_or_plain(cls: type[EditMemory], path: Path, encoder: Any, backend: str | None) -> EditMemory:
    from .store import load_memory

    if (path / "memory.json").is_file():
        logger.info("converting the plain memory directory %s to a durable one", path)
        return load_memory(cls, path, encoder, backend)
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


def _refuse_stale(mem: EditMemory, path: Path, pos: dict[str, Any], last: int) -> None:
    """Writing a copy loaded from ``path`` back over it is refused if another writer moved it on since."""
    loaded = getattr(mem, "_loaded_from", None)
    if loaded is not None and loaded[0] == str(path.resolve()) and loaded[1:] != (pos["lineage"], last):
        raise LockError(
            f"{path} was changed by another writer since this memory was loaded from it (journal at lsn "
            f"{last}, loaded at {loaded[2]}); load it again instead of overwriting those writes"
        )


def save_into(mem: EditMemory, path: Path) -> None:
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


def attach_durable(mem: EditMemory, path: Path, config: JournalConfig | None) -> Durable:
    """Make a live (non-durable) memory durable at ``path`` (see `EditMemory.make_durable`)."""
    config = _config(config)
    _refuse_foreign(path)
    lock = WriterLock(path).acquire()
    try:
        if is_durable(path):
            _clean(path)
            pos, last, segs = _disk_position(path)
            _refuse_stale(mem, path, pos, last)
            if mem._origin == (str(path.resolve()), pos["lineage"], last):
                return _resume(mem, path, lock, config, last, segs, pos)
            logger.warning("replacing the memory in %s (at lsn %d) with this one (%d edits)",
                           path, last, len(mem))
            return install(mem, path, lock, config, disk_last=last)
        return install(mem, path, lock, config)
    except BaseException:
        lock.release()
        raise
