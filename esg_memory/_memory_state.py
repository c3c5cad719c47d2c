"""Internal state of an `EditMemory` and the planning of scope re-fits (not public API).

Why the design is what it is — exact deletion:

* An edit's encoded data (`EditVectors`: anchor + positives = its *candidates*, its own hard
  negatives) depends only on the edit's own content and the config.
* An edit's *link* to another is the largest cosine between a candidate of one and a candidate of
  the other, computed on one fixed-shape block per pair (lower id first), so its value never
  depends on which other edits exist. An edit's *neighbour set* is the ``config.max_neighbours``
  edits of highest link at or above ``config.neighbour_radius`` (ties broken by id; 0 = no cap):
  a function of the current set of edits, and bounded, so a dense region (an encoder whose keys
  are all alike) costs the same per write as a sparse one. The relation is directed: ``a`` can
  constrain ``c`` without ``c`` constraining ``a``.
* An edit's fit is a function of its own data, the locality pool, and its neighbour set's data
  (their candidates as negatives when answers differ; the top ``neighbour_k`` neighbours'
  questions and images crossed with its own as hard negatives). Inputs farther than the radius
  cannot move a threshold, which sits at or above ``min_threshold``.

Hence every scope is a function of the current *set* of edits, not of the order they arrived in;
adding or re-encoding an edit changes the fit of itself, of the edits whose set held it, and of
the edits whose set it enters (reverse nearest neighbours); deleting one changes the fits of the
edits whose set held it, whose sets are recomputed from the rest. Re-fitting those (and only
those) reproduces the memory that never saw a deleted edit, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._memory_util import NeighbourTable
from .scope import ScopeFit, fit_scope, pairwise_sims
from .types import EditVersion, MemoryConfig

__all__ = ["CrossEncoder", "EditState", "EditVectors", "Plan"]

logger = logging.getLogger("esg_memory.memory")

#: (lo_state, hi_state) -> (vectors (r, d), label per row): one edit's image with the other's question.
#: Both rows are negatives for both edits: for one it is "same image, other question", for the other
#: "same question, other image".
CrossEncoder = Callable[["EditState", "EditState", dict[str, bytes]], tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class EditVectors:
    """Everything encoded for the current version of one edit (a function of its own content)."""

    cand: np.ndarray  # (c, d) float32 unit rows; row 0 = anchor
    cand_labels: tuple[str, ...]
    own_neg: np.ndarray  # (h, d)
    own_neg_labels: tuple[str, ...]
    qtext: np.ndarray  # (d,) text-only embedding of the question (filters cross hard negatives)
    ivec: np.ndarray  # (d,) image-only embedding (zeros without an image; filters them too)


@dataclass(frozen=True)
class EditState:
    """One edit as the memory holds it. Replaced, never mutated, so readers see whole states."""

    id: int
    created_at: float
    updated_at: float
    metadata: dict[str, Any]
    versions: tuple[EditVersion, ...]
    vec: EditVectors
    fit: ScopeFit | None
    nbrs: dict[int, float] = field(default_factory=dict)  # neighbour set: id -> link cosine

    @property
    def current(self) -> EditVersion:
        return self.versions[-1]

    @property
    def keys(self) -> np.ndarray:
        assert self.fit is not None
        return np.ascontiguousarray(self.vec.cand[list(self.fit.key_index)], dtype=np.float32)


class Plan:
    """A copy-on-write overlay of edit states: every write is planned here, then committed at once.

    Nothing in the live memory changes until `EditMemory` commits the plan, so a failure while
    encoding or fitting leaves the memory exactly as it was.
    """

    def __init__(
        self,
        base: dict[int, EditState],
        pool: np.ndarray,
        config: MemoryConfig,
        cross: CrossEncoder,
        cross_cache: dict[tuple[int, int], tuple[np.ndarray, list[str]]],
        blobs: dict[str, bytes],
        table: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.blobs = blobs  # images added by this plan, not yet in the memory's blob store
        self.base = base
        self.over: dict[int, EditState | None] = {}
        self.pool = pool
        self.config = config
        # Within one plan only: a block is a pure function of two edits' vectors, and keeping them
        # across writes would grow with every pair ever compared (quadratic in dense regions).
        self.new_pairs: dict[tuple[int, int], np.ndarray] = {}
        self.cross = cross
        self.cross_cache = cross_cache
        self.new_cross: dict[tuple[int, int], tuple[np.ndarray, list[str]]] = {}
        self.changed_vec: set[int] = set()
        self.table = table  # committed candidate vectors (pre-filter only)
        self.fresh = NeighbourTable(pool.shape[1])  # candidates re-encoded by this plan
        self.refit_log: list[int] = []
        # Bound on the float32 pre-filter's error against the exact float64 cosine of unit rows
        # (recursive summation: d * 2^-24, doubled), so pruning by it never drops a true member.
        self.slack = 1e-6 + pool.shape[1] * 2.0**-23

    # -- view -----------------------------------------------------------------------------------
    def get(self, eid: int) -> EditState | None:
        if eid in self.over:
            return self.over[eid]
        return self.base.get(eid)

    def ids(self) -> list[int]:
        out = {i for i in self.base if self.over.get(i, self.base[i]) is not None}
        out.update(i for i, s in self.over.items() if s is not None)
        return sorted(out)

    def put(self, state: EditState) -> None:
        self.over[state.id] = state

    # -- similarity blocks ----------------------------------------------------------------------
    def _pair_block(self, a: EditState, b: EditState) -> np.ndarray:
        """Cosines cand(a) x cand(b), computed as one block in (lower id, higher id) orientation."""
        lo, hi = (a, b) if a.id < b.id else (b, a)
        key = (lo.id, hi.id)
        block = self.new_pairs.get(key)
        if block is None:
            block = pairwise_sims(lo.vec.cand, hi.vec.cand)
            self.new_pairs[key] = block
        return block if a.id == lo.id else block.T

    def link(self, a: EditState, b: EditState) -> float:
        """Exact link cosine: the same fixed-shape block whatever else exists (not cached)."""
        lo, hi = (a, b) if a.id < b.id else (b, a)
        block = self.new_pairs.get((lo.id, hi.id))
        if block is None:
            block = pairwise_sims(lo.vec.cand, hi.vec.cand)
        return float(block.max())

    def _coarse(self, state: EditState) -> tuple[np.ndarray, np.ndarray]:
        """Present edits (ids, float32 link estimate) whose estimate could reach the radius.

        Float32 pre-filter over the committed table (vectors this plan did not change) and over
        the vectors this plan re-encoded; estimates are within ``self.slack`` of the exact link.
        """
        lim = self.config.neighbour_radius - self.slack
        skip = np.asarray(
            sorted(self.changed_vec | {i for i, s in self.over.items() if s is None} | {state.id}),
            dtype=np.int64,
        )
        owners: list[np.ndarray] = []
        values: list[np.ndarray] = []
        parts = [(*self.fresh.view(), False)]
        if self.table is not None:
            parts.insert(0, (*self.table, True))
        for mat, owner, from_base in parts:
            if not mat.shape[0]:
                continue
            row = (state.vec.cand @ mat.T).max(axis=0)
            keep = (row >= lim) & (owner >= 0)
            o = owner[keep]
            keep2 = ~np.isin(o, skip) if from_base else o != state.id
            owners.append(o[keep2])
            values.append(row[keep][keep2])
        if not owners:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        o = np.concatenate(owners)
        v = np.concatenate(values).astype(np.float64)
        ids, inv = np.unique(o, return_inverse=True)
        best = np.full(ids.shape[0], -np.inf)
        np.maximum.at(best, inv, v)
        return ids, best

    def _top(self, exact: dict[int, float]) -> dict[int, float]:
        cap = self.config.max_neighbours
        ranked = sorted(exact.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(ranked[:cap] if cap else ranked)

    def find_neighbours(self, state: EditState, coarse=None) -> dict[int, float]:
        """``state``'s neighbour set: the ``max_neighbours`` edits of highest link >= the radius.

        Ties are broken by id, so the set is a function of the present edits, whatever their
        arrival order. Exact links are computed only for edits the pre-filter cannot rule out.
        """
        radius = self.config.neighbour_radius
        ids, est = self._coarse(state) if coarse is None else coarse
        cap = self.config.max_neighbours
        lim = radius - self.slack
        if cap and ids.shape[0] > cap:
            # The cap-th estimate bounds the cap-th exact link from below (within slack).
            lim = max(lim, float(np.partition(est, -cap)[-cap]) - 2 * self.slack)
        exact: dict[int, float] = {}
        for i in ids[est >= lim].tolist():
            other = self.get(i)
            assert other is not None
            s = self.link(state, other)
            if s >= radius:
                exact[i] = s
        return self._top(exact)

    # -- structural changes ---------------------------------------------------------------------
    def _holders(self, eid: int) -> list[int]:
        """Edits whose neighbour set contains ``eid``."""
        out = []
        for i in self.ids():
            st = self.get(i)
            if i != eid and st is not None and eid in st.nbrs:
                out.append(i)
        return out

    def _reset_nbrs(self, ids: list[int]) -> None:
        for i in ids:
            st = self.get(i)
            assert st is not None
            self.put(replace(st, nbrs=self.find_neighbours(st)))

    def set_vectors(self, state: EditState, table: tuple[np.ndarray, np.ndarray] | None) -> set[int]:
        """Install ``state`` (new or re-encoded) and return every edit whose fit must be redone.

        Those are: the edit itself, every edit whose neighbour set held its old vectors (their
        sets are recomputed), and every edit whose set it now enters (reverse nearest neighbours).
        """
        if table is not None:
            self.table = table
        holders = [] if self.get(state.id) is None else self._holders(state.id)
        self.changed_vec.add(state.id)
        self.fresh.remove(state.id)
        self.fresh.add(state.id, state.vec.cand)
        self.put(replace(state, nbrs={}))
        st = self.get(state.id)
        assert st is not None
        coarse = self._coarse(st)
        self.put(replace(st, nbrs=self.find_neighbours(st, coarse)))
        self._reset_nbrs(holders)
        entered = self._enter(state.id, coarse, set(holders))
        return {state.id, *holders, *entered}

    def _enter(self, eid: int, coarse: tuple[np.ndarray, np.ndarray], done: set[int]) -> list[int]:
        """Insert ``eid`` into the neighbour set of every other edit that now ranks it in."""
        radius, cap = self.config.neighbour_radius, self.config.max_neighbours
        me = self.get(eid)
        assert me is not None
        out = []
        ids, est = coarse
        for i, e in zip(ids.tolist(), est.tolist(), strict=True):
            if i in done:
                continue
            st = self.get(i)
            assert st is not None
            full = bool(cap) and len(st.nbrs) >= cap
            worst = (0, 0.0)
            if full:
                if e < min(st.nbrs.values()) - self.slack:  # cheap rejection: most edits in a dense memory
                    continue
                worst = max(st.nbrs.items(), key=lambda kv: (-kv[1], kv[0]))
            s = self.link(me, st)
            if s < radius or (full and (-s, eid) > (-worst[1], worst[0])):
                continue
            nb = dict(st.nbrs)
            nb[eid] = s
            if full:
                del nb[worst[0]]
            self.put(replace(st, nbrs=nb))
            out.append(i)
        return out

    def remove(self, eid: int, table: tuple[np.ndarray, np.ndarray] | None = None) -> set[int]:
        """Drop ``eid``; the edits that held it get their sets recomputed from the rest (exact)."""
        if table is not None:
            self.table = table
        assert self.get(eid) is not None
        holders = self._holders(eid)
        self.over[eid] = None
        self.fresh.remove(eid)
        self._reset_nbrs(holders)
        return set(holders)

    # -- fitting --------------------------------------------------------------------------------
    def _cross(self, a: EditState, b: EditState) -> tuple[np.ndarray, list[str]]:
        lo, hi = (a, b) if a.id < b.id else (b, a)
        key = (lo.id, hi.id)
        fresh = lo.id in self.changed_vec or hi.id in self.changed_vec
        got = self.new_cross.get(key)
        if got is None and not fresh:
            got = self.cross_cache.get(key)
        if got is None:
            got = self.cross(lo, hi, self.blobs)
            self.new_cross[key] = got
        return got

    def negatives(self, state: EditState) -> tuple[list[np.ndarray], list[str]]:
        """Similarity blocks (cand x negatives) and labels for fitting ``state``; deterministic order."""
        cfg = self.config
        blocks: list[np.ndarray] = []
        labels: list[str] = []
        cand = state.vec.cand
        if state.vec.own_neg.shape[0]:
            blocks.append(pairwise_sims(cand, state.vec.own_neg))
            labels.extend(state.vec.own_neg_labels)
        if self.pool.shape[0]:
            blocks.append(pairwise_sims(cand, self.pool))
            labels.extend(f"locality {j}" for j in range(self.pool.shape[0]))
        answer = state.current.answer
        for nid in sorted(state.nbrs):
            other = self.get(nid)
            assert other is not None
            if cfg.separate_same_answer or other.current.answer != answer:
                blocks.append(self._pair_block(state, other))
                labels.extend(f"edit {nid} {lab}" for lab in other.vec.cand_labels)
        ranked = sorted(state.nbrs.items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.neighbour_k]
        for nid, _ in ranked:
            other = self.get(nid)
            assert other is not None
            vecs, labs = self._cross(state, other)
            if vecs.shape[0]:
                blocks.append(pairwise_sims(cand, vecs))
                labels.extend(labs)
        return blocks, labels

    def refit(self, eid: int) -> None:
        state = self.get(eid)
        assert state is not None
        blocks, labels = self.negatives(state)
        c = state.vec.cand.shape[0]
        neg = np.concatenate(blocks, axis=1) if blocks else np.zeros((c, 0))
        fit = fit_scope(
            pairwise_sims(state.vec.cand, state.vec.cand),
            neg,
            list(state.vec.cand_labels),
            labels,
            self.config,
        )
        cur = state.current
        newcur = replace(
            cur, scope=list(fit.records), uncovered=list(fit.uncovered), constrained_by=sorted(state.nbrs)
        )
        self.put(replace(state, fit=fit, versions=(*state.versions[:-1], newcur)))
        self.refit_log.append(eid)

    def refit_all(self, ids: set[int]) -> list[int]:
        done = []
        for eid in sorted(ids):
            if self.get(eid) is not None:
                self.refit(eid)
                done.append(eid)
        return done
