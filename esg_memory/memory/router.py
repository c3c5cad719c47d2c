"""`Router`: which edit's scope holds each input, read from the memory's committed state.

Routing never writes. It takes the memory's state lock only while it reads (the index search and
the winners' versions), so a concurrent write is seen either wholly or not at all.
"""

from __future__ import annotations

import threading

import numpy as np

from index import UnitRows
from index.errors import ScopedIndexError

from ..types import Conflict, ConflictProbe, RouteResult
from .committed import Committed, translate_index_error
from .state import EditState

__all__ = ["Router"]


class Router:
    """Routing and conflict listing over ``committed`` (read under ``lock``, the memory's state lock)."""

    def __init__(self, committed: Committed, lock: threading.RLock) -> None:
        self.committed = committed
        self.lock = lock

    def route_ids(self, q: UnitRows) -> np.ndarray:
        """``route(q)[0].edit_ids``, skipping the candidate search for rows no key can hold.

        Most inputs are out of scope: the index proves that exactly, and for a large memory
        without scoring every key (`ScopedIndex.maybe_in_scope`), which is what an unedited
        input costs. The remaining rows are routed in full, so the ids are exactly those
        `route` gives.
        """
        n = len(q)
        c = self.committed
        with self.lock:
            if not n or not len(c.edits):
                return np.full(n, -1, dtype=np.int64)
            try:
                # q is a UnitRows: the index trusts it instead of validating the rows again, which
                # would double the Python cost of the call every out-of-scope input pays
                maybe = c.index.maybe_in_scope(q)
            except ScopedIndexError as e:
                raise translate_index_error(e) from None
            hits = maybe.tolist()
            if not any(hits):
                return np.full(n, -1, dtype=np.int64)
            if all(hits):
                return self.route(q)[0].edit_ids
            out = np.full(n, -1, dtype=np.int64)
            out[maybe] = self.route(UnitRows.trusted(np.ascontiguousarray(q.array[maybe])))[0].edit_ids
            return out

    def route(self, q: UnitRows, want_all: bool = False) -> tuple[RouteResult, list[list[int]]]:
        """Route unit query rows; also return, per row, every candidate edit whose scope holds it.

        The index reports, per row, the ``route_k`` nearest edits already scored on their
        best-margin key and sorted by margin; only the winners' versions and origins need the
        edit states (one Python step per row, the hot path of every wrapped call).
        """
        n = len(q)
        c = self.committed
        ids = np.full(n, -1, dtype=np.int64)
        vers = np.full(n, -1, dtype=np.int64)
        near = np.full(n, -1, dtype=np.int64)
        ru = np.full(n, -1, dtype=np.int64)
        scores, thr, margins, ru_m = (np.full(n, np.nan, dtype=np.float32) for _ in range(4))
        origins = [""] * n
        all_in: list[list[int]] = [[] for _ in range(n)]
        with self.lock:
            if n and len(c.edits):
                route_k = c.config.route_k
                k = min(route_k if not want_all else max(route_k, 64), len(c.edits))
                try:
                    res = c.index.search(q, k=k)
                except ScopedIndexError as e:
                    raise translate_index_error(e) from None
                found = res.edit_ids
                mg = res.margins
                best = found[:, 0]
                has = best >= 0
                near[has] = best[has]
                scores[has] = res.scores[has, 0]
                thr[has] = res.thresholds[has, 0]
                margins[has] = mg[has, 0]
                inside = has & (mg[:, 0] >= 0)
                ids[inside] = best[inside]
                pos = res.key_positions  # search always reports which key of the edit scored
                for i in np.flatnonzero(has).tolist():
                    cur = c.edits[int(best[i])].current
                    origins[i] = cur.scope[int(pos[i, 0])].origin
                    if inside[i]:
                        vers[i] = cur.version
                if k > 1:
                    second = found[:, 1] >= 0
                    ru[second] = found[second, 1]
                    ru_m[second] = mg[second, 1]
                if want_all:
                    all_in = [found[i][res.in_scope[i]].tolist() for i in range(n)]
        out = RouteResult(
            edit_ids=ids,
            versions=vers,
            scores=scores,
            thresholds=thr,
            margins=margins,
            runner_up=ru,
            runner_up_margins=ru_m,
            nearest=near,
            origins=origins,
            keys=q.array,
        )
        return out, all_in

    def conflicts(self) -> list[Conflict]:
        """Pairs of edits with different answers whose scopes both hold some known input of either."""
        with self.lock:  # held throughout: a concurrent delete must not pull keys from under us
            return self._conflicts_locked()

    def _conflicts_locked(self) -> list[Conflict]:
        states = dict(self.committed.edits)
        found: dict[tuple[int, int], list[ConflictProbe]] = {}
        for eid in sorted(states):
            st = states[eid]
            _, all_in = self.route(UnitRows.trusted(st.vec.cand), want_all=True)
            for row, inside in enumerate(all_in):
                if eid not in inside:
                    continue
                for other in inside:
                    o = states.get(other)
                    if other == eid or o is None or o.current.answer == st.current.answer:
                        continue
                    a, b = min(eid, other), max(eid, other)
                    sa, ta = self._best(states[a], st.vec.cand[row])
                    sb, tb = self._best(states[b], st.vec.cand[row])
                    found.setdefault((a, b), []).append(
                        ConflictProbe(
                            owner=eid,
                            origin=st.vec.cand_labels[row],
                            score_a=sa,
                            threshold_a=ta,
                            score_b=sb,
                            threshold_b=tb,
                        )
                    )
        return [
            Conflict(
                edit_a=a,
                edit_b=b,
                answer_a=states[a].current.answer,
                answer_b=states[b].current.answer,
                probes=p,
            )
            for (a, b), p in sorted(found.items())
        ]

    def _best(self, st: EditState, x: np.ndarray) -> tuple[float, float]:
        kk, tt = self.committed.keys[st.id]
        m = kk @ x - tt
        j = int(np.argmax(m))
        return float(kk[j] @ x), float(tt[j])
