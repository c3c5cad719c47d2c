"""Persistence of `EditMemory` (internals, mixed into the class): plain snapshots and durable mode.

Plain: `save` / `load` (`esg_memory.store`). Durable: `open` journals every write before it is
applied (`esg_memory.journal`, `esg_memory.durable`); `_log_write` is the single point every write
path (commit of a plan, `attach`) goes through after planning and before applying.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .memory import EditMemory

__all__ = ["PersistenceMixin"]


class PersistenceMixin:
    """`save`, `load`, `open`, `make_durable`, `compact`, `close` of `EditMemory`."""

    def _log_write(self, op: dict[str, Any] | None, blobs: dict[str, bytes], plan: Any = None,
                   attachment: bytes | None = None) -> int | None:
        """Hook, then journal (appended + fsynced) before a write is applied; raising abandons it."""
        if op is None:
            return None
        if self._durable is not None:
            self._durable._check()  # closed or read-only: refuse before the hook sees anything
        if self._commit_hook is not None:
            self._commit_hook(op, blobs)
        self._origin = None  # this state no longer equals the directory it was loaded from
        if self._durable is None:
            return None
        if attachment is not None:
            return self._durable.log_attach(op, attachment)
        return self._durable.log_commit(op, plan, blobs, self._blobs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the memory to a directory atomically (see `esg_memory.store`).

        Into this durable memory's own directory: a compaction. Into another durable directory:
        replaces its content under its writer lock (`LockError` while a writer has it open).
        """
        from . import durable as _d
        from .store import save_memory

        path = Path(path)
        self.settle()  # a snapshot holds settled scopes only (see esg_memory._memory_settle)
        if self._durable is not None and not self._durable.closed and self.durable_path == path.resolve():
            self._durable._check()
            self.compact()
        elif path.is_dir() and _d.is_durable(path):
            _d.save_into(self, path)
        else:
            with self._wlock, self._lock:
                save_memory(self, path)

    @classmethod
    def load(cls, path: str | Path, encoder: Any = None, *, backend: str | None = None) -> EditMemory:
        """Load a directory written by `save` or `open` (snapshot + journal), without taking its lock.

        Refuses other encoders and damaged or newer files. Writes to the loaded memory stay in
        memory (use `open` for a durable writer).
        """
        from .durable import is_durable, load_durable
        from .store import load_memory

        path = Path(path)
        if path.is_dir() and is_durable(path):
            return load_durable(cls, path, encoder, backend)[0]
        return load_memory(cls, path, encoder, backend)

    @classmethod
    def open(cls, path: str | Path, encoder: Any = None, *, backend: str | None = None,
             readonly: bool = False, journal: Any = None) -> EditMemory:
        """Open a memory directory durably: every write is journaled and fsynced before it returns.

        A missing or empty ``path`` with ``encoder`` creates a new memory there; a plain `save`
        directory is converted. Unless ``readonly``, takes the directory's writer lock (`LockError`
        naming the holder's pid). ``journal``: a `esg_memory.durable.JournalConfig` (compaction).
        See `esg_memory.durable` for the layout and crash safety. `close` (or ``with``) releases it.
        """
        from .durable import open_durable

        return open_durable(cls, Path(path), encoder, backend, readonly, journal)

    def make_durable(self, path: str | Path, journal: Any = None) -> None:
        """Start journaling this live memory into ``path`` (as if it had been `open`ed there).

        If ``path`` is the durable directory this memory was loaded from, unchanged since, the
        journal is resumed; otherwise ``path`` (missing, empty, plain or durable) is replaced by
        a snapshot of this memory. Takes the writer lock.
        """
        from .durable import attach_durable

        with self._wlock:
            if self._durable is not None and not self._durable.closed:
                raise ConfigError(f"this memory is already durable at {self._durable.path}")
            self._settle_locked()
            self._durable = attach_durable(self, Path(path), journal)

    @property
    def durable_path(self) -> Path | None:
        """The directory this memory journals into, or None."""
        d = self._durable
        return None if d is None or d.closed or d.readonly else d.path.resolve()

    def compact(self) -> int:
        """Write a new snapshot of a durable memory and truncate its journal; returns its lsn."""
        if self._durable is None:
            raise ConfigError("compact() needs a memory opened with EditMemory.open; use save()")
        self._durable.wait()
        return self._durable.compact(self)

    def close(self) -> None:
        """Finish background compaction, snapshot (see `JournalConfig.compact_on_close`), release the lock."""
        d = self._durable
        if d is not None:
            if not d.closed and not d.readonly:
                self.settle()  # journaled now rather than redone by the next open
            d.close(self)

    def __enter__(self) -> EditMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
