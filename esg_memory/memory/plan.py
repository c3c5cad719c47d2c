"""`Plan`: every write of an `EditMemory` planned on a copy-on-write overlay of its edit states.

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
from dataclasses import replace

import numpy as np
import torch

from index import scan_error

from ..config import MemoryConfig
from ..scope import fit_scope, pairwise_sims
from .ops import Change, Effects
from .state import CrossEncoder, Derived, EditState
from .tables import NeighbourTable

__all__ = ["Plan"]

logger = logging.getLogger("esg_memory.memory")


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
        derived: Derived | None = None,
    ) -> None:
        self.blobs = blobs  # images added by this plan, not yet in the memory's blob store
        self.base = base
        self.derived = derived  # indexes over ``base`` (None: found by scanning every state)
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
        # Bound on the float32 pre-filter's error against the exact float64 cosine of unit rows,
        # so pruning by it never drops a true member.
        self.slack = scan_error(pool.shape[1])

    def change(self, effects: Effects, blobs: dict[str, bytes]) -> Change:
        """The planned write as a `Change` (with the bookkeeping ``effects`` of its op)."""
        return Change(
            states=dict(self.over),
            changed_vec=frozenset(self.changed_vec),
            blobs=blobs,
            effects=effects,
            new_cross=dict(self.new_cross),
            refit_log=tuple(self.refit_log),
        )

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
        return self._coarse_many([state])[0]

    def _coarse_many(self, states: list[EditState]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`_coarse` of several edits with one pass over the table (it is read once, not per edit).

        A product's summation order may differ with the batch, which the slack covers: exactness
        never rests on the estimates, only which exact links get computed.
        """
        lim = self.config.neighbour_radius - self.slack
        gone = np.asarray(
            sorted(self.changed_vec | {i for i, s in self.over.items() if s is None}), dtype=np.int64
        )
        found: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in states]
        cands = np.concatenate([st.vec.cand for st in states])
        cands_t = torch.from_numpy(cands)
        bounds = np.cumsum([0] + [st.vec.cand.shape[0] for st in states]).tolist()
        parts = [(*self.fresh.view(), False)]
        if self.table is not None:
            parts.insert(0, (*self.table, True))
        for mat, owner, from_base in parts:
            n = mat.shape[0]
            if not n:
                continue
            best = np.empty((len(states), n), dtype=np.float32)
            step = max(1024, 4_000_000 // cands.shape[0])  # bounds the (candidates x block) product
            for a in range(0, n, step):
                # torch's product, not numpy's: it keeps to the process's torch thread setting, where
                # an OpenBLAS product this size spreads over every core and, on a busy machine, stalls
                # for 10-100x its single-thread time (measured on the 2-core CI box)
                prod = (cands_t @ torch.from_numpy(mat[a : a + step]).T).numpy()
                for j in range(len(states)):
                    best[j, a : a + step] = prod[bounds[j] : bounds[j + 1]].max(axis=0)
            # An edit's rows are one contiguous run of the table: reduce per run, not per row (the
            # same maxima; any repeated owner is merged by the unique below).
            starts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))
            run_owner = owner[starts]
            run_best = np.stack([np.maximum.reduceat(b, starts) for b in best])
            live = run_owner >= 0
            if from_base:  # re-encoded (their fresh rows count instead) or deleted by this plan
                live &= ~np.isin(run_owner, gone)
            for j, st in enumerate(states):
                keep = live & (run_best[j] >= lim) & (run_owner != st.id)
                found[j][0].append(run_owner[keep])
                found[j][1].append(run_best[j][keep])
        out = []
        for owners, values in found:
            if not owners:
                out.append((np.zeros(0, dtype=np.int64), np.zeros(0)))
                continue
            o = np.concatenate(owners)
            v = np.concatenate(values).astype(np.float64)
            ids, inv = np.unique(o, return_inverse=True)
            est = np.full(ids.shape[0], -np.inf)
            np.maximum.at(est, inv, v)
            out.append((ids, est))
        return out

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
        """Edits whose neighbour set contains ``eid`` (sorted)."""
        if self.derived is None:
            ids = self.ids()
        else:  # committed holders, re-checked against this plan's overlay, plus the overlay itself
            ids = sorted(self.derived.holders.get(eid, set()) | set(self.over))
        out = []
        for i in ids:
            st = self.get(i)
            if i != eid and st is not None and eid in st.nbrs:
                out.append(i)
        return out

    def _reset_nbrs(self, ids: list[int]) -> None:
        states = [self.get(i) for i in ids]
        if not states:
            return
        for st, coarse in zip(states, self._coarse_many(states), strict=True):  # type: ignore[arg-type]
            assert st is not None
            self.put(replace(st, nbrs=self.find_neighbours(st, coarse)))

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
        if cap and self.derived is not None and ids.shape[0]:
            # Most edits of a dense memory have a full set whose weakest link beats this estimate:
            # reject them at once with the committed bars (edits this plan changed are re-checked).
            bars = self.derived.bars
            bar = np.fromiter((bars.get(i, -np.inf) for i in ids.tolist()), np.float64, ids.shape[0])
            maybe = (est >= bar - self.slack) | np.isin(ids, np.fromiter(self.over, dtype=np.int64))
            ids, est = ids[maybe], est[maybe]
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
        """Drop ``eid``; returns the edits whose fit must be redone (exact, see the module doc).

        An edit that held ``eid`` gets the set it would have without it: recomputed from the rest
        when the set was full (the next-ranked edit may enter), else the same set less ``eid`` (every
        edit within the radius already was in it). Its fit is redone unless ``eid`` gave it no
        negative at all (same answer, not among its crossed top ``neighbour_k``): the negatives, hence
        the fit, are then unchanged and only ``constrained_by`` is updated.
        """
        if table is not None:
            self.table = table
        gone = self.get(eid)
        assert gone is not None
        self.over[eid] = None
        self.fresh.remove(eid)
        return self.release(eid, gone.current.answer)

    def release(self, eid: int, answer: str | None) -> set[int]:
        """The holders' half of `remove`: ``eid`` (whose answer was ``answer``) is already gone.

        Split out for a deferred delete (`esg_memory.memory.settle`): the edit leaves the memory at
        once, and its holders are revisited here later, with the same result — ``eid`` is neither in
        the committed table nor in this overlay, and the holders are found from their neighbour sets.
        """
        holders = self._holders(eid)
        cfg = self.config
        states = {i: self.get(i) for i in holders}
        cap = cfg.max_neighbours
        full = [i for i, st in states.items() if cap and st is not None and len(st.nbrs) >= cap]
        self._reset_nbrs(full)  # a full set may let the next-ranked edit in: recomputed from the rest
        refit: set[int] = set(full)
        for i in holders:
            st = self.get(i)
            assert st is not None
            if i in refit:
                continue
            nbrs = {n: v for n, v in st.nbrs.items() if n != eid}
            ranked = sorted(st.nbrs.items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.neighbour_k]
            gave_negatives = any(n == eid for n, _ in ranked) or (
                cfg.separate_same_answer or answer != st.current.answer
            )
            if gave_negatives:
                self.put(replace(st, nbrs=nbrs))
                refit.add(i)
            else:
                cur = replace(st.current, constrained_by=sorted(nbrs))
                self.put(replace(st, nbrs=nbrs, versions=(*st.versions[:-1], cur)))
        return refit

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

    def refit_all(self, ids: set[int], before_each: Callable[[], None] | None = None) -> list[int]:
        """Re-fit these edits in id order; ``before_each`` may raise to abandon the plan between two."""
        done = []
        for eid in sorted(ids):
            if before_each is not None:
                before_each()
            if self.get(eid) is not None:
                self.refit(eid)
                done.append(eid)
        return done
