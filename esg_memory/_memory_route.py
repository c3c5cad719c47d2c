"""Routing and conflict listing over an `EditMemory`'s committed state (internals)."""

from __future__ import annotations

import numpy as np

from index.errors import ScopedIndexError

from ._memory_state import EditState
from ._memory_util import translate_index_error
from .types import Conflict, ConflictProbe, RouteResult

__all__ = ["RoutingMixin"]


class RoutingMixin:
    """Routing half of `EditMemory` (uses its ``_lock``, ``_index``, ``_edits``, ``_keys``, ``config``)."""

    def _route_keys(self, q: np.ndarray, want_all: bool = False) -> tuple[RouteResult, list[list[int]]]:
        """Route unit query rows; also return, per row, every candidate edit whose scope holds it."""
        n = q.shape[0]
        ids = np.full(n, -1, dtype=np.int64)
        vers = np.full(n, -1, dtype=np.int64)
        near = np.full(n, -1, dtype=np.int64)
        ru = np.full(n, -1, dtype=np.int64)
        scores, thr, margins, ru_m = (np.full(n, np.nan, dtype=np.float32) for _ in range(4))
        origins = [""] * n
        all_in: list[list[int]] = [[] for _ in range(n)]
        with self._lock:
            if n and len(self._edits):
                k = min(
                    self.config.route_k if not want_all else max(self.config.route_k, 64), len(self._edits)
                )
                try:
                    res = self._index.search(q, k=k)
                except ScopedIndexError as e:
                    raise translate_index_error(e) from None
                for i in range(n):
                    cands = []
                    for eid in res.edit_ids[i]:
                        eid = int(eid)
                        if eid < 0:
                            continue
                        kk, tt = self._keys[eid]
                        s = kk @ q[i]
                        m = s - tt
                        j = int(np.argmax(m))
                        cands.append((float(m[j]), eid, j, float(s[j]), float(tt[j])))
                    if not cands:
                        continue
                    cands.sort(key=lambda c: (-c[0], c[1]))
                    m0, e0, j0, s0, t0 = cands[0]
                    near[i], scores[i], thr[i], margins[i] = e0, s0, t0, m0
                    st = self._edits[e0]
                    origins[i] = st.current.scope[j0].origin
                    if m0 >= 0:
                        ids[i], vers[i] = e0, st.current.version
                    if len(cands) > 1:
                        ru[i], ru_m[i] = cands[1][1], cands[1][0]
                    all_in[i] = [c[1] for c in cands if c[0] >= 0]
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
            keys=q,
        )
        return out, all_in

    def conflicts(self) -> list[Conflict]:
        """Pairs of edits with different answers whose scopes both hold some known input of either."""
        with self._lock:  # held throughout: a concurrent delete must not pull keys from under us
            return self._conflicts_locked()

    def _conflicts_locked(self) -> list[Conflict]:
        states = dict(self._edits)
        found: dict[tuple[int, int], list[ConflictProbe]] = {}
        for eid in sorted(states):
            st = states[eid]
            _, all_in = self._route_keys(st.vec.cand, want_all=True)
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
        kk, tt = self._keys[st.id]
        m = kk @ x - tt
        j = int(np.argmax(m))
        return float(kk[j] @ x), float(tt[j])
