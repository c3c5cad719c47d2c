"""Internal state of an `EditMemory` and the planning of scope re-fits (not public API).

Why the design is what it is — exact deletion:

* An edit's encoded data (`EditVectors`: anchor + positives = its *candidates*, its own hard
  negatives) depends only on the edit's own content and the config.
* Two edits are *neighbours* when some candidate of one is at least ``config.neighbour_radius``
  similar to some candidate of the other. The link is computed on one fixed-shape block per pair
  (lower id first), so its value never depends on which other edits exist.
* An edit's fit is a function of its own data, the locality pool, and its neighbours' data (their
  candidates as negatives when answers differ; the top ``neighbour_k`` neighbours' questions and
  images crossed with its own as hard negatives). Inputs farther than the radius cannot move a
  threshold, which sits at or above ``min_threshold``.

Hence every scope is a function of the current *set* of edits, not of the order they arrived in;
adding, revising or deleting an edit changes exactly its neighbours' fits, and re-fitting those
(and only those) reproduces the memory that never saw a deleted edit, bit for bit.
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
    nbrs: dict[int, float] = field(default_factory=dict)  # neighbour id -> link cosine

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
        pair_cache: dict[tuple[int, int], np.ndarray],
        cross: CrossEncoder,
        cross_cache: dict[tuple[int, int], tuple[np.ndarray, list[str]]],
        blobs: dict[str, bytes],
    ) -> None:
        self.blobs = blobs  # images added by this plan, not yet in the memory's blob store
        self.base = base
        self.over: dict[int, EditState | None] = {}
        self.pool = pool
        self.config = config
        self.pair_cache = pair_cache  # shared: pure function of two edits' vectors, keyed by identity
        self.new_pairs: dict[tuple[int, int], np.ndarray] = {}
        self.cross = cross
        self.cross_cache = cross_cache
        self.new_cross: dict[tuple[int, int], tuple[np.ndarray, list[str]]] = {}
        self.changed_vec: set[int] = set()
        self.fresh = NeighbourTable(pool.shape[1])  # candidates re-encoded by this plan
        self.refit_log: list[int] = []

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
        fresh = lo.id in self.changed_vec or hi.id in self.changed_vec
        block = self.new_pairs.get(key)
        if block is None and not fresh:
            block = self.pair_cache.get(key)
        if block is None:
            block = pairwise_sims(lo.vec.cand, hi.vec.cand)
            self.new_pairs[key] = block
        return block if a.id == lo.id else block.T

    def link(self, a: EditState, b: EditState) -> float:
        return float(self._pair_block(a, b).max())

    def find_neighbours(
        self, state: EditState, table: tuple[np.ndarray, np.ndarray] | None
    ) -> dict[int, float]:
        """All present edits linked to ``state`` (exact), using ``table`` only as a pre-filter."""
        radius = self.config.neighbour_radius
        others = [i for i in self.ids() if i != state.id]
        if table is not None and others:
            # Float32 pre-filters over the committed table (vectors unchanged by this plan) and over
            # the vectors this plan re-encoded; the slack keeps every edit the exact per-pair block
            # would link.
            near: set[int] = set()
            for mat, owner, from_base in (*table, True), (*self.fresh.view(), False):
                if mat.shape[0]:
                    coarse = (state.vec.cand @ mat.T).max(axis=0)
                    hit = set(owner[coarse >= radius - 1e-3].tolist())
                    near |= {i for i in hit if (i not in self.changed_vec) == from_base}
            others = [i for i in others if i in near]
        out: dict[int, float] = {}
        for i in others:
            other = self.get(i)
            assert other is not None
            s = self.link(state, other)
            if s >= radius:
                out[i] = s
        return out

    # -- structural changes ---------------------------------------------------------------------
    def set_vectors(self, state: EditState, table: tuple[np.ndarray, np.ndarray] | None) -> set[int]:
        """Install ``state`` (new or re-encoded) and return every edit whose fit must be redone."""
        old = self.get(state.id)
        old_nbrs = dict(old.nbrs) if old is not None else {}
        self.changed_vec.add(state.id)
        self.fresh.remove(state.id)
        self.fresh.add(state.id, state.vec.cand)
        self.put(replace(state, nbrs={}))
        new_nbrs = self.find_neighbours(self.get(state.id), table)
        self.put(replace(self.get(state.id), nbrs=new_nbrs))
        for nid in set(old_nbrs) | set(new_nbrs):
            other = self.get(nid)
            if other is None:
                continue
            nb = dict(other.nbrs)
            if nid in new_nbrs:
                nb[state.id] = new_nbrs[nid]
            else:
                nb.pop(state.id, None)
            self.put(replace(other, nbrs=nb))
        return {state.id} | set(old_nbrs) | set(new_nbrs)

    def remove(self, eid: int) -> set[int]:
        old = self.get(eid)
        assert old is not None
        for nid in old.nbrs:
            other = self.get(nid)
            if other is None:
                continue
            nb = dict(other.nbrs)
            nb.pop(eid, None)
            self.put(replace(other, nbrs=nb))
        self.over[eid] = None
        return set(old.nbrs)

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
