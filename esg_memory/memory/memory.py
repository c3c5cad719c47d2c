"""`EditMemory`: the single source of truth for edits, their versions and their learned scopes.

The facade owns two locks and the committed state (`Committed`), and delegates the rest:
`EditEncoder` turns content into keys, `Plan` fits scopes on a copy-on-write overlay, `Router`
reads routing from the committed state, `Settler` runs the second phase of deletes, and the
persistence layer (`esg_memory.persist`) journals and snapshots. Every write is planned (encode,
find neighbours, re-fit exactly the affected edits), turned into one `Op` + `Change`, journaled,
and installed at once under a short lock, so a failure leaves the memory as it was and a concurrent
`route` sees the state before or after a write, never half of it. See `esg_memory.memory.plan` for
why scopes are a function of the current set of edits (which makes `delete` exact).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from index import UnitRows

from ..config import SETTLE_MODES, MemoryConfig, SettleMode
from ..errors import ConfigError, ImageError, InvalidInputError
from ..images import ImageLike, decode_image
from ..types import Conflict, Edit, EditVersion, FeedbackOutcome, RouteResult
from ..validate import check_encoder, route_rows, unit_keys
from .committed import Committed
from .encode import EditEncoder
from .inputs import lookup, revised, rolled_back, version_of
from .ops import Change
from .router import Router
from .state import EditState, MemorySnapshot
from .writer import Writer

__all__ = ["EditMemory"]

logger = logging.getLogger("esg_memory.memory")


class EditMemory:
    """Edits keyed by image+question, each with a learned scope; see the module docstring.

    ``locality_pool``: unrelated inputs every edit must *not* answer — a sequence of text strings
    or ``(image | None, text | None)`` pairs, or an ``(n, dim)`` array of precomputed keys; None uses
    a small built-in set of general questions. ``backend`` is the `ScopedIndex` backend used to
    shortlist candidates (scores are then recomputed exactly per key).
    """

    def __init__(
        self,
        encoder: Any,
        config: MemoryConfig | None = None,
        locality_pool: Any = None,
        *,
        backend: str = "flat",
    ) -> None:
        self._setup(encoder, config, backend)
        pool, blobs = self._encoding.pool(locality_pool)
        self._state.pool = pool
        self._state.blobs.update(blobs)

    def _setup(self, encoder: Any, config: MemoryConfig | None, backend: str) -> None:
        """The empty memory shared by `__init__` and `from_snapshot`."""
        check_encoder(encoder)
        if config is None:
            config = MemoryConfig()
        if not isinstance(config, MemoryConfig):
            raise ConfigError(f"config must be a MemoryConfig, not {type(config).__name__}")
        config.validate()
        self.encoder = encoder
        self._lock = threading.RLock()  # guards the committed state; held only briefly
        self._state = Committed(int(encoder.dim), config, backend)
        self._encoding = EditEncoder(encoder, config)
        self._router = Router(self._state, self._lock)
        self._writer = Writer(self._state, self._lock, self._encoding, self._router, self)
        self._loaded_from: tuple[str, str, int] | None = None  # (dir, lineage, lsn) loaded from

    @property
    def config(self) -> MemoryConfig:
        """How scopes are learned (frozen; saved with the memory)."""
        return self._state.config

    def set_settle(self, mode: SettleMode) -> None:
        """Change when deletes re-fit their holders (`MemoryConfig.settle`); settled routing is the same.

        Pending deletes are settled first, under the mode they were made in.
        """
        if mode not in SETTLE_MODES:
            raise ConfigError(f"settle must be one of {', '.join(SETTLE_MODES)}, not {mode!r}")

        def switch() -> None:
            self._state.config = replace(self._state.config, settle=mode)

        self._writer.when_settled(switch)

    # ------------------------------------------------------------------ snapshots
    @classmethod
    def from_snapshot(
        cls,
        snapshot: MemorySnapshot,
        *,
        replayed: Change | None = None,
        origin: tuple[str, str, int] | None = None,
        settle: bool = False,
    ) -> EditMemory:
        """A live memory holding ``snapshot`` (then ``replayed``, the journal written after it).

        ``settle``: finish deletes the journal left pending (a crash between a deferred delete and its
        settle record) now, in memory — the state a reader of the directory sees. ``origin``: the
        durable directory position that state equals (lets `make_durable` resume its journal).
        """
        mem = cls.__new__(cls)
        mem._setup(snapshot.encoder, snapshot.config, snapshot.backend)
        st = mem._state
        st.pool = snapshot.pool
        st.next_id = int(snapshot.next_id)
        st.retired = set(snapshot.retired)
        st.blobs = dict(snapshot.blobs)
        st.attachments = dict(snapshot.attachments)
        st.pending = dict(snapshot.pending)
        st.adopt(dict(snapshot.edits), snapshot.index)
        if replayed is not None:
            with mem._lock:
                st.install(replayed)
        if settle:
            mem.settle()  # no journal is attached yet: not journaled (replay redoes it the same)
        mem._writer.origin = mem._loaded_from = origin
        return mem

    def snapshot(
        self,
        *,
        settle: bool = True,
        index_dir: Path | None = None,
        while_locked: Callable[[], None] | None = None,
    ) -> MemorySnapshot:
        """A consistent copy of the whole memory (what `save` and compaction write).

        Taken under the writer lock, after settling pending deletes (unless ``settle=False``: then
        ``pending`` lists them): the containers are copied, the edit states shared (they are
        immutable). ``index_dir``: save the index there now and let the snapshot carry a stand-in
        that moves it into place (a background snapshot must not read the live index later).
        ``while_locked`` runs under the writer lock just before the copy (compaction starts its new
        journal segment there).
        """
        if not settle:
            return self._copy(index_dir, while_locked)
        if self._state.pending and getattr(self._writer.log, "readonly", False):
            # a read-only replica cannot log a settle: settle a copy in memory, as `load` does
            return self._settled_copy().snapshot(index_dir=index_dir, while_locked=while_locked)
        return self._writer.when_settled(lambda: self._copy(index_dir, while_locked))

    def _settled_copy(self) -> EditMemory:
        """A detached copy of this memory with its pending deletes settled (in memory, not journaled)."""
        import tempfile

        from index import ScopedIndex

        with tempfile.TemporaryDirectory(prefix="esg-settle-") as tmp:
            view = self._copy(Path(tmp) / "index", None)
            view = replace(view, index=ScopedIndex.load(Path(tmp) / "index"))  # not the live index
        return EditMemory.from_snapshot(view, settle=True)

    def _copy(self, index_dir: Path | None, while_locked: Callable[[], None] | None) -> MemorySnapshot:
        with self._writer.wlock:
            if while_locked is not None:
                while_locked()
            with self._lock:
                st = self._state
                index: Any = st.index
                if index_dir is not None:
                    st.index.save(index_dir)
                    index = _SavedIndex(index_dir)
                return MemorySnapshot(
                    encoder=self.encoder,
                    config=self.config,
                    backend=st.backend,
                    next_id=st.next_id,
                    retired=frozenset(st.retired),
                    pool=st.pool,
                    edits=dict(st.edits),
                    blobs=dict(st.blobs),
                    attachments=dict(st.attachments),
                    index=index,
                    pending=dict(st.pending),
                )

    # ------------------------------------------------------------------ writes (esg_memory.memory.writer)
    def set_commit_hook(self, hook: Callable[[dict[str, Any], Mapping[str, bytes]], None] | None) -> None:
        """Call ``hook(op, blobs)`` for every write after it is fully planned and before it is applied.

        ``op`` is a JSON-serialisable record of the call (images by sha256; ``blobs`` maps the new
        ones to their bytes). If the hook raises, the write is abandoned and the memory unchanged —
        the contract a write-ahead journal needs (append + fsync in the hook).
        """
        if hook is not None and not callable(hook):
            raise InvalidInputError("the commit hook must be callable or None")
        self._writer.hook = hook

    def add(
        self,
        image: ImageLike | None = None,
        question: str | None = None,
        answer: str | None = None,
        positives: Any = None,
        metadata: Mapping[str, Any] | None = None,
        edit_id: int | None = None,
        negatives: Any = None,
    ) -> int:
        """Add one edit; returns its id. Visible to the very next `route`. Failure changes nothing.

        ``positives`` must route here, ``negatives`` must not (texts keep the edit's image, images its
        question, or (image, text) pairs): both shape the learned scope, as feedback would.
        """
        spec = {
            "image": image,
            "question": question,
            "answer": answer,
            "positives": positives,
            "negatives": negatives,
            "metadata": metadata,
            "edit_id": edit_id,
        }
        return self.add_many([spec])[0]

    def add_many(
        self,
        edits: Sequence[Mapping[str, Any]],
        *,
        attachments: Callable[[int, str, str], Mapping[str, bytes]] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> list[int]:
        """Add several edits atomically (all or none) as one write (one journal record); returns their ids
        in order. Every edit is checked before anything is encoded.

        ``attachments(edit_id, question, answer) -> {kind: bytes}``: attachments of each new edit's first
        version (e.g. its compiled adapter, `esg_memory.bulk`), stored by the same write. ``progress()``
        is called once per edit as it is encoded.
        """
        return self._writer.add_many(edits, attachments, progress)

    def revise(
        self,
        edit_id: int,
        answer: str | None = None,
        question: str | None = None,
        image: ImageLike | None = None,
        positives: Any = None,
    ) -> int:
        """Correct an edit: a new version supersedes the current one; returns the new version number."""
        if answer is None and question is None and image is None and positives is None:
            raise InvalidInputError("revise needs at least one of answer, question, image, positives")

        def make(st: EditState, blobs: dict[str, bytes]) -> tuple[EditVersion, None]:
            return revised(st, blobs, self._state, answer, question, image, positives), None

        return self._writer.new_version(edit_id, make)

    def rollback(self, edit_id: int, version: int) -> int:
        """Make a new version equal to an old one (history stays append-only); returns its number."""

        def make(st: EditState, blobs: dict[str, bytes]) -> tuple[EditVersion, int]:
            # a rollback copies the old version's attachments (its adapter) to the new one
            return rolled_back(st, version), int(version)

        return self._writer.new_version(edit_id, make)

    def delete(self, edit_id: int) -> None:
        """Remove an edit exactly: neighbours get back the scope they would have without it.

        The edit stops routing at once. Its neighbours' re-fit is deferred unless
        ``config.settle == "sync"``: until `settle` (or the background settler, or the next write)
        they keep the scopes they had while it existed — see `esg_memory.memory.settle`.
        """
        self._writer.delete(edit_id)

    def feedback(
        self, image: ImageLike | None, text: str | None, expected_edit_id: int | None
    ) -> FeedbackOutcome:
        """Correct scopes from one observed input: it should route to ``expected_edit_id`` (or nowhere).

        Every other edit whose scope holds the input gets it as a negative (its thresholds tighten);
        if the expected edit misses it, it becomes a positive of that edit, which the re-fit adds as
        a key only when no negative falls inside the new ball.
        """
        return self._writer.feedback(image, text, expected_edit_id)

    def attach(self, edit_id: int, kind: str, data: bytes, version: int | None = None) -> None:
        """Store opaque bytes (e.g. a serialised adapter) for one version of an edit."""
        self._writer.attach(edit_id, kind, data, version)

    # ------------------------------------------------------------------ two-phase delete
    @property
    def pending_refits(self) -> Mapping[int, tuple[int, ...]]:
        """Deleted edits whose holders are not re-fitted yet: deleted id -> holder ids (read-only)."""
        with self._lock:
            holders = self._state.derived().holders
            return MappingProxyType(
                {d: tuple(sorted(holders.get(d, ()))) for d in sorted(self._state.pending)}
            )

    @property
    def last_settle_error(self) -> str | None:
        """Why the background settler last failed (the deletions then stay pending), or None."""
        return self._writer.settler.last_error

    def settle(self) -> None:
        """Re-fit the holders of every pending delete now; returns when nothing is pending.

        A no-op when nothing is pending. Raises what the re-fit's write raises (the journal's
        errors for a durable memory); the deletions then stay pending and are retried next time.
        """
        self._writer.settle()

    # ------------------------------------------------------------------ reads
    def get(self, edit_id: int) -> Edit:
        with self._lock:
            st = lookup(self._state.edits, edit_id)
        cur = st.current
        return Edit(
            id=st.id,
            version=cur.version,
            question=cur.question,
            answer=cur.answer,
            image=cur.image,
            positives=list(cur.positives),
            metadata=json.loads(json.dumps(st.metadata)),
            created_at=st.created_at,
            updated_at=st.updated_at,
            scope=list(cur.scope),
            uncovered=list(cur.uncovered),
            constrained_by=list(cur.constrained_by),
        )

    def list(self) -> list[Edit]:
        with self._lock:
            ids = sorted(self._state.edits)
        return [self.get(i) for i in ids]

    def history(self, edit_id: int) -> list[EditVersion]:
        if self._state.pending and getattr(self._writer.log, "readonly", False):
            return self._settled_copy().history(edit_id)  # a read-only replica cannot log a settle
        self.settle()  # a holder's current version records its scope: show the settled one
        with self._lock:
            st = lookup(self._state.edits, edit_id)
        return [v.copy() for v in st.versions]

    def holders(self, edit_id: int) -> tuple[int, ...]:
        """The edits whose scope this edit constrains (its neighbour set holds it), sorted."""
        with self._lock:
            st = lookup(self._state.edits, edit_id)
            return tuple(sorted(self._state.derived().holders.get(st.id, ())))

    def verify(self) -> None:
        """Check the memory's derived structures (neighbour holders, index keys, stored images) against
        a rebuild from its edit states; `InternalError` names the first that differs."""
        with self._lock:
            self._state.verify()

    def __len__(self) -> int:
        return len(self._state.edits)

    def __contains__(self, edit_id: object) -> bool:
        return (
            isinstance(edit_id, (int, np.integer))
            and not isinstance(edit_id, bool)
            and int(edit_id) in self._state.edits
        )

    def open_image(self, sha256: str) -> Image.Image:
        with self._lock:
            data = self._state.blobs.get(sha256) if isinstance(sha256, str) else None
        if data is None:
            raise ImageError(f"no stored image with sha256 {sha256!r}")
        return decode_image(data, f"stored image {sha256[:12]}")

    def image_bytes(self, sha256: str) -> bytes:
        """The stored bytes of an image (as given to the write that stored it), by sha256."""
        with self._lock:
            data = self._state.blobs.get(sha256) if isinstance(sha256, str) else None
        if data is None:
            raise ImageError(f"no stored image with sha256 {sha256!r}")
        return bytes(data)

    def keys_of(self, edit_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The edit's fitted keys (n, dim) and thresholds (n,) (copies)."""
        with self._lock:
            st = lookup(self._state.edits, edit_id)
            k, t = self._state.keys[st.id]
            return k.copy(), t.copy()

    def attachment(self, edit_id: int, kind: str, version: int | None = None) -> bytes | None:
        with self._lock:
            st = lookup(self._state.edits, edit_id)
            return self._state.attachments.get((st.id, version_of(st, version), kind))

    # ------------------------------------------------------------------ routing
    def route(
        self,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        *,
        keys: Any = None,
    ) -> RouteResult:
        """Route each input row to the in-scope edit with the largest margin, or -1."""
        return self._router.route(self.query_keys(images, texts, keys))[0]

    def route_ids(
        self,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        *,
        keys: Any = None,
    ) -> np.ndarray:
        """``route(...).edit_ids`` alone (int64, -1 = no edit), cheaper when most rows are out of scope."""
        return self._router.route_ids(self.query_keys(images, texts, keys))

    def query_keys(self, images: Any = None, texts: Any = None, keys: Any = None) -> UnitRows:
        """The checked unit keys `route` uses for these rows (encoded, or ``keys`` validated once)."""
        dim = int(self.encoder.dim)
        if keys is not None:
            if images is not None or texts is not None:
                raise InvalidInputError("pass either keys or images/texts, not both")
            if isinstance(keys, UnitRows) and keys.dim == dim:
                return keys  # validated already (an earlier query_keys or index.as_unit_rows)
            return unit_keys(keys, None, dim, "keys")
        ims, txs = route_rows(images, texts)
        return UnitRows.trusted(self._encoding.keys(ims, txs))

    def conflicts(self) -> list[Conflict]:
        """Pairs of edits with different answers whose scopes both hold some known input of either."""
        return self._router.conflicts()

    # ------------------------------------------------------------------ persistence (esg_memory.persist)
    def save(self, path: str | Path) -> None:
        """Write the memory to a directory atomically (see `esg_memory.persist.snapshot`).

        Into this durable memory's own directory: a compaction. Into another durable directory:
        replaces its content under its writer lock (`LockError` while a writer has it open).
        """
        from ..persist import durable, snapshot

        path = Path(path)
        if self.durable_path is not None and self.durable_path == path.resolve():
            self._writer.log.check_writable()
            self.compact()
        elif path.is_dir() and durable.is_durable(path):
            durable.save_into(self, path)
        else:
            with self._writer.wlock:  # no write moves the index while the snapshot is written
                snapshot.save_snapshot(self.snapshot(), path)

    @classmethod
    def load(cls, path: str | Path, encoder: Any = None, *, backend: str | None = None) -> EditMemory:
        """Load a directory written by `save` or `open` (snapshot + journal), without taking its lock.

        Refuses other encoders and damaged or newer files. Writes to the loaded memory stay in
        memory (use `open` for a durable writer).
        """
        from ..persist import durable

        return durable.load_any(cls, Path(path), encoder, backend)

    @classmethod
    def open(
        cls,
        path: str | Path,
        encoder: Any = None,
        *,
        backend: str | None = None,
        readonly: bool = False,
        journal: Any = None,
    ) -> EditMemory:
        """Open a memory directory durably: every write is journaled and fsynced before it returns.

        A missing or empty ``path`` with ``encoder`` creates a new memory there; a plain `save`
        directory is converted. Unless ``readonly``, takes the directory's writer lock (`LockError`
        naming the holder's pid). ``journal``: a `esg_memory.config.JournalConfig` (compaction).
        See `esg_memory.persist.durable` for the layout and crash safety. `close` (or ``with``) releases it.

        ``path`` may be a ``postgresql://`` URL: a memory shared by serving replicas (every write one
        transaction of the store's log; other replicas' writes applied as they land; ``journal``: a
        `esg_memory.config.StoreConfig`). See `esg_memory.replicas`.
        """
        from ..replicas.store import is_store_url

        if is_store_url(path):
            from ..replicas import open_store

            return open_store(cls, str(path), encoder, backend=backend, readonly=readonly, config=journal)
        from ..persist import durable

        return durable.open_durable(cls, Path(path), encoder, backend, readonly, journal)

    def make_durable(self, path: str | Path, journal: Any = None) -> None:
        """Start journaling this live memory into ``path`` (as if it had been `open`ed there).

        If ``path`` is the durable directory this memory was loaded from, unchanged since, the
        journal is resumed; otherwise ``path`` (missing, empty, plain or durable) is replaced by
        a snapshot of this memory. Takes the writer lock.
        """
        from ..persist import durable

        with self._writer.wlock:
            log = self._writer.log
            if log is not None and not log.closed:
                raise ConfigError(f"this memory is already durable at {log.path}")
            self._writer.settle_locked()
            self.set_journal(durable.attach_durable(self, Path(path), journal))

    def set_journal(self, log: Any) -> None:
        """Journal every write into ``log`` from now on (an `esg_memory.persist.Durable`; None stops).

        Used by `open` and `make_durable`; ``log`` must offer ``check_writable()``, ``log(op, change,
        attachment, stored_blobs) -> lsn``, ``abort(lsn)``, ``after_write(memory)``, ``closed`` and
        ``path`` (what a write-ahead log needs from a writer).
        """
        with self._writer.wlock:
            self._writer.log = log

    @property
    def journal(self) -> Any:
        """The durable journal this memory writes to (`esg_memory.persist.Durable`), or None."""
        return self._writer.log

    @property
    def origin(self) -> tuple[str, str, int] | None:
        """(directory, lineage, lsn) of the durable state this memory equals, None after any write."""
        return self._writer.origin

    @property
    def loaded_from(self) -> tuple[str, str, int] | None:
        """(directory, lineage, lsn) this memory was loaded from, kept after in-memory writes."""
        return self._loaded_from

    @property
    def durable_path(self) -> Path | None:
        """The directory this memory journals into, or None."""
        d = self._writer.log
        return None if d is None or d.closed or d.readonly or d.path is None else d.path.resolve()

    def sync(self) -> int:
        """Apply the writes other replicas appended to this memory's shared log; returns how many.

        A replica's follower thread calls it on every notification; a no-op for other memories.
        """
        return self._writer.sync()

    def compact(self) -> int:
        """Write a new snapshot of a durable memory and truncate its journal; returns its lsn."""
        log = self._writer.log
        if log is None:
            raise ConfigError("compact() needs a memory opened with EditMemory.open; use save()")
        log.wait()
        return log.compact(self)

    def close(self) -> None:
        """Finish background compaction, snapshot (see `JournalConfig.compact_on_close`), release the lock."""
        d = self._writer.log
        if d is not None:
            try:
                if not d.closed and not d.readonly:
                    self.settle()  # journaled now rather than redone by the next open
            finally:
                d.close(self)  # the lock (or the store's connections) released even if that failed

    def __enter__(self) -> EditMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EditMemory({len(self)} edits, encoder={getattr(self.encoder, 'name', '?')!r})"


class _SavedIndex:
    """Stands in for the index in a snapshot: it was already saved to ``src`` (moved into place)."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def save(self, path: Path) -> None:
        os.rename(self.src, path)
