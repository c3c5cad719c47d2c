"""Brute-force numpy oracle for `index.ScopedIndex` and helpers shared by the index tests."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_faiss_thread():
    """FAISS' OpenMP threads spin badly when the 2 cores are shared; tests use one thread."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(rng: np.random.Generator, keys: np.ndarray, noise: float) -> np.ndarray:
    """Near-duplicates of ``keys`` (rows), unit length."""
    x = keys.astype(np.float64) + noise * rng.standard_normal(keys.shape) / np.sqrt(keys.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Oracle:
    """The specification, computed the slow obvious way in float64."""

    def __init__(self) -> None:
        self.keys: dict[int, np.ndarray] = {}
        self.thr: dict[int, np.ndarray] = {}
        self._cache: tuple | None = None  # concatenated view; every mutator resets it

    def add(self, ids, keys, thr) -> None:
        self._cache = None
        keys = np.asarray(keys, dtype=np.float64)
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        thr = np.broadcast_to(np.asarray(thr, dtype=np.float32), (len(ids),))
        for e, k, t in zip(np.asarray(ids).tolist(), keys, thr, strict=True):
            self.keys[e] = np.vstack([self.keys[e], k]) if e in self.keys else k[None]
            self.thr[e] = np.append(self.thr.get(e, np.zeros(0, np.float32)), np.float32(t))

    def remove(self, ids) -> None:
        self._cache = None
        for e in ids:
            del self.keys[e], self.thr[e]

    def set_key_thresholds(self, e: int, thr) -> None:
        self._cache = None
        self.thr[e] = np.asarray(thr, dtype=np.float32)

    def set_thresholds(self, ids, thr) -> None:
        self._cache = None
        for e, t in zip(ids, np.broadcast_to(thr, (len(ids),)), strict=True):
            self.thr[e] = np.full(self.thr[e].shape, np.float32(t), dtype=np.float32)

    def _flat(self):
        # Concatenated view, rebuilt only when the state changed since the last query.
        if self._cache is None:
            ids = np.array(sorted(self.keys), dtype=np.int64)
            keys = [self.keys[e] for e in ids.tolist()]
            self._cache = (ids, np.vstack(keys) if keys else np.zeros((0, 1)),
                           np.concatenate([self.thr[e] for e in ids.tolist()]) if keys else np.zeros(0),
                           np.array([k.shape[0] for k in keys], dtype=np.int64))
        return self._cache

    def per_edit(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For one query: ids, nearest cos, best margin, best-margin key's cos and threshold per edit."""
        ids, keys, thr, lens = self._flat()
        if ids.size == 0:
            e = np.zeros(0)
            return ids, e, e, e, e
        q = q.astype(np.float64) / np.linalg.norm(q)
        cos = keys @ q
        m = cos - thr.astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        seg = np.repeat(np.arange(ids.size), lens)
        order = np.lexsort((-cos, -m, seg))  # per edit: best margin first, then higher cos
        j = order[starts]
        return ids, np.maximum.reduceat(cos, starts), m[j], cos[j], thr[j]

    def match(self, q: np.ndarray) -> int:
        ids, _, margin, _, _ = self.per_edit(q)
        if ids.size == 0 or margin.max() < 0:
            return -1
        return int(ids[np.argmax(margin)])


def check_match(oracle: Oracle, queries: np.ndarray, got: np.ndarray) -> int:
    """Assert ``got`` is a correct match for every query (ties within TOL accepted); returns #rows."""
    for q, g in zip(queries, got.tolist(), strict=True):
        ids, _, margin, _, _ = oracle.per_edit(q)
        best = margin.max() if ids.size else -np.inf
        if g == -1:
            assert best < TOL, f"missed an in-scope edit (best margin {best})"
        else:
            assert g in oracle.keys, f"returned unknown/removed edit {g}"
            mg = margin[np.searchsorted(ids, g)]
            assert mg >= -TOL and mg >= best - TOL, f"edit {g} margin {mg} but best is {best}"
    return len(got)


def check_search_row(oracle: Oracle, q: np.ndarray, k: int, row_ids, row_scores, row_thr, row_in,
                     exact_set: bool) -> bool:
    """Check one search row. Per-edit values are always exact; the edit set only when ``exact_set``.

    Returns whether the row's ids equal the oracle's ids exactly (always asserted when
    ``exact_set`` and the oracle row has no near-ties).
    """
    ids, nearest, margin, rep_cos, rep_thr = oracle.per_edit(q)
    n = min(k, ids.size)
    got = [e for e in row_ids.tolist() if e >= 0]
    assert len(got) == len(set(got)), "an edit filled top-k twice"
    assert (row_ids[len(got):] == -1).all() and np.isneginf(row_scores[len(got):]).all()
    pos = np.searchsorted(ids, got)
    assert all(ids[p] == e for p, e in zip(pos, got, strict=True)), "unknown/removed edit returned"
    np.testing.assert_allclose(row_scores[: len(got)], rep_cos[pos], atol=TOL)
    np.testing.assert_allclose(row_thr[: len(got)], rep_thr[pos], atol=TOL)
    mg = margin[pos]
    amb = np.abs(mg) < TOL
    assert ((row_in[: len(got)] == (mg >= 0)) | amb).all()
    assert (np.diff(row_scores[: len(got)] - row_thr[: len(got)]) <= TOL).all(), "not sorted by margin"
    if not exact_set:
        return False
    assert len(got) == n
    kth = np.sort(nearest)[::-1][n - 1] if n else np.inf
    assert (nearest[pos] >= kth - TOL).all(), "a farther edit was returned instead of a nearer one"
    top = np.argsort(-nearest, kind="stable")[:n]
    want = ids[top][np.lexsort((ids[top], -rep_cos[top], -margin[top]))]
    srt = np.sort(nearest)[::-1]
    ties = n < ids.size and srt[n - 1] - srt[n] < TOL
    sm = np.sort(margin[top])
    ties = ties or (np.diff(sm) < TOL).any()
    if not ties:
        assert got == want.tolist()
        return True
    return False
