"""`ScopedIndex`: edits (stable int64 ids) owning unit keys, each key with its own cosine threshold.

Semantics (also in ``index/README.md``):

- A query ``q`` is *in scope* of a key when ``cos(q, key) >= threshold``; an edit's scope is the
  union of its keys' scopes. Its *margin* for ``q`` is ``max over its keys of cos - threshold``,
  so it is in scope iff its margin >= 0.
- ``search(q, k)`` returns, per query, the ``k`` edits whose *nearest key* is nearest (each edit at
  most once). For each, the reported key is the edit's key with the **largest margin** (over all
  of its keys), so ``scores``/``thresholds`` belong to one key, ``scores - thresholds`` is the
  edit's margin and ``in_scope`` means "some key of this edit covers q". Rows are sorted by
  margin, best first (ties: higher score, then lower id); padding is id -1, score -inf,
  threshold +inf, in_scope False.
- ``match(q)`` returns the in-scope edit with the largest margin over the *whole* index (-1 if
  none). It fetches candidates nearest-first and deepens until no unseen key could beat the best
  margin found (an unseen key has cos <= the last fetched score and threshold >= the index's
  minimum threshold), so with the flat backend it is exact. It can differ from
  ``search(q, k).edit_ids[:, 0]`` when the best-margin edit is not among the k nearest.
- Scores are exact cosines recomputed from the stored keys for every backend, so scope decisions
  never depend on an approximate structure's arithmetic; only *which* candidates an approximate
  backend finds is approximate.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import faiss
import numpy as np

from ._match import match_one, match_rows, retrieve
from ._prune import ConeCache, live_thresholds, scan_error, scan_max_margins
from ._table import KeyTable
from ._validate import as_edit_id, as_edit_ids, as_k, as_thresholds
from .backends import BACKENDS, IndexConfig, IVFStructure, Structure, build, faiss_threads, wanted_kind
from .errors import DimensionError, DuplicateIdError, InvalidArgumentError, UnknownIdError
from .persist import IndexState, read_state, write_state
from .results import SearchResult, describe, first_edits, padded
from .rows import rows_array
from .sync import RWLock

__all__ = ["ScopedIndex", "SearchResult", "read_index", "write_index"]

logger = logging.getLogger(__name__)


class ScopedIndex:
    """Vector store of scoped edits. Thread-safe for one writer and many readers.

    Every method that takes keys or queries accepts anything array-like (checked and normalised
    as `index.as_unit_rows` does) or an `index.UnitRows`, which is used as it is.
    """

    _WIDE_CAP = 4096  # match scores up to this many low-threshold keys exactly rather than deepen

    def __init__(self, dim: int, backend: str = "flat", config: IndexConfig | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if config is not None and not isinstance(config, IndexConfig):
            raise InvalidArgumentError("config must be an IndexConfig")
        self.dim = int(dim)
        self.backend = backend
        self.config = config or IndexConfig()
        self._lock = RWLock()
        self._table = KeyTable(self.dim)
        self._struct: Structure = build(wanted_kind(backend, 0, None, self.config), self._table,
                                            self.config)
        self._cones = ConeCache(self.config)  # rule-out filter for `maybe_in_scope`, built lazily

    # ------------------------------------------------------------------ read-only views
    def __len__(self) -> int:
        return self._table.n_edits

    def __contains__(self, edit_id: object) -> bool:
        try:
            e = as_edit_id(edit_id)
        except (TypeError, ValueError):
            return False
        return e in self._table

    def __repr__(self) -> str:
        return (f"ScopedIndex(dim={self.dim}, backend={self.backend!r}, structure={self.structure!r}, "
                f"edits={len(self)}, keys={self.n_keys})")

    @property
    def n_keys(self) -> int:
        """Number of live keys over all edits."""
        return self._table.n_alive

    @property
    def structure(self) -> str:
        """The FAISS structure in use now ("flat", "ivf" or "hnsw"; "ivf"/"auto" start as "flat")."""
        return self._struct.kind

    def stats(self) -> dict[str, Any]:
        with self._lock.read():
            t, s = self._table, self._struct
            return {"backend": self.backend, "dim": self.dim, "edits": t.n_edits, "keys": t.n_alive,
                    "slots": t.n, "dead_slots": t.n_dead, "structure": s.describe(), "faiss_ntotal": s.ntotal,
                    # whether maybe_in_scope's cluster filter is built (else it scans every key)
                    "rule_out_ready": self._cones.current is not None}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``table`` (keys, owners, thresholds, live bits) and ``structure`` (the FAISS index,
        as serialised)."""
        with self._lock.read():
            t, s = self._table, self._struct
            table = t.vecs.nbytes + t.edit.nbytes + t.thr.nbytes + t.bits.nbytes
            return {"table": int(table), "structure": int(faiss.serialize_index(s.index).nbytes)}

    def centroids(self) -> np.ndarray | None:
        """(nlist, dim) float32 copy of the IVF structure's trained centroids; None for flat or
        HNSW. (For building a raw FAISS index with the same lists, as ``index/bench.py`` does.)"""
        with self._lock.read():
            ivf = self._struct.index
            if not isinstance(ivf, faiss.IndexIVF):
                return None
            return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32).copy()

    def edit_ids(self) -> np.ndarray:
        """Sorted int64 array of the edit ids present."""
        with self._lock.read():
            return self._table.edit_ids()

    def keys_of(self, edit_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the edit's keys (n, dim) float32 (unit rows) and thresholds (n,), insertion order."""
        e = as_edit_id(edit_id)
        with self._lock.read():
            t = self._table
            if e not in t:
                raise UnknownIdError(f"edit id {e} is not in the index")
            slots = t.slots_of(e)
            return t.vecs[slots].copy(), t.thr[slots].copy()

    # ------------------------------------------------------------------ mutation
    def add(self, edit_ids: Any, keys: Any, thresholds: Any) -> None:
        """Add new edits: one row per key; rows sharing an id become that edit's keys.

        An id already present raises `DuplicateIdError` (use `add_keys` for more keys).
        ``thresholds`` may be a scalar (same for every row).
        """
        ids = as_edit_ids(edit_ids)
        vecs = rows_array(keys, self.dim, allow_1d=ids.shape[0] == 1)
        if vecs.shape[0] != ids.shape[0]:
            raise DimensionError(f"{ids.shape[0]} edit ids but {vecs.shape[0]} key rows")
        thr = as_thresholds(thresholds, ids.shape[0])
        if ids.shape[0] == 0:
            return
        with self._lock.writer_mutex:
            present = [e for e in np.unique(ids).tolist() if e in self._table]
            if present:
                raise DuplicateIdError(f"edit ids already present: {present[:10]}"
                                       + (" ..." if len(present) > 10 else ""))
            self._append(ids, vecs, thr)
            self._maybe_rebuild()

    def add_keys(self, edit_id: int, keys: Any, thresholds: Any) -> None:
        """Give an existing edit more keys (each with its own threshold; a scalar applies to all)."""
        e = as_edit_id(edit_id)
        vecs = rows_array(keys, self.dim)
        thr = as_thresholds(thresholds, vecs.shape[0])
        with self._lock.writer_mutex:
            self._require_present([e])
            if vecs.shape[0] == 0:
                return
            self._append(np.full(vecs.shape[0], e, dtype=np.int64), vecs, thr)
            self._maybe_rebuild()

    def replace_keys(self, edit_id: int, keys: Any, thresholds: Any) -> None:
        """Atomically swap all keys of an existing edit for new ones (readers see old or new)."""
        e = as_edit_id(edit_id)
        vecs = rows_array(keys, self.dim)
        thr = as_thresholds(thresholds, vecs.shape[0])
        if vecs.shape[0] == 0:
            raise DimensionError("replace_keys needs at least one key (use remove to drop an edit)")
        ids = np.full(vecs.shape[0], e, dtype=np.int64)
        with self._lock.writer_mutex:
            self._require_present([e])
            t, s = self._table, self._struct
            t.reserve(vecs.shape[0])
            with self._lock.write(), faiss_threads(self.config, vecs.shape[0]):
                self._kill(np.array([e], dtype=np.int64))
                s.add(vecs, np.arange(t.n, t.n + vecs.shape[0], dtype=np.int64))
                t.append(ids, vecs, thr)
            self._maybe_rebuild()

    def remove(self, edit_ids: Any) -> None:
        """Remove edits and every key they own. Unknown ids raise `UnknownIdError` (nothing removed)."""
        ids = np.unique(as_edit_ids(edit_ids))
        if ids.shape[0] == 0:
            return
        with self._lock.writer_mutex:
            self._require_present(ids.tolist())
            with self._lock.write(), faiss_threads(self.config, ids.shape[0]):
                self._kill(ids)
            self._maybe_rebuild()

    def set_thresholds(self, edit_ids: Any, thresholds: Any) -> None:
        """Per-edit update: every key of ``edit_ids[i]`` gets ``thresholds[i]`` (scalar broadcasts).

        For different values per key use `set_key_thresholds`.
        """
        ids = as_edit_ids(edit_ids)
        thr = as_thresholds(thresholds, ids.shape[0])
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise DuplicateIdError("set_thresholds got the same edit id twice (ambiguous)")
        if ids.shape[0] == 0:
            return
        with self._lock.writer_mutex:
            t = self._table
            self._require_present(ids.tolist())
            parts = [t.slots_of(e) for e in ids.tolist()]
            slots = np.concatenate(parts)
            values = np.repeat(thr, [p.shape[0] for p in parts])
            with self._lock.write():
                t.set_thresholds(slots, values)

    def set_key_thresholds(self, edit_id: int, thresholds: Any) -> None:
        """Per-key update: ``thresholds`` (n_keys,) in the order `keys_of` returns the keys."""
        e = as_edit_id(edit_id)
        with self._lock.writer_mutex:
            self._require_present([e])
            t = self._table
            slots = t.slots_of(e)
            thr = as_thresholds(thresholds, slots.shape[0])
            with self._lock.write():
                t.set_thresholds(slots, thr)

    def compact(self) -> None:
        """Drop removed keys for good and rebuild the structure now (normally automatic)."""
        with self._lock.writer_mutex:
            self._maybe_rebuild(force=True)

    def reconfigure(self, config: IndexConfig) -> None:
        """Use new tuning knobs from now on. The structure is rebuilt now, as `compact` does (a
        trained IVF keeps its clusters and nprobe until its next retrain), and `maybe_in_scope`'s
        filter is re-clustered under the new knobs on its next use. A failed rebuild raises and
        leaves the old structure in use (the new knobs stay)."""
        if not isinstance(config, IndexConfig):
            raise InvalidArgumentError("config must be an IndexConfig")
        with self._lock.writer_mutex:
            with self._lock.write():
                # a fresh cache: the old filter was clustered under the old knobs
                self.config, self._cones = config, ConeCache(config)
            self._maybe_rebuild(force=True)

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 8) -> SearchResult:
        """Top-``k`` edits per query (see module doc for the exact semantics)."""
        k = as_k(k)
        q = rows_array(queries, self.dim, name="queries")
        m = q.shape[0]
        with self._lock.read():
            t, s = self._table, self._struct
            if m == 0 or t.n_alive == 0:
                return padded(m, k, positions=True)
            chosen: list[list[int]] = [[] for _ in range(m)]
            kk = min(s.ntotal, k * math.ceil(t.n_alive / t.n_edits) + 8)
            rows = list(range(m))
            # Per-row Python over a few dozen candidates: cheaper than a dozen numpy calls for the
            # small batches routing sends, and linear in rows for large ones.
            while rows:
                slots, _cos, exhausted = retrieve(q[rows], kk, t, s, self.config)
                edits = np.where(slots >= 0, t.edit[np.maximum(slots, 0)], -1).tolist()
                deepen = []
                for r, row, ex in zip(rows, edits, exhausted.tolist(), strict=True):
                    first = first_edits(row, k)
                    if ex or len(first) >= k or kk >= s.ntotal:
                        chosen[r] = first
                    else:
                        deepen.append(r)
                rows = deepen
                kk = min(s.ntotal, kk * 4)
            return describe(q, chosen, k, t)

    @property
    def scan_error(self) -> float:
        """Bound on how far a `scan_margins` value can be from the margin `search` computes for the
        same key: both are float32 sums of ``dim`` products of unit rows, in different orders."""
        return scan_error(self.dim)

    def scan_margins(self, queries: Any) -> np.ndarray:
        """(m,) float32: per query, the largest ``cos - threshold`` over every live key (-inf if none).

        One brute-force product over the whole table, whatever the structure. A value below
        ``-scan_error`` proves no key holds the query (`search` and `match` then report nothing in
        scope); anything else proves nothing. `maybe_in_scope` answers that question for less.
        """
        q = rows_array(queries, self.dim, name="queries")
        m = q.shape[0]
        with self._lock.read():
            t = self._table
            if m == 0 or t.n_alive == 0:
                return np.full(m, -np.inf, dtype=np.float32)
            return scan_max_margins(q, t.vecs[: t.n], live_thresholds(t), self.config.small_call_rows)

    def maybe_in_scope(self, queries: Any) -> np.ndarray:
        """(m,) bool: False *proves* no live key holds the query (its `scan_margins` value is below
        ``-scan_error``, and `search`/`match` report nothing in scope); True proves nothing.

        Exact for every structure. From `IndexConfig.prune_min_keys` live keys on, whole clusters
        of keys are ruled out by a cone bound and only the rest are scored (``index/_prune.py``),
        so an out-of-scope query costs far less than a scan of every key. The hot path of a
        routed call: pass a `UnitRows` and nothing is checked again.
        """
        q = rows_array(queries, self.dim, name="queries")
        m = q.shape[0]
        with self._lock.read():
            t = self._table
            if m == 0 or t.n_alive == 0:
                return np.zeros(m, dtype=bool)
            f = self._cones.get(t)
            small = self.config.small_call_rows
            if f is None:
                return scan_max_margins(q, t.vecs[: t.n], live_thresholds(t), small) >= -self.scan_error
            return f.may_hold(q, small)

    def prepare_rule_out(self) -> None:
        """Build `maybe_in_scope`'s cluster filter now rather than in the first call that needs it
        (~0.2 s at 10k keys; a no-op below `IndexConfig.prune_min_keys`). Loading runs it."""
        with self._lock.read():
            self._cones.get(self._table)

    def match(self, queries: Any) -> np.ndarray:
        """(m,) int64: per query the in-scope edit with the largest margin, -1 if none."""
        q = rows_array(queries, self.dim, name="queries")
        lock = self._lock
        lock.acquire_read()  # not `with lock.read()`: see RWLock.acquire_read
        try:
            t, s = self._table, self._struct
            if q.shape[0] == 1 and t.n_alive:
                slot, _, _, first = match_one(q, t, s, self.config)
                if first is None:
                    return t.edit[slot : slot + 1].copy() if slot >= 0 else np.full(1, -1, dtype=np.int64)
                return match_rows(q, t, s, self.config, self._WIDE_CAP, first).edit_ids[:, 0]
            return match_rows(q, t, s, self.config, self._WIDE_CAP).edit_ids[:, 0]
        finally:
            lock.release_read()

    def match_details(self, queries: Any) -> SearchResult:
        """Like `match` but with the winning key's score/threshold, as a k=1 `SearchResult`."""
        q = rows_array(queries, self.dim, name="queries")
        with self._lock.read():
            t, s = self._table, self._struct
            if q.shape[0] == 1 and t.n_alive:
                slot, score, thr, first = match_one(q, t, s, self.config)
                if first is not None:
                    return match_rows(q, t, s, self.config, self._WIDE_CAP, first)
                out = padded(1, 1)
                if slot >= 0:
                    out.edit_ids[0, 0], out.scores[0, 0], out.thresholds[0, 0] = t.edit[slot], score, thr
                    out.in_scope[0, 0] = True
                return out
            return match_rows(q, t, s, self.config, self._WIDE_CAP)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to directory ``path`` atomically (format: ``index/persist.py``)."""
        with self._lock.read():  # readers only: the state cannot change while it is written
            write_state(IndexState(self.dim, self.backend, self.config, self._table, self._struct), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScopedIndex:
        """Read an index saved by `save`. Raises `IndexFormatError` on anything unexpected."""
        state = read_state(path)
        ix = cls(state.dim, backend=state.backend, config=state.config)
        ix._table, ix._struct = state.table, state.structure
        ix.prepare_rule_out()
        return ix

    # ------------------------------------------------------------------ internals
    def _require_present(self, ids: list[int]) -> None:
        missing = [e for e in ids if e not in self._table]
        if missing:
            more = " ..." if len(missing) > 10 else ""
            raise UnknownIdError(f"edit ids not in the index: {missing[:10]}{more}")

    def _append(self, ids: np.ndarray, vecs: np.ndarray, thr: np.ndarray) -> None:
        t, s = self._table, self._struct
        t.reserve(ids.shape[0])  # may raise MemoryError: before anything changed
        with self._lock.write(), faiss_threads(self.config, ids.shape[0]):
            s.add(vecs, np.arange(t.n, t.n + ids.shape[0], dtype=np.int64))
            t.append(ids, vecs, thr)

    def _kill(self, ids: np.ndarray) -> None:
        slots = self._table.kill(ids)
        if not self._struct.keeps_dead:
            self._struct.remove(slots)

    def _maybe_rebuild(self, force: bool = False) -> None:
        """Rebuild the structure when growth/shrink/removals call for it (writer mutex held).

        Copy-on-write: the new table and structure are built while readers keep using the old
        ones, then swapped in under the write lock.
        """
        t, s, cfg = self._table, self._struct, self.config
        kind = wanted_kind(self.backend, t.n_alive, s, cfg)
        too_dead = t.n_dead >= max(cfg.min_dead_to_compact, cfg.max_dead_fraction * t.n)
        retrain = isinstance(s, IVFStructure) and kind == "ivf" and (
            t.n_alive >= cfg.ivf_growth * s.trained_n
            or (too_dead and t.n_alive * cfg.ivf_growth <= s.trained_n)
        )
        if not (force or too_dead or retrain or kind != s.kind):
            return
        t0 = time.perf_counter()
        try:
            new_t, remap = t.compacted() if t.n_dead else (t, None)
            reuse = s if (isinstance(s, IVFStructure) and kind == "ivf" and not retrain) else None
            new_s = build(kind, new_t, cfg, reuse=reuse)
            cone = self._cones.carried(t, new_t, remap)
        except Exception:
            # The mutation that triggered this is already committed and the old table/structure
            # are still consistent; a rebuild only restores speed/memory, so retry on the next write.
            if force:
                raise
            logger.warning("index rebuild (%s -> %s) failed; keeping the current structure", s.kind, kind,
                           exc_info=True)
            return
        with self._lock.write():
            self._table, self._struct = new_t, new_s
            self._cones.current = cone
        logger.info("index rebuilt: %s -> %s, %d keys (%d removed dropped) in %.2fs", s.kind, kind,
                    new_t.n, t.n_dead, time.perf_counter() - t0)


def write_index(index: ScopedIndex, path: str | os.PathLike) -> None:
    """Write ``index`` to directory ``path`` atomically: the same as ``index.save(path)``."""
    if not isinstance(index, ScopedIndex):
        raise InvalidArgumentError(f"write_index needs a ScopedIndex, got {type(index).__name__}")
    index.save(path)


def read_index(path: str | os.PathLike) -> ScopedIndex:
    """Read an index written by `write_index` or `ScopedIndex.save`: same as ``ScopedIndex.load(path)``."""
    return ScopedIndex.load(path)
