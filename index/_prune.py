"""Exact rule-out of queries that no key's scope can hold, sublinear in the number of keys.

Routing asks one question of every input before anything else: can any key hold this row? Most
inputs are out of scope, so answering it by scoring every key puts a cost linear in the memory
on every call, paid mostly in cache misses right after a model's forward pass has evicted the
table. Instead, keys are grouped around unit centroids. If every key of a cluster lies within
angle ``theta`` of its centroid ``c``, a unit query at angle ``alpha`` from ``c`` has cosine at
most ``cos(max(0, alpha - theta))`` with it (the triangle inequality on the sphere); when that is
below the key's threshold for every key of a cluster, the whole cluster is ruled out with one
comparison of ``cos(alpha)``. Only keys of the clusters left are scored exactly.

The bound holds for *any* grouping, so the answer never depends on how good the k-means was;
clustering quality only decides how much is skipped. A key added later joins its nearest
centroid and widens that cluster's reach if it must; k-means reruns once the live keys grew by
`IndexConfig.prune_growth`. Each `ConeFilter` is an immutable snapshot of one table state:
readers use the one they find, and a refresh publishes a new object (no reader ever sees a
half-updated filter).
"""

from __future__ import annotations

import logging
import threading
import time

import faiss
import numpy as np

from ._table import KeyTable
from .backends import IndexConfig

__all__ = ["ConeCache", "ConeFilter", "live_thresholds", "scan_error", "scan_max_margins"]

logger = logging.getLogger(__name__)

_CHUNK = 65_536  # rows per assignment step (bounds the temporary (rows, clusters) matrix)
_BLAS_ONE_THREAD = 131_072  # multiply-adds of a product OpenBLAS runs on the calling thread, with margin


def scan_max_margins(q: np.ndarray, vecs: np.ndarray, thr: np.ndarray, small_rows: int) -> np.ndarray:
    """(m,) per query row, the largest ``vecs @ q - thr`` (unit rows; dead keys have thr = inf)."""
    m, n = q.shape[0], vecs.shape[0]
    # One BLAS product for a large batch, or a product small enough that OpenBLAS keeps it on
    # the calling thread (it threads above 4 * 65536 multiply-adds); else the per-row kernel.
    if m >= small_rows or (m > 1 and m * n * q.shape[1] <= _BLAS_ONE_THREAD):
        return (q @ vecs.T - thr).max(axis=1)
    out = np.empty(m, dtype=np.float32)
    buf = np.empty(n, dtype=np.float32)
    for i in range(m):
        _inner_row(buf, q[i], vecs)
        buf -= thr
        out[i] = buf.max()
    return out


def _inner_row(out: np.ndarray, q: np.ndarray, vecs: np.ndarray) -> None:
    # Few queries (a routed call): FAISS' single-threaded SIMD kernel, one query at a time. A
    # BLAS product this size may go multi-threaded, and on a busy machine its worker threads
    # stall the call for milliseconds (the reason for `faiss_threads` too).
    faiss.fvec_inner_products_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vecs),
                                 q.shape[0], vecs.shape[0])


def scan_error(dim: int) -> float:
    """Bound on the error of a float32 dot product of two ``dim``-long unit rows (recursive summation:
    ``dim * 2**-24``, doubled, plus rounding slack): what separates two summation orders of the same
    cosine, or one of them from the exact value."""
    return 1e-6 + dim * 2.0**-23


def live_thresholds(t: KeyTable) -> np.ndarray:
    """Each slot's threshold, +inf for removed keys (so they can hold nothing)."""
    return np.where(t.edit[: t.n] >= 0, t.thr[: t.n], np.float32(np.inf))


class ConeFilter:
    """Clusters of one `KeyTable` state, each reduced to one cut on the query's centroid cosine."""

    __slots__ = ("assign", "cent", "cos_c", "cut", "err", "live_thr", "n", "table", "tol", "trained_n",
                 "version")

    def __init__(self, table: KeyTable, cent: np.ndarray, assign: np.ndarray, cos_c: np.ndarray,
                 trained_n: int) -> None:
        self.table = table
        self.version = table.version
        self.n = table.n
        self.cent = cent  # (C, d) float32 unit rows
        self.assign = assign  # (n,) int64 cluster of each slot (dead ones too: they hold nothing)
        self.cos_c = cos_c  # (n,) float32 cosine of each slot's key with its centroid
        self.trained_n = trained_n
        # float32 dot products of unit rows are off by at most ~dim ulps; loosening every angle
        # by twice `ScopedIndex.scan_error` keeps the bound sound
        self.tol = scan_error(table.dim)
        self.err = 2.0 * self.tol
        self.live_thr = live_thresholds(table)
        self.cut = _cuts(cent.shape[0], assign, cos_c, self.live_thr, self.tol, self.err)

    # ---- building --------------------------------------------------------------------------
    @classmethod
    def train(cls, t: KeyTable, cfg: IndexConfig) -> ConeFilter:
        """Spherical k-means on the live keys (sampled), then every slot assigned to its centroid.

        Small clusters make narrow cones: the queries' product with the centroids stays far
        cheaper than a scan while most clusters can be ruled out.
        """
        alive = t.alive_slots()
        n_live = int(alive.shape[0])
        c = max(1, min(n_live // cfg.prune_keys_per_cluster, cfg.prune_max_clusters))
        rng = np.random.default_rng(cfg.seed)
        sample = alive if n_live <= 32 * c else np.sort(rng.choice(alive, 32 * c, replace=False))
        # min_points_per_centroid=1: clusters of a dozen keys are intended, not a sampling mistake
        km = faiss.Kmeans(t.dim, c, niter=8, seed=cfg.seed, spherical=True, max_points_per_centroid=32,
                          min_points_per_centroid=1)
        km.train(np.ascontiguousarray(t.vecs[sample]))
        cent = km.centroids.astype(np.float64)
        cent = (cent / np.linalg.norm(cent, axis=1, keepdims=True)).astype(np.float32)
        assign, cos_c = _nearest(cent, t.vecs[: t.n])
        return cls(t, cent, assign, cos_c, n_live)

    def updated(self, t: KeyTable) -> ConeFilter:
        """This filter for a later state of the same table (slots only ever get appended)."""
        assign, cos_c = self.assign, self.cos_c
        if t.n > self.n:
            new_assign, new_cos = _nearest(self.cent, t.vecs[self.n : t.n])
            assign, cos_c = np.concatenate([assign, new_assign]), np.concatenate([cos_c, new_cos])
        return ConeFilter(t, self.cent, assign, cos_c, self.trained_n)

    def remapped(self, t: KeyTable, live: np.ndarray) -> ConeFilter:
        """This filter for ``t``, a compaction keeping old slots ``live`` in order."""
        return ConeFilter(t, self.cent, self.assign[live], self.cos_c[live], self.trained_n)

    # ---- querying --------------------------------------------------------------------------
    def may_hold(self, q: np.ndarray, small_rows: int) -> np.ndarray:
        """(m,) bool for unit rows ``q``: False proves every key's margin is below ``-tol``.

        The hot path of every routed call: for a row far from all scopes it is one small
        product with the centroids and one comparison.
        """
        live = q @ self.cent.T >= self.cut  # (m, C): clusters that may hold the row
        out = live.any(axis=1)
        rows = np.flatnonzero(out)
        if not rows.shape[0]:
            return out
        keep = live[rows].any(axis=0)[self.assign]  # keys of any row's surviving clusters
        slots = np.flatnonzero(keep)
        t = self.table
        if 2 * slots.shape[0] >= self.n:
            vecs, thr = t.vecs[: self.n], self.live_thr
        else:
            vecs, thr = t.vecs[slots], self.live_thr[slots]
        # a superset of each row's surviving keys: the max over it is still that row's max
        # among keys not already ruled out, so the test below stays exact
        out[rows] = scan_max_margins(q[rows], vecs, thr, small_rows) >= -self.tol
        return out


def _cuts(c: int, assign: np.ndarray, cos_c: np.ndarray, thr: np.ndarray, tol: float, err: float
          ) -> np.ndarray:
    """Per cluster, the centroid cosine below which no key of the cluster can hold a query.

    A key at angle theta from its centroid has cosine at most cos(max(0, alpha - theta)) with a
    query at angle alpha from it, so it can reach its threshold cos(beta) only while alpha <=
    theta + beta, the key's *reach*. A query is ruled out of the cluster iff cos(alpha) is below
    the cosine of the largest reach: -inf when some reach is pi or more (nothing can be ruled
    out), +inf for a cluster with no key that can hold anything (all removed). Angles are
    widened by ``err`` and the cut rounded down, so a float32 comparison of the query's centroid
    cosine never rules out a row that a key's exact margin would keep within ``tol``.
    """
    usable = thr - tol <= 1.0  # live keys (removed ones have an infinite threshold)
    theta = np.arccos(np.clip(cos_c[usable].astype(np.float64) - err, -1.0, 1.0))
    beta = np.arccos(np.clip(thr[usable].astype(np.float64) - tol, -1.0, 1.0))
    reach = np.full(c, -np.inf)
    np.maximum.at(reach, assign[usable], theta + beta)
    cut = np.where(reach >= np.pi, -np.inf, np.cos(np.clip(reach, 0.0, np.pi)) - err - 1e-9)
    cut = np.where(np.isneginf(reach), np.inf, cut)
    return np.nextafter(cut.astype(np.float32), np.float32(-np.inf))


class ConeCache:
    """The current `ConeFilter` of one index, refreshed on demand by its readers."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.current: ConeFilter | None = None
        self._lock = threading.Lock()

    def get(self, t: KeyTable) -> ConeFilter | None:
        """The filter for table state ``t`` (read lock held, so ``t`` is not changing), or None to scan.

        Refreshing is a derived-cache update, so readers do it: one at a time, and a reader that
        finds another one refreshing scans rather than waits (a re-clustering takes ~0.1 s at
        10k keys, and happens once per `prune_growth` of the live keys).
        """
        f = self.current
        if f is not None and f.table is t and f.version == t.version:
            return f
        if t.n_alive < self.config.prune_min_keys or not self._lock.acquire(blocking=False):
            return None
        try:
            f = self.current
            if f is None or f.table is not t or t.n_alive >= self.config.prune_growth * f.trained_n:
                t0 = time.perf_counter()
                f = ConeFilter.train(t, self.config)
                logger.debug("rule-out filter: %d keys in %d clusters (%.3fs)", t.n_alive, f.cent.shape[0],
                             time.perf_counter() - t0)
            elif f.version != t.version:
                f = f.updated(t)
            self.current = f
            return f
        finally:
            self._lock.release()

    def carried(self, old: KeyTable, new: KeyTable, remap: np.ndarray | None) -> ConeFilter | None:
        """The filter for ``new``, the table a rebuild made of ``old`` (writer mutex held).

        Carried over rather than re-clustered: a compaction only drops keys, so cones stay valid.
        """
        with self._lock:
            f = self.current
            if f is None or f.table is not old:
                return None
            if f.version != old.version:
                f = f.updated(old)
            return f if remap is None else f.remapped(new, np.flatnonzero(remap >= 0))


def _nearest(cent: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``vecs``: index of the centroid with the largest inner product, and that product."""
    n = vecs.shape[0]
    assign = np.empty(n, dtype=np.int64)
    cos = np.empty(n, dtype=np.float32)
    for s in range(0, n, _CHUNK):
        d = vecs[s : s + _CHUNK] @ cent.T
        a = d.argmax(axis=1)
        assign[s : s + _CHUNK] = a
        cos[s : s + _CHUNK] = d[np.arange(d.shape[0]), a]
    return assign, cos
