"""FAISS structures behind `ScopedIndex` and the policy that picks and rebuilds them.

A structure is a *derived* acceleration index over the key table (see `_table.py`): it maps a
query to candidate slots; scores used for scope decisions are always recomputed exactly from
the table. So any structure can be thrown away and rebuilt from the table at any time, which is
how growth (IVF retraining), compaction and backend switches ("auto") work.

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact. Removed keys stay inside and are filtered at
  search with an ``IDSelectorBitmap`` until compaction (an O(N) ``remove_ids`` per call would cost
  ~20 ms at 100k keys); ids handed in must be fresh (guard: IDMap2 would silently accept a
  duplicate id and corrupt its reverse map).
- ``ivf``: ``IndexIVFFlat`` with native ids and a hashtable direct map so ``remove_ids`` is O(1)
  per id. Trained on a sample of the live keys (spherical k-means, nlist ~ 4*sqrt(N)); below
  ``ivf_min_train`` keys the search is exact (flat) because k-means needs enough points.
- ``hnsw``: ``IndexHNSWFlat``; it cannot delete, so removed keys are filtered at search and the
  graph is rebuilt when the removed share passes ``max_dead_fraction``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np

from ._table import KeyTable
from .errors import InvalidArgumentError, ScopedIndexError

__all__ = [
    "BACKENDS",
    "UNCHANGED",
    "FlatStructure",
    "HNSWStructure",
    "IVFStructure",
    "IndexConfig",
    "Structure",
    "build",
    "faiss_threads",
    "wanted_kind",
]

logger = logging.getLogger(__name__)

BACKENDS = ("flat", "ivf", "hnsw", "auto")


@dataclass
class IndexConfig:
    """Tuning knobs of `ScopedIndex`. Defaults were chosen with ``benchmarks/bench_index.py``."""

    ivf_min_train: int = field(
        default=2048, metadata={"help": "backend='ivf': live keys needed before IVF trains (exact below)."}
    )
    auto_ivf_keys: int = field(
        default=20_000, metadata={"help": "backend='auto': flat below this many live keys, IVF from here on."}
    )
    ivf_growth: float = field(
        default=4.0, metadata={"help": "Retrain IVF once live keys grew (or shrank) by this factor."}
    )
    ivf_lists_per_sqrt: float = field(
        default=4.0, metadata={"help": "nlist = this * sqrt(N) (capped by N/39)."}
    )
    ivf_train_points_per_list: int = field(
        default=64, metadata={"help": "k-means sample size per list (training cost vs centroid quality)."}
    )
    ivf_nprobe: int = field(default=16, metadata={"help": "Lists visited per query, at least."})
    ivf_nprobe_per_lists: int = field(
        default=128,
        metadata={
            "help": "Also visit at least nlist / this many lists: recall@1 at 1M keys (nlist 4000) was 0.982 "
            "with a fixed nprobe of 16 and needs more lists as they shrink."
        },
    )
    hnsw_m: int = field(default=32, metadata={"help": "HNSW graph degree."})
    hnsw_ef_construction: int = field(default=40, metadata={"help": "HNSW build beam width (FAISS default)."})
    hnsw_ef_search: int = field(default=64, metadata={"help": "HNSW search beam width (raised to k)."})
    max_dead_fraction: float = field(
        default=0.25, metadata={"help": "Compact (renumber + rebuild) once this share of slots is removed."}
    )
    min_dead_to_compact: int = field(default=64, metadata={"help": "Never compact for fewer removed keys."})
    seed: int = field(default=1234, metadata={"help": "k-means seed (rebuilds are deterministic)."})
    small_call_threads: int = field(
        default=1,
        metadata={"help": "OpenMP threads FAISS may use for a search/add of fewer than `small_call_rows` "
                          "rows (set for the calling thread only, then restored). One thread avoids OpenMP "
                          "spin-wait stalls of 10-20 ms seen on a busy 2-core machine; 0 = FAISS default."},
    )
    small_call_rows: int = field(default=64, metadata={"help": "Row count below which a call is 'small'."})
    prune_min_keys: int = field(
        default=2048,
        metadata={"help": "`maybe_in_scope` clusters the keys (exact cone bounds) from this many live "
                          "keys on; below it one scan of every key is cheaper."},
    )
    prune_keys_per_cluster: int = field(
        default=12,
        metadata={"help": "Live keys per cluster of the rule-out filter: small clusters are narrow cones "
                          "(at 10k dense keys, 12 per cluster leaves ~2% of them to score for a far query)."},
    )
    prune_max_clusters: int = field(
        default=4096, metadata={"help": "At most this many clusters (bounds re-clustering time)."}
    )
    prune_growth: float = field(
        default=2.0, metadata={"help": "Re-cluster the rule-out filter once live keys grew by this factor."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.small_call_threads, bool) or not isinstance(self.small_call_threads, int) \
                or self.small_call_threads < 0:
            raise InvalidArgumentError("IndexConfig.small_call_threads must be an integer >= 0")
        for name in ("ivf_min_train", "auto_ivf_keys", "ivf_train_points_per_list", "ivf_nprobe",
                     "ivf_nprobe_per_lists", "hnsw_m",
                     "hnsw_ef_construction", "hnsw_ef_search", "min_dead_to_compact", "small_call_rows",
                     "prune_min_keys", "prune_keys_per_cluster", "prune_max_clusters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"IndexConfig.{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.ivf_growth, (int, float)) and self.ivf_growth > 1.0):
            raise InvalidArgumentError(f"IndexConfig.ivf_growth must be > 1, got {self.ivf_growth!r}")
        if not (isinstance(self.ivf_lists_per_sqrt, (int, float)) and self.ivf_lists_per_sqrt > 0):
            raise InvalidArgumentError("IndexConfig.ivf_lists_per_sqrt must be > 0")
        g = self.prune_growth
        if isinstance(g, bool) or not (isinstance(g, (int, float)) and math.isfinite(g) and g > 1):
            raise InvalidArgumentError(f"IndexConfig.prune_growth must be > 1, got {self.prune_growth!r}")
        if not (isinstance(self.max_dead_fraction, (int, float)) and 0 < self.max_dead_fraction < 1):
            raise InvalidArgumentError("IndexConfig.max_dead_fraction must be in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgumentError("IndexConfig.seed must be an integer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IndexConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def nlist_for(self, n: int) -> int:
        return int(max(8, min(round(self.ivf_lists_per_sqrt * math.sqrt(n)), n // 39)))


UNCHANGED = contextlib.nullcontext()  # stateless, so one instance serves every call and thread


def faiss_threads(cfg: IndexConfig, rows: int) -> contextlib.AbstractContextManager[None]:
    """Limit FAISS' OpenMP threads for a small call, in the calling thread only.

    libgomp keeps ``nthreads-var`` per thread once a thread sets it, so this neither affects
    other threads nor outlives the call. When nothing needs changing (the usual case on a
    single-query hot path) it returns a shared no-op context rather than building a generator.
    """
    want = cfg.small_call_threads
    if not want or rows >= cfg.small_call_rows:
        return UNCHANGED
    before = faiss.omp_get_max_threads()
    if before == want:
        return UNCHANGED
    return _threads_set(want, before)


@contextlib.contextmanager
def _threads_set(want: int, before: int) -> Iterator[None]:
    faiss.omp_set_num_threads(want)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class Structure:
    """Common surface of the FAISS structures (see module doc)."""

    kind: str = ""
    keeps_dead: bool = True  # removed slots stay inside and are filtered with the table's selector
    index: faiss.Index
    _ntotal: int = -1  # FAISS' count, cached (-1: read it again); add/remove reset it

    @property
    def ntotal(self) -> int:
        # cached because reading it through SWIG costs a single-query match ~5 us
        n = self._ntotal
        if n < 0:
            n = self._ntotal = int(self.index.ntotal)
        return n

    def _check_fresh(self, slots: np.ndarray) -> None:
        # Slots are handed out append-only, so a structure that keeps dead slots holds exactly
        # 0..ntotal-1; anything else means a duplicate or skipped id.
        n = self.ntotal
        if slots.shape[0] and (slots[0] != n or slots[-1] != n + slots.shape[0] - 1):
            raise ScopedIndexError(f"internal: {self.kind} expected ids {n}.., got {slots[:3]}...")

    def add(self, vecs: np.ndarray, slots: np.ndarray) -> None:
        raise NotImplementedError

    def remove(self, slots: np.ndarray) -> None:
        raise ScopedIndexError(f"internal: {self.kind} removes by filtering, not natively")

    def search(self, q: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


class FlatStructure(Structure):
    kind = "flat"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, vecs: np.ndarray, slots: np.ndarray) -> None:
        self._check_fresh(slots)
        try:
            self.index.add_with_ids(vecs, slots)
        finally:
            self._ntotal = -1

    def search(self, q, k, sel):
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return self.index.search(q, k, params=params)


class HNSWStructure(Structure):
    kind = "hnsw"

    def __init__(self, dim: int, cfg: IndexConfig, index: faiss.Index | None = None) -> None:
        if index is None:
            index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
        self.index = index
        self.ef_search = cfg.hnsw_ef_search

    def add(self, vecs: np.ndarray, slots: np.ndarray) -> None:
        self._check_fresh(slots)  # HNSW labels are insertion positions, which equal the slots
        try:
            self.index.add(vecs)
        finally:
            self._ntotal = -1

    def search(self, q, k, sel):
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        if sel is not None:
            params.sel = sel
        return self.index.search(q, k, params=params)

    def describe(self) -> dict:
        return {"kind": self.kind, "m": int(self.index.hnsw.nb_neighbors(1)), "ef_search": self.ef_search}


class IVFStructure(Structure):
    kind = "ivf"
    keeps_dead = False

    def __init__(self, index: faiss.Index, nprobe: int, trained_n: int) -> None:
        self.index = index
        self._nprobe = int(min(nprobe, index.nlist))
        self.trained_n = int(trained_n)
        # Built once: FAISS only reads it, so concurrent searches share it (making one per call
        # cost ~10 us, a few percent of a single-query search at 100k keys).
        self._params = faiss.SearchParametersIVF(nprobe=self._nprobe)

    @property
    def nprobe(self) -> int:
        """Lists visited per query; fixed for the structure's life (a rebuild makes a new one)."""
        return self._nprobe

    @classmethod
    def train(cls, vecs: np.ndarray, cfg: IndexConfig) -> IVFStructure:
        n, d = vecs.shape
        nlist = cfg.nlist_for(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the sphere suit cosine
        index.cp.niter = 10
        index.cp.seed = cfg.seed
        index.cp.max_points_per_centroid = cfg.ivf_train_points_per_list
        index.cp.min_points_per_centroid = 1  # nlist is already capped at N/39; silence FAISS' warning
        sample = vecs
        cap = nlist * cfg.ivf_train_points_per_list
        if n > cap:
            rng = np.random.default_rng(cfg.seed)
            sample = vecs[np.sort(rng.choice(n, size=cap, replace=False))]
        index.train(np.ascontiguousarray(sample))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index, max(cfg.ivf_nprobe, -(-nlist // cfg.ivf_nprobe_per_lists)), n)

    def emptied(self) -> IVFStructure:
        """Same trained centroids, no vectors: compaction re-adds without re-running k-means."""
        d, nlist = self.index.d, self.index.nlist
        centroids = self.index.quantizer.reconstruct_n(0, nlist)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return IVFStructure(index, self.nprobe, self.trained_n)

    def add(self, vecs: np.ndarray, slots: np.ndarray) -> None:
        try:
            self.index.add_with_ids(vecs, slots)
        finally:
            self._ntotal = -1

    def remove(self, slots: np.ndarray) -> None:
        try:
            removed = self.index.remove_ids(slots)
        finally:
            self._ntotal = -1
        if removed != slots.shape[0]:
            raise ScopedIndexError(f"internal: IVF removed {removed} of {slots.shape[0]} ids")

    def search(self, q, k, sel):
        return self.index.search(q, k, params=self._params)

    def describe(self) -> dict:
        return {"kind": self.kind, "nlist": int(self.index.nlist), "nprobe": self.nprobe,
                "trained_n": self.trained_n}


def wanted_kind(backend: str, n_alive: int, current: Structure | None, cfg: IndexConfig) -> str:
    """Which structure the policy wants for ``n_alive`` live keys (with hysteresis when shrinking)."""
    if backend in ("flat", "hnsw"):
        return backend
    floor = cfg.ivf_min_train if backend == "ivf" else cfg.auto_ivf_keys
    if current is not None and current.kind == "ivf":
        return "ivf" if n_alive * 2 >= floor else "flat"
    return "ivf" if n_alive >= floor else "flat"


def build(kind: str, table: KeyTable, cfg: IndexConfig, reuse: IVFStructure | None = None) -> Structure:
    """A fresh structure over every slot of ``table`` (which must be compact: no dead slots)."""
    if table.n_dead:
        raise ScopedIndexError("internal: build() needs a compacted table")
    t0 = time.perf_counter()
    vecs = table.vecs[: table.n]
    slots = np.arange(table.n, dtype=np.int64)
    s: Structure
    if kind == "flat":
        s = FlatStructure(table.dim)
    elif kind == "hnsw":
        s = HNSWStructure(table.dim, cfg)
    elif kind == "ivf":
        s = reuse.emptied() if reuse is not None else IVFStructure.train(vecs, cfg)
    else:
        raise InvalidArgumentError(f"unknown structure {kind!r}")
    if table.n:
        s.add(vecs, slots)
    logger.info("built %s structure over %d keys in %.2fs (%s)", kind, table.n, time.perf_counter() - t0,
                s.describe())
    return s
