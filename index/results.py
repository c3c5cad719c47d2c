"""`SearchResult`, and how `ScopedIndex.search` turns the edits it chose into one.

For every chosen (query, edit) pair the reported key is the edit's best-margin key over *all*
of its keys; rows are sorted by margin, then score, then id (see `index.scoped` for the semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._table import KeyTable

__all__ = ["SearchResult", "describe", "first_edits", "padded"]


@dataclass(frozen=True)
class SearchResult:
    """Per-query, per-edit results; every array is (m, k)."""

    scores: np.ndarray  # float32 cosine of the edit's best-margin key (-inf padding)
    edit_ids: np.ndarray  # int64, -1 padding
    in_scope: np.ndarray  # bool: some key of the edit has cos >= its threshold
    thresholds: np.ndarray  # float32 threshold of that key (+inf padding)
    key_positions: np.ndarray | None = None
    """int64 position of that key among the edit's keys in `ScopedIndex.keys_of` order (-1 padding);
    filled by `ScopedIndex.search`, None from `match_details`."""

    @property
    def margins(self) -> np.ndarray:
        """``scores - thresholds`` (the edit's margin; -inf on padding)."""
        with np.errstate(invalid="ignore"):
            return np.where(self.edit_ids >= 0, self.scores - self.thresholds, -np.inf).astype(np.float32)


def padded(m: int, k: int, positions: bool = False) -> SearchResult:
    return SearchResult(
        scores=np.full((m, k), -np.inf, dtype=np.float32),
        edit_ids=np.full((m, k), -1, dtype=np.int64),
        in_scope=np.zeros((m, k), dtype=bool),
        thresholds=np.full((m, k), np.inf, dtype=np.float32),
        key_positions=np.full((m, k), -1, dtype=np.int64) if positions else None,
    )


def first_edits(edits: list[int], k: int) -> list[int]:
    """The first ``k`` distinct non-negative values, in order of first occurrence."""
    out = [e for e in dict.fromkeys(edits) if e >= 0]
    return out[:k]


def describe(q: np.ndarray, chosen: list[list[int]], k: int, t: KeyTable) -> SearchResult:
    """The (m, k) result for chosen edits using each edit's best-margin key over all its keys.

    Rows are sorted by margin, then score (both descending), then id; within an edit, the
    best-margin key with the higher cosine is reported.
    """
    m = q.shape[0]
    res = padded(m, k, positions=True)
    pair_edit = [e for row in chosen for e in row]
    if not pair_edit:
        return res
    n_pairs = len(pair_edit)
    per_row = np.fromiter(map(len, chosen), dtype=np.int64, count=m)
    pair_row = np.repeat(np.arange(m), per_row)
    parts = [t.slots_of(e) for e in pair_edit]
    plen = np.fromiter(map(len, parts), dtype=np.int64, count=n_pairs)
    key_slots = np.concatenate(parts)
    pair_of_key = np.repeat(np.arange(n_pairs), plen)
    cos = np.einsum("nd,nd->n", q[pair_row[pair_of_key]], t.vecs[key_slots]).astype(np.float32)
    thr = t.thr[key_slots]
    margin = cos - thr
    begin = np.cumsum(plen) - plen
    # groups stay contiguous and in pair order; the first of each is its best key
    best = np.lexsort((-cos, -margin, pair_of_key))[begin]
    sc, th, mg = cos[best], thr[best], margin[best]
    ids = np.asarray(pair_edit, dtype=np.int64)
    order = np.lexsort((ids, -sc, -mg, pair_row))  # rows stay in pair order, sorted within
    col = np.arange(n_pairs) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    at = (pair_row, col)
    res.scores[at], res.thresholds[at], res.edit_ids[at] = sc[order], th[order], ids[order]
    res.key_positions[at] = (best - begin)[order]  # type: ignore[index]
    res.in_scope[at] = sc[order] >= th[order]
    return res
