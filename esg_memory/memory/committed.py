"""`Committed`: the memory's committed state, and the one place a `Change` is installed into it.

A live write, a journal replay and (later) a change read from a shared log all end in
`Committed.install`; nothing else mutates this state. The owner (`EditMemory`) holds its state
lock around every call that mutates or reads more than one field, so a reader sees the state
before or after a write, never half of one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from index import ScopedIndex
from index.errors import DuplicateIdError, IndexFormatError, ScopedIndexError, UnknownIdError

from ..config import MemoryConfig
from ..errors import (
    DuplicateEditError,
    EsgMemoryError,
    FormatError,
    InternalError,
    InvalidInputError,
    UnknownEditError,
)
from .ops import Change, CopyAttachments, DropAttachments, SetAttachment
from .state import Derived, EditState, LocalityPool, blobs_of
from .tables import CrossCache, NeighbourTable

__all__ = ["Committed", "translate_index_error"]

logger = logging.getLogger("esg_memory.memory")


def translate_index_error(e: ScopedIndexError) -> EsgMemoryError:
    """The `EsgMemoryError` a user of the memory sees for an error of its index."""
    msg = f"index: {e}"
    if isinstance(e, DuplicateIdError):
        return DuplicateEditError(msg)
    if isinstance(e, UnknownIdError):
        return UnknownEditError(msg)
    if isinstance(e, IndexFormatError):
        return FormatError(msg)
    return InvalidInputError(msg)


class Committed:
    """Edit states, images, attachments, ids, deferred deletes, the pool and the structures built on them.

    ``index`` holds every edit's fitted keys (what routing searches); ``table`` every edit's candidate
    vectors (the neighbour pre-filter); ``keys`` per edit (keys, thresholds) for exact scoring;
    ``crosses`` the cross hard-negative blocks still in use; `derived` the holders / bars / image
    reference indexes over the states (rebuilt on first use after a load).
    """

    def __init__(self, dim: int, config: MemoryConfig, backend: str) -> None:
        self.dim = dim
        self.config = config
        self.backend = backend
        self.edits: dict[int, EditState] = {}
        self.blobs: dict[str, bytes] = {}
        self.attachments: dict[tuple[int, int, str], bytes] = {}
        self.retired: set[int] = set()
        self.next_id = 0
        self.pending: dict[int, str | None] = {}  # deferred deletes: id -> answer, holders not re-fitted
        self.pool = LocalityPool.empty(dim)
        self.keys: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.table = NeighbourTable(dim)
        self.crosses = CrossCache()
        self._derived: tuple[dict[int, EditState], Derived] | None = None
        try:
            self.index = ScopedIndex(dim, backend=backend)
        except ScopedIndexError as e:
            raise translate_index_error(e) from None

    # ------------------------------------------------------------------ derived structures
    def derived(self) -> Derived:
        """Holders / bars / blob references of the committed states, built on first use."""
        d = self._derived
        if d is None or d[0] is not self.edits:  # a load installs a new dict: rebuild from it
            d = (self.edits, Derived(self.edits, self.config.max_neighbours))
            self._derived = d
        return d[1]

    def adopt(self, edits: dict[int, EditState], index: ScopedIndex) -> None:
        """Take loaded states and the index that holds their keys (a load, not a write)."""
        self.edits = edits
        self.index = index
        self.keys = {eid: (st.keys, st.fit.thresholds) for eid, st in edits.items()}
        self.table = NeighbourTable(self.dim)
        for eid, st in edits.items():
            self.table.add(eid, st.vec.cand)

    def verify(self) -> None:
        """`InternalError` unless every derived structure equals a rebuild from the edit states."""
        tracked = self.derived()
        fresh = Derived(self.edits, self.config.max_neighbours)
        for name in ("holders", "bars", "blob_refs"):
            if getattr(tracked, name) != getattr(fresh, name):
                raise InternalError(f"tracked {name} differ from a rebuild from the edit states")
        for eid, st in self.edits.items():
            k, t = self.index.keys_of(eid)
            if not np.array_equal(t, st.fit.thresholds) or not np.allclose(k, st.keys, atol=1e-6):
                raise InternalError(f"index keys of edit {eid} differ from its state")
        if sorted(int(i) for i in self.index.edit_ids()) != sorted(self.edits):
            raise InternalError("the index holds other edits than the states")
        orphans = set(self.blobs) - set(fresh.blob_refs) - set(self.pool.images)
        if orphans:
            raise InternalError(f"{len(orphans)} stored images no edit refers to")

    def rebuild_index(self, backend: str | None = None) -> None:
        """A fresh index of every edit's keys (after a failed index update, or to change backend)."""
        ix = ScopedIndex(self.dim, backend=backend or self.backend)
        for eid in sorted(self.edits):
            st = self.edits[eid]
            ix.add(np.full(len(st.fit.key_index), eid, dtype=np.int64), st.keys, st.fit.thresholds)
        ix.prepare_rule_out()  # not in the first routed call
        self.index = ix

    # ------------------------------------------------------------------ the one mutation
    def install(self, change: Change) -> None:
        """Install a planned, replayed or received write (caller holds the state lock).

        The index is updated first: if it refuses, it is rebuilt from the unchanged states and
        nothing else moved. An edit whose fit and vectors are unchanged keeps its index rows.
        """
        old = {eid: self.edits.get(eid) for eid in change.states}
        try:
            for eid in sorted(change.states):
                new, prev = change.states[eid], old[eid]
                if new is None:
                    if prev is not None:
                        self.index.remove(np.asarray([eid], dtype=np.int64))
                    continue
                if (
                    prev is not None
                    and prev.fit is not None
                    and eid not in change.changed_vec
                    and prev.fit.same_as(new.fit)
                ):
                    continue
                if prev is not None:
                    self.index.remove(np.asarray([eid], dtype=np.int64))
                n = len(new.fit.key_index)
                self.index.add(np.full(n, eid, dtype=np.int64), new.keys, new.fit.thresholds)
        except ScopedIndexError as e:
            self.rebuild_index()
            raise translate_index_error(e) from None
        except BaseException:
            self.rebuild_index()
            raise
        derived = self._derived[1] if self._derived and self._derived[0] is self.edits else None
        for eid, new in change.states.items():
            if derived is not None:
                derived.replace(self.edits.get(eid), new)
            if new is None:
                self.edits.pop(eid, None)
                self.keys.pop(eid, None)
                self.table.remove(eid)
            else:
                self.edits[eid] = new
                self.keys[eid] = (new.keys, new.fit.thresholds)
                if eid in change.changed_vec:
                    self.table.remove(eid)
                    self.table.add(eid, new.vec.cand)
        gone = set(change.changed_vec) | {e for e, s in change.states.items() if s is None}
        for k in self.crosses.pairs_of(gone):
            del self.crosses[k]
        self.crosses.update(dict(change.new_cross))
        for k in self.crosses.pairs_of(set(change.states)):
            # Keep a cross pair only while one side still crosses the other (bounded cache).
            if not (self._crossed(*k) or self._crossed(k[1], k[0])):
                del self.crosses[k]
        self.blobs.update(change.blobs)
        self._book(change)
        # Images are orphaned only by deletes: check those of the deleted states and the new ones (a
        # replayed run of writes may store an image for an edit it also deletes).
        orphans = [
            sha
            for st in old.values()
            if st is not None and change.states[st.id] is None
            for sha in blobs_of(st)
        ]
        self.gc_blobs([*orphans, *change.blobs])
        if change.refit_log:
            logger.info("re-fitted edits %s", sorted(set(change.refit_log)))

    def _book(self, change: Change) -> None:
        fx = change.effects
        if fx.next_id is not None:
            self.next_id = max(self.next_id, fx.next_id)
        self.retired |= fx.retired
        atts = self.attachments
        for a in fx.attachments:
            if isinstance(a, SetAttachment):
                atts[(a.edit_id, a.version, a.kind)] = a.data
            elif isinstance(a, CopyAttachments):
                for (e, ver, kind), data in list(atts.items()):
                    if e == a.edit_id and ver == a.source:
                        atts[(e, a.target, kind)] = data
            elif isinstance(a, DropAttachments):
                for k in [k for k in atts if k[0] == a.edit_id]:
                    del atts[k]
        for eid in fx.settled:
            self.pending.pop(eid, None)
        self.pending.update(fx.pending)

    def _crossed(self, a: int, b: int) -> bool:
        st = self.edits.get(a)
        if st is None or b not in st.nbrs:
            return False
        ranked = sorted(st.nbrs.items(), key=lambda kv: (-kv[1], kv[0]))[: self.config.neighbour_k]
        return any(n == b for n, _ in ranked)

    def gc_blobs(self, candidates: Iterable[str] | None = None) -> None:
        """Drop stored images that neither an edit nor the locality pool refers to any more.

        ``candidates``: the only images that can have lost their last reference; None checks every
        stored image. Both give the same store when the candidates are complete.
        """
        refs = self.derived().blob_refs
        pool = set(self.pool.images)
        shas = list(self.blobs) if candidates is None else set(candidates)
        for sha in shas:
            if sha in self.blobs and sha not in refs and sha not in pool:
                del self.blobs[sha]
