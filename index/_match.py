"""The candidate search behind `ScopedIndex.match` and `search`: retrieval, exact re-scoring and
match's stopping rule (semantics: ``index/scoped.py``'s module doc).

Every function runs under the index's read lock, on the table and structure the caller read
under it. `match_rows` is the general loop (any number of queries, deepening until no unseen key
could win); `match_one` answers a single query from its first round of candidates whenever that
settles it, with the same answer, and hands the round to `match_rows` otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from ._table import KeyTable
from .backends import UNCHANGED, IndexConfig, Structure, faiss_threads
from .results import SearchResult, padded

__all__ = ["Round", "candidates", "first_k", "first_k_for", "match_one", "match_rows", "retrieve", "scored"]

Round = tuple[np.ndarray, np.ndarray, np.ndarray]  # what `retrieve` returns: (slots, cos, exhausted)


def candidates(q: np.ndarray, kk: int, t: KeyTable, s: Structure, cfg: IndexConfig) -> np.ndarray:
    """The structure's ``kk`` candidate slots per row (-1 padding), in its own order."""
    sel = t.selector() if s.keeps_dead else None
    threads = faiss_threads(cfg, q.shape[0])
    if threads is UNCHANGED:  # the usual case: skip even the no-op `with`
        return s.search(q, kk, sel)[1]
    with threads:
        return s.search(q, kk, sel)[1]


def scored(q: np.ndarray, slots: np.ndarray, t: KeyTable) -> Round:
    """Candidates sorted by exact cosine (desc): (slots -1 pad, cos -inf pad, exhausted per row)."""
    valid = slots >= 0
    cand = t.vecs[np.maximum(slots, 0)]
    cos = np.einsum("md,mkd->mk", q, cand)
    cos = np.where(valid, cos, -np.inf).astype(np.float32)
    order = np.argsort(-cos, axis=1, kind="stable")
    slots = np.take_along_axis(np.where(valid, slots, -1), order, axis=1)
    cos = np.take_along_axis(cos, order, axis=1)
    return slots, cos, ~valid.all(axis=1)


def retrieve(q: np.ndarray, kk: int, t: KeyTable, s: Structure, cfg: IndexConfig) -> Round:
    """``kk`` candidates per row, re-scored and sorted (see `scored`)."""
    return scored(q, candidates(q, kk, t, s, cfg), t)


def first_k(t: KeyTable, s: Structure) -> int:
    """How many candidates match fetches first: two edits' worth of keys, at least 8."""
    return first_k_for(t.n_alive, t.n_edits, s.ntotal)


def first_k_for(n_alive: int, n_edits: int, ntotal: int) -> int:
    """`first_k` from the counts `ScopedIndex.stats` reports (keys, edits, faiss_ntotal)."""
    return min(ntotal, max(8, 2 * math.ceil(n_alive / n_edits)))


def match_one(
    q: np.ndarray, t: KeyTable, s: Structure, cfg: IndexConfig
) -> tuple[int, float, float, Round | None]:
    """`match_rows` for one query (``q`` is (1, d); some key is live) when its first round of
    candidates settles it, as it nearly always does.

    Returns ``(slot, cos, thr, None)``: the winning key's slot (-1: no edit in scope), its cosine
    and threshold. When more candidates may be needed it returns ``(-1, 0.0, 0.0, first)``
    instead, ``first`` being the round as `retrieve` returns it, for `match_rows` to go on from
    (and to apply its stopping rule exactly). The answer equals `match_rows`': the same float32
    cosines and margins of the same candidates; only the sort is skipped, as the argmax and the
    smallest cosine do not need it.

    Why Python lists for the kk (~8) candidates: the FAISS scan just before evicts the
    interpreter's working set from the CPU caches, so each numpy call after it costs ~5-15 us,
    several times its warm cost (``benchmarks/bench_index.py --vs-faiss`` measures the whole).
    """
    ntotal = s.ntotal
    kk = first_k(t, s)
    slots = candidates(q, kk, t, s, cfg)
    row = slots[0]
    sl = row.tolist()
    if min(sl) < 0:  # fewer than kk found: the rare exhausted case, left to the general loop
        return -1, 0.0, 0.0, scored(q, slots, t)
    # as `scored` does, without its padding; `take` is the cheaper gather (same rows)
    cos = np.einsum("md,mkd->mk", q, t.vecs.take(slots, axis=0))[0]
    thr = t.thr[row]
    margins = (cos - thr).tolist()  # float32 differences, as `match_rows` computes them
    cl = cos.tolist()
    best, last = max(margins), min(cl)
    gap = last - t.min_threshold()
    # `match_rows` stops if best >= float32(gap), else (best < 0) if last < tmin. Here in float64,
    # deferring to it whenever float32 rounding (relative error < 1e-7) could decide.
    if not (kk >= ntotal or (best >= gap + 1e-6 * (1.0 + abs(gap)) if best >= 0 else gap < 0)):
        order = np.argsort(-cos, kind="stable")
        return -1, 0.0, 0.0, (slots[:, order], cos[order][None], np.zeros(1, dtype=bool))
    if best < 0:
        return -1, 0.0, 0.0, None
    j = margins.index(best)
    if margins.count(best) > 1:
        # `match_rows` takes the first best margin in cosine order (a stable sort): the highest
        # cosine among the tied keys, then the earliest candidate
        j = max((i for i, m in enumerate(margins) if m == best), key=lambda i: (cl[i], -i))
    return sl[j], cl[j], float(thr[j]), None


def match_rows(
    q: np.ndarray, t: KeyTable, s: Structure, cfg: IndexConfig, wide_cap: int, first: Round | None = None
) -> SearchResult:
    """`ScopedIndex.match_details` for every row of ``q``; ``first``: the first round's `retrieve`
    result when the caller already has it. ``wide_cap``: see `ScopedIndex._WIDE_CAP`."""
    m = q.shape[0]
    out = padded(m, 1)
    if m == 0 or t.n_alive == 0:
        return out
    tmin = t.min_threshold()
    kk = first_k(t, s)
    rows = np.arange(m)
    while rows.shape[0]:
        if first is not None:
            (slots, cos, exhausted), first = first, None
        else:
            slots, cos, exhausted = retrieve(q[rows], kk, t, s, cfg)
        valid = slots >= 0
        safe = np.maximum(slots, 0)
        thr = np.where(valid, t.thr[safe], np.inf)
        margin = np.where(valid, cos - thr, -np.inf)
        last = cos[:, -1]
        best = margin.max(axis=1)
        done = exhausted | (kk >= s.ntotal) | np.where(best >= 0, best >= last - tmin, last < tmin)
        if not done.all():
            # An unseen key can only be in scope (or beat a margin >= 0) if its threshold is
            # <= its cosine <= `last`. Few such wide-scope keys: score them all exactly and
            # stop, instead of deepening towards a full scan for every query.
            wide = t.alive_slots_with_threshold_at_most(float(last[~done].max()))
            if wide.shape[0] <= wide_cap:
                pend, shape = ~done, (slots.shape[0], wide.shape[0])
                wslots = np.full(shape, -1, dtype=np.int64)
                wslots[pend] = wide
                wcos = np.full(shape, -np.inf, dtype=np.float32)
                wcos[pend] = q[rows[pend]] @ t.vecs[wide].T
                slots = np.concatenate([slots, wslots], axis=1)
                cos = np.concatenate([cos, wcos], axis=1)
                thr = np.concatenate([thr, np.broadcast_to(t.thr[wide], shape)], axis=1)
                margin = np.where(slots >= 0, cos - thr, -np.inf)
                done[:] = True
        j = np.argmax(margin, axis=1)
        ar = np.arange(rows.shape[0])
        hit = done & (margin[ar, j] >= 0)
        r = rows[hit]
        out.edit_ids[r, 0] = t.edit[slots[ar[hit], j[hit]]]
        out.scores[r, 0] = cos[ar[hit], j[hit]]
        out.thresholds[r, 0] = thr[ar[hit], j[hit]]
        out.in_scope[r, 0] = True
        rows = rows[~done]
        kk = min(s.ntotal, kk * 4)
    return out
