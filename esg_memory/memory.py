"""`EditMemory`: the single source of truth for edits, their versions and their learned scopes.

Every write (add, revise, rollback, feedback, delete) is planned on a copy-on-write overlay of
the edit states — encode, find neighbours, re-fit exactly the affected edits — and committed at
once under a short lock, so a failure leaves the memory as it was and a concurrent `route` sees
either the state before or after a write, never half of it. See `_memory_state` for why scopes
are a function of the current set of edits (which makes `delete` exact).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from index import ScopedIndex
from index.errors import ScopedIndexError

from ._memory_encode import EncodingMixin
from ._memory_feedback import FeedbackMixin
from ._memory_inputs import InputsMixin
from ._memory_persist import PersistenceMixin
from ._memory_route import RoutingMixin
from ._memory_settle import SettleMixin, WriterMutex
from ._memory_state import Derived, EditState, Plan
from ._memory_util import CrossCache, NeighbourTable, translate_index_error
from .config import MemoryConfig
from .errors import (
    ConfigError,
    ImageError,
    InvalidInputError,
    VersionError,
)
from .images import ImageLike
from .types import Edit, EditVersion, RouteResult
from .validate import MAX_TEXT_CHARS, check_encoder, check_keys, check_text, route_rows

__all__ = ["MAX_TEXT_CHARS", "EditMemory"]

logger = logging.getLogger("esg_memory.memory")


class EditMemory(EncodingMixin, InputsMixin, RoutingMixin, FeedbackMixin, PersistenceMixin, SettleMixin):
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
        self._init_state(encoder, config, backend)
        self._pool, self._pool_images = self._encode_pool(locality_pool)

    def _init_state(self, encoder: Any, config: MemoryConfig | None, backend: str) -> None:
        """Empty state shared by `__init__` and `load` (which fills it from disk)."""
        check_encoder(encoder)
        if config is None:
            config = MemoryConfig()
        if not isinstance(config, MemoryConfig):
            raise ConfigError(f"config must be a MemoryConfig, not {type(config).__name__}")
        config.validate()
        self.encoder = encoder
        self.config = config
        self._backend = backend
        self._wlock = WriterMutex()  # serialises writers (planning + commit); reentrant
        self._lock = threading.RLock()  # guards the committed state; held only briefly
        self._edits: dict[int, EditState] = {}
        self._blobs: dict[str, bytes] = {}
        self._attachments: dict[tuple[int, int, str], bytes] = {}
        self._retired: set[int] = set()
        self._next_id = 0
        self._crosses = CrossCache()
        self._table = NeighbourTable(int(encoder.dim))
        self._keys: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._derived: tuple[dict[int, EditState], Derived] | None = None  # see _derived_index
        self._commit_hook: Callable[[dict[str, Any], Mapping[str, bytes]], None] | None = None
        self._durable: Any = None  # esg_memory.durable.Durable while opened durably
        self._origin: tuple[str, str, int] | None = None  # (dir, lineage, lsn) this state was loaded from
        self._loaded_from: tuple[str, str, int] | None = None  # the same, kept after in-memory writes
        self._snapshot_journal: dict[str, Any] | None = None
        self._init_settle()
        self._pool = np.zeros((0, int(encoder.dim)), dtype=np.float32)
        self._pool_images: list[str] = []
        self._pool_image_vecs = np.zeros((0, int(encoder.dim)), dtype=np.float32)
        try:
            self._index = ScopedIndex(int(encoder.dim), backend=backend)
        except ScopedIndexError as e:
            raise translate_index_error(e) from None

    # ------------------------------------------------------------------ planning / commit
    def _plan(self, blobs: dict[str, bytes] | None = None) -> Plan:
        return Plan(
            self._edits,
            self._pool,
            self.config,
            self._encode_cross,
            self._crosses,
            {} if blobs is None else blobs,
            self._table.view(),
            self._derived_index(),
        )

    def _derived_index(self) -> Derived:
        """Holders / bars / blob references of the committed states, built on first use."""
        d = self._derived
        if d is None or d[0] is not self._edits:  # a load installs a new dict: rebuild from it
            d = (self._edits, Derived(self._edits, self.config.max_neighbours))
            self._derived = d
        return d[1]

    def set_commit_hook(self, hook: Callable[[dict[str, Any], Mapping[str, bytes]], None] | None) -> None:
        """Call ``hook(op, blobs)`` for every write after it is fully planned and before it is applied.

        ``op`` is a JSON-serialisable record of the call (images by sha256; ``blobs`` maps the new
        ones to their bytes). If the hook raises, the write is abandoned and the memory unchanged —
        the contract a write-ahead journal needs (append + fsync in the hook).
        """
        if hook is not None and not callable(hook):
            raise InvalidInputError("the commit hook must be callable or None")
        self._commit_hook = hook

    def _commit(self, plan: Plan, blobs: Mapping[str, bytes] = (), after=None, op=None) -> None:
        lsn = self._log_write(op, dict(blobs), plan=plan)
        try:
            self._apply(plan, blobs, after)
        except BaseException:
            if lsn is not None:
                self._durable.abort(lsn)  # journaled but not applied: void the record
            raise
        if lsn is not None:
            self._durable.after_write(self)

    def _apply(self, plan: Any, blobs: Mapping[str, bytes] = (), after=None) -> None:
        """Install a planned (or replayed) write under the state lock."""
        with self._lock:
            old = {eid: self._edits.get(eid) for eid in plan.over}
            try:
                for eid in sorted(plan.over):
                    new, prev = plan.over[eid], old[eid]
                    if new is None:
                        if prev is not None:
                            self._index.remove(np.asarray([eid], dtype=np.int64))
                        continue
                    if (
                        prev is not None
                        and prev.fit is not None
                        and eid not in plan.changed_vec
                        and prev.fit.same_as(new.fit)
                    ):
                        continue
                    if prev is not None:
                        self._index.remove(np.asarray([eid], dtype=np.int64))
                    n = len(new.fit.key_index)
                    self._index.add(np.full(n, eid, dtype=np.int64), new.keys, new.fit.thresholds)
            except ScopedIndexError as e:
                self._rebuild_index()
                raise translate_index_error(e) from None
            except BaseException:
                self._rebuild_index()
                raise
            derived = self._derived[1] if self._derived and self._derived[0] is self._edits else None
            for eid, new in plan.over.items():
                if derived is not None:
                    derived.replace(self._edits.get(eid), new)
                if new is None:
                    self._edits.pop(eid, None)
                    self._keys.pop(eid, None)
                    self._table.remove(eid)
                else:
                    self._edits[eid] = new
                    self._keys[eid] = (new.keys, new.fit.thresholds)
                    if eid in plan.changed_vec:
                        self._table.remove(eid)
                        self._table.add(eid, new.vec.cand)
            gone = plan.changed_vec | {e for e, s in plan.over.items() if s is None}
            for k in self._crosses.pairs_of(gone):
                del self._crosses[k]
            self._crosses.update(plan.new_cross)
            touched = set(plan.over)
            for k in self._crosses.pairs_of(touched):
                # Keep a cross pair only while one side still crosses the other (bounded cache).
                if not (self._crossed(*k) or self._crossed(k[1], k[0])):
                    del self._crosses[k]
            self._blobs.update(blobs)
            if after is not None:
                after()
        if plan.refit_log:
            logger.info("re-fitted edits %s", sorted(set(plan.refit_log)))

    def _crossed(self, a: int, b: int) -> bool:
        st = self._edits.get(a)
        if st is None or b not in st.nbrs:
            return False
        ranked = sorted(st.nbrs.items(), key=lambda kv: (-kv[1], kv[0]))[: self.config.neighbour_k]
        return any(n == b for n, _ in ranked)

    def _rebuild_index(self) -> None:
        ix = ScopedIndex(int(self.encoder.dim), backend=self._backend)
        for eid in sorted(self._edits):
            st = self._edits[eid]
            ix.add(np.full(len(st.fit.key_index), eid, dtype=np.int64), st.keys, st.fit.thresholds)
        ix.prepare_rule_out()  # not in the first routed call
        self._index = ix

    # ------------------------------------------------------------------ writes
    def add(
        self,
        image: ImageLike | None = None,
        question: str | None = None,
        answer: str | None = None,
        positives: Any = None,
        metadata: Mapping[str, Any] | None = None,
        edit_id: int | None = None,
    ) -> int:
        """Add one edit; returns its id. Visible to the very next `route`. Failure changes nothing."""
        return self.add_many(
            [
                {
                    "image": image,
                    "question": question,
                    "answer": answer,
                    "positives": positives,
                    "metadata": metadata,
                    "edit_id": edit_id,
                }
            ]
        )[0]

    def add_many(self, edits: Sequence[Mapping[str, Any]]) -> list[int]:
        """Add several edits atomically (all or none); returns their ids in order."""
        if isinstance(edits, (str, bytes, Mapping)) or not isinstance(edits, Iterable):
            raise InvalidInputError("add_many takes a list of dicts")
        edits = list(edits)
        allowed = {"image", "question", "answer", "positives", "metadata", "edit_id"}
        with self._wlock:
            self._settle_locked()
            blobs: dict[str, bytes] = {}
            taken: set[int] = set()
            specs = []
            now = time.time()
            for j, spec in enumerate(edits):
                if not isinstance(spec, Mapping):
                    raise InvalidInputError(f"edits[{j}] must be a dict")
                unknown = set(spec) - allowed
                if unknown:
                    raise InvalidInputError(f"edits[{j}] has unknown fields {sorted(unknown)}")
                q = check_text(spec.get("question"), "question")
                a = check_text(spec.get("answer"), "answer")
                sha = self._image(spec.get("image"), blobs)
                pos = self._positives(spec.get("positives"), blobs)
                meta = self._metadata(spec.get("metadata"))
                eid = self._new_id(spec.get("edit_id"), taken)
                taken.add(eid)
                v = EditVersion(
                    version=1, question=q, answer=a, image=sha, positives=pos, created_at=now, reason="add"
                )
                specs.append((eid, v, meta))
            plan = self._plan(blobs)
            affected: set[int] = set()
            for eid, v, meta in specs:
                vec = self._encode_version(v, blobs)
                st = EditState(
                    id=eid, created_at=now, updated_at=now, metadata=meta, versions=(v,), vec=vec, fit=None
                )
                affected |= plan.set_vectors(st, self._table.view())
            plan.refit_all(affected)
            ids = [eid for eid, _, _ in specs]

            def bump() -> None:
                self._next_id = max([self._next_id, *(i + 1 for i in ids)])

            op = {
                "op": "add_many",
                "time": now,
                "edits": [
                    {
                        "edit_id": eid,
                        "question": v.question,
                        "answer": v.answer,
                        "image": v.image,
                        "positives": [p.to_dict() for p in v.positives],
                        "metadata": meta,
                    }
                    for eid, v, meta in specs
                ],
            }
            self._commit(plan, blobs, after=bump, op=op)
            logger.info("added edits %s; re-fitted neighbours %s", ids, sorted(affected - set(ids)))
            return ids

    def _new_version(self, eid: int, make) -> int:
        with self._wlock:
            self._settle_locked()
            st = self._state(eid)
            blobs: dict[str, bytes] = {}
            v, attach_from = make(st, blobs)
            now = time.time()
            plan = self._plan(blobs)
            new = replace(st, versions=(*st.versions, v), updated_at=now, vec=self._encode_version(v, blobs))
            affected = plan.set_vectors(new, self._table.view())
            plan.refit_all(affected)

            def copy_attachments() -> None:
                if attach_from is not None:
                    for (e, ver, kind), data in list(self._attachments.items()):
                        if e == eid and ver == attach_from:
                            self._attachments[(eid, v.version, kind)] = data

            op = {
                "op": "new_version",
                "edit_id": st.id,
                "version": v.to_dict(),
                "attachments_from": attach_from,
            }
            self._commit(plan, blobs, after=copy_attachments, op=op)
            return v.version

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

        def make(st: EditState, blobs: dict[str, bytes]):
            cur = st.current
            q = cur.question if question is None else check_text(question, "question")
            a = cur.answer if answer is None else check_text(answer, "answer")
            sha = cur.image if image is None else self._image(image, blobs)
            pos = list(cur.positives) if positives is None else self._positives(positives, blobs)
            # Feedback was about this subject; a new image or question is a new subject.
            fb = list(cur.feedback) if (q == cur.question and sha == cur.image) else []
            return EditVersion(
                version=cur.version + 1,
                question=q,
                answer=a,
                image=sha,
                positives=pos,
                created_at=time.time(),
                reason="revise",
                feedback=fb,
            ), None

        return self._new_version(edit_id, make)

    def rollback(self, edit_id: int, version: int) -> int:
        """Make a new version equal to an old one (history stays append-only); returns its number."""

        def make(st: EditState, blobs: dict[str, bytes]):
            if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
                raise VersionError(f"version must be an int, not {type(version).__name__}")
            old = next((v for v in st.versions if v.version == int(version)), None)
            if old is None:
                raise VersionError(
                    f"edit {st.id} has no version {version} (versions 1..{st.current.version})"
                )
            nv = replace(
                old.copy(),
                version=st.current.version + 1,
                created_at=time.time(),
                reason=f"rollback to v{int(version)}",
                scope=[],
                uncovered=[],
                constrained_by=[],
            )
            return nv, int(version)

        return self._new_version(edit_id, make)

    def delete(self, edit_id: int) -> None:
        """Remove an edit exactly: neighbours get back the scope they would have without it.

        The edit stops routing at once. Its neighbours' re-fit is deferred unless
        ``config.settle == "sync"``: until `settle` (or the background settler, or the next write)
        they keep the scopes they had while it existed — see `esg_memory._memory_settle`.
        """
        with self._wlock:
            st = self._state(edit_id)
            if self._delete_deferred(st):
                return
            self._settle_locked()
            plan = self._plan()
            affected = plan.remove(st.id)
            plan.refit_all(affected)
            self._commit(plan, after=lambda: self._forget(st), op={"op": "delete", "edit_id": st.id})
            logger.info("deleted edit %d; re-fitted neighbours %s", st.id, sorted(affected))

    def _gc_blobs(self, candidates: Iterable[str] | None = None) -> None:
        """Drop stored images that neither an edit nor the locality pool refers to any more.

        ``candidates``: the only images that can have lost their last reference (a deleted edit's);
        None checks every stored image. Both give the same store: images are only ever orphaned
        by a delete.
        """
        refs = self._derived_index().blob_refs
        pool = set(self._pool_images)
        shas = list(self._blobs) if candidates is None else set(candidates)
        for sha in shas:
            if sha in self._blobs and sha not in refs and sha not in pool:
                del self._blobs[sha]

    # ------------------------------------------------------------------ reads
    def get(self, edit_id: int) -> Edit:
        with self._lock:
            st = self._state(edit_id)
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
            ids = sorted(self._edits)
        return [self.get(i) for i in ids]

    def history(self, edit_id: int) -> list[EditVersion]:
        self.settle()  # a holder's current version records its scope: show the settled one
        with self._lock:
            st = self._state(edit_id)
        return [v.copy() for v in st.versions]

    def __len__(self) -> int:
        return len(self._edits)

    def __contains__(self, edit_id: object) -> bool:
        return (
            isinstance(edit_id, (int, np.integer))
            and not isinstance(edit_id, bool)
            and int(edit_id) in self._edits
        )

    def open_image(self, sha256: str) -> Image.Image:
        with self._lock:
            data = self._blobs.get(sha256) if isinstance(sha256, str) else None
        if data is None:
            raise ImageError(f"no stored image with sha256 {sha256!r}")
        return Image.open(io.BytesIO(data)).convert("RGB")

    def keys_of(self, edit_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The edit's fitted keys (n, dim) and thresholds (n,) (copies)."""
        with self._lock:
            st = self._state(edit_id)
            k, t = self._keys[st.id]
            return k.copy(), t.copy()

    # ------------------------------------------------------------------ routing
    def route(
        self,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        *,
        keys: np.ndarray | None = None,
    ) -> RouteResult:
        """Route each input row to the in-scope edit with the largest margin, or -1."""
        return self._route_keys(self._route_query(images, texts, keys))[0]

    def route_ids(
        self,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        *,
        keys: np.ndarray | None = None,
    ) -> np.ndarray:
        """``route(...).edit_ids`` alone (int64, -1 = no edit), cheaper when most rows are out of scope."""
        return self._route_ids(self._route_query(images, texts, keys))

    def _route_query(self, images: Any, texts: Any, keys: Any) -> np.ndarray:
        if keys is not None:
            if images is not None or texts is not None:
                raise InvalidInputError("pass either keys or images/texts, not both")
            return check_keys(keys, None, int(self.encoder.dim), "keys")
        return self._encode(*route_rows(images, texts))

    def __repr__(self) -> str:
        return f"EditMemory({len(self)} edits, encoder={getattr(self.encoder, 'name', '?')!r})"
