"""Benchmark core for `ScopedIndex` (the CLI lives in ``benchmarks/bench_index.py``).

Synthetic data on purpose: random unit keys in d dimensions (one key per edit, threshold 0.9)
and near-duplicate queries (a stored key plus Gaussian noise, cosine ~0.95 to it). Random
high-dimensional vectors are the hard case for approximate search (no cluster structure), so
recall here is a lower bound for real CLIP keys. Every ratio is against ``flat`` measured in the
same run on the same data.

`run_vs_faiss` instead sets ``ScopedIndex.match`` (backend ``ivf``) beside a raw
``faiss.IndexIVFFlat`` with the same trained centroids and lists: its ratio is the index's own
cost (validation, locking, exact re-scoring, the scope rule) over the bare FAISS search.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from ._match import first_k_for
from .backends import IndexConfig
from .rows import UnitRows, as_unit_rows
from .scoped import ScopedIndex

__all__ = ["format_table", "format_vs_faiss", "run_benchmark", "run_vs_faiss", "vs_faiss_markdown",
           "write_json"]

logger = logging.getLogger(__name__)

THRESHOLD = 0.9
NOISE = 0.33  # ||noise|| relative to the unit key: cos(query, key) ~ 1/sqrt(1 + 0.33^2) ~ 0.95


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):  # chunks keep the float64 temporaries small at 1M x 512
        x = rng.standard_normal((min(65536, n - s), d))
        out[s : s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _near(rng: np.random.Generator, keys: np.ndarray) -> np.ndarray:
    x = keys + NOISE * rng.standard_normal(keys.shape) / np.sqrt(keys.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _stats_ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.median(a)), float(np.percentile(a, 99))


def _bytes_per_key(ix: ScopedIndex) -> float:
    b = ix.memory_bytes()
    return (b["table"] + b["structure"]) / max(1, ix.n_keys)


def _bench_one(
    backend: str, keys: np.ndarray, queries: np.ndarray, truth: np.ndarray | None, extra: np.ndarray,
    n_single: int, n_batches: int, seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    n, d = keys.shape
    rng = np.random.default_rng(seed)
    ix = ScopedIndex(d, backend=backend, config=IndexConfig())
    t0 = time.perf_counter()
    step = 1000
    for s in range(0, n, step):
        ix.add(np.arange(s, min(n, s + step)), keys[s : s + step], THRESHOLD)
    build = time.perf_counter() - t0
    if ix.structure == "ivf":  # first few searches touch cold pages; warm up like a live service
        ix.match(queries[:32])
    single = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        ix.match(q[None])
        single.append(time.perf_counter() - t)
    batch = []
    for b in range(n_batches):
        qb = queries[(b * 32) % len(queries) :][:32]
        t = time.perf_counter()
        ix.match(qb)
        batch.append(time.perf_counter() - t)
    found = ix.match(queries)
    adds = []
    for i, k in enumerate(extra):
        t = time.perf_counter()
        ix.add([n + i], k[None], THRESHOLD)
        adds.append(time.perf_counter() - t)
    victims = rng.choice(n, size=min(len(extra), n // 2), replace=False)
    removes = []
    for v in victims.tolist():
        t = time.perf_counter()
        ix.remove([v])
        removes.append(time.perf_counter() - t)
    row: dict[str, Any] = {"n_keys": n, "backend": backend, "structure": ix.structure,
                           "structure_params": ix.stats()["structure"], "build_s": build,
                           "add_keys_per_s": n / build}
    row["add1_ms_median"], row["add1_ms_p99"] = _stats_ms(adds)
    row["add1_ms_mean"] = float(np.mean(adds) * 1e3)
    row["match1_ms_median"], row["match1_ms_p99"] = _stats_ms(single)
    row["match32_ms_median"], row["match32_ms_p99"] = _stats_ms(batch)
    row["remove_ms_median"], row["remove_ms_p99"] = _stats_ms(removes)
    row["bytes_per_key"] = _bytes_per_key(ix)
    src = np.arange(len(queries))  # query i is a near-duplicate of key i
    row["hit_rate"] = float((found == src).mean())  # the edit the query was made from
    row["recall_at_1_vs_flat"] = None if truth is None else float((found == truth).mean())
    return row, found


def run_benchmark(sizes: list[int], backends: list[str], dim: int = 512, n_queries: int = 500,
                  n_single: int = 200, n_batches: int = 30, n_mut: int = 200, seed: int = 0,
                  threads: int = 0, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure each backend at each size; ``flat`` always runs first as the baseline.

    ``on_row`` is called with each finished row (progress output for long runs).
    """
    if threads:
        faiss.omp_set_num_threads(threads)
    backends = ["flat"] + [b for b in backends if b != "flat"]
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed + n)
        keys = _unit(rng, n, dim)
        nq = min(n_queries, n)
        queries = _near(rng, keys[:nq])
        extra = _unit(rng, n_mut, dim)
        truth = None
        base: dict[str, Any] = {}
        for b in backends:
            logger.info("benchmark: %s at %d keys", b, n)
            row, found = _bench_one(b, keys, queries, truth, extra, min(n_single, nq), n_batches, seed)
            if b == "flat":
                truth, base = found, row
                row["recall_at_1_vs_flat"] = 1.0
            row["match1_speedup_vs_flat"] = base["match1_ms_median"] / row["match1_ms_median"]
            row["match32_speedup_vs_flat"] = base["match32_ms_median"] / row["match32_ms_median"]
            row["bytes_vs_flat"] = row["bytes_per_key"] / base["bytes_per_key"]
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return {
        "meta": {"dim": dim, "threshold": THRESHOLD, "noise": NOISE, "n_queries": n_queries,
                 "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                 "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "rows": rows,
    }


_COLS = [("N", "n_keys", "{:,}"), ("backend", "backend", "{}"), ("now", "structure", "{}"),
         ("build s", "build_s", "{:.2f}"), ("add keys/s", "add_keys_per_s", "{:,.0f}"),
         ("add 1 edit ms (med/mean)", ("add1_ms_median", "add1_ms_mean"), "{:.3f} / {:.3f}"),
         ("match 1q ms med / p99", ("match1_ms_median", "match1_ms_p99"), "{:.3f} / {:.3f}"),
         ("match b32 ms med / p99", ("match32_ms_median", "match32_ms_p99"), "{:.2f} / {:.2f}"),
         ("remove ms med / p99", ("remove_ms_median", "remove_ms_p99"), "{:.3f} / {:.3f}"),
         ("recall@1 vs flat", "recall_at_1_vs_flat", "{:.3f}"), ("bytes/key", "bytes_per_key", "{:,.0f}"),
         ("1q speed-up vs flat", "match1_speedup_vs_flat", "{:.1f}x"),
         ("bytes vs flat", "bytes_vs_flat", "{:.2f}x")]


def format_table(result: dict[str, Any], header: bool = True, cols: list | None = None) -> str:
    cols = _COLS if cols is None else cols
    lines = []
    if header:
        lines.append("| " + " | ".join(c[0] for c in cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in result["rows"]:
        cells = []
        for _, key, fmt in cols:
            vals = [r.get(k) for k in key] if isinstance(key, tuple) else [r.get(key)]
            cells.append("-" if any(v is None for v in vals) else fmt.format(*vals))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ ScopedIndex vs raw FAISS IVF
def _meta(**extra: Any) -> dict[str, Any]:
    return {**extra, "threshold": THRESHOLD, "noise": NOISE, "faiss": faiss.__version__,
            "numpy": np.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _vs_faiss_one(
    n: int, dim: int, n_queries: int, rounds: int, seed: int, nprobe: int | None
) -> dict[str, Any]:
    rng = np.random.default_rng(seed + n)
    keys = _unit(rng, n, dim)
    nq = min(n_queries, n)
    queries = _near(rng, keys[:nq])  # query i is a near-duplicate of key i (= edit i)
    # nprobe=None: the index's own rule, max(ivf_nprobe, nlist / ivf_nprobe_per_lists)
    cfg = IndexConfig() if nprobe is None else IndexConfig(ivf_nprobe=nprobe, ivf_nprobe_per_lists=max(1, n))
    t0 = time.perf_counter()
    ix = ScopedIndex(dim, backend="ivf", config=cfg)
    # One add, so the IVF is trained once at N (nlist ~ 4 sqrt(N)). `_unit` rows are unit rows
    # already; `trusted` skips the float64 copy the check makes (4 GB at 1M keys).
    ix.add(np.arange(n), UnitRows.trusted(keys), THRESHOLD)
    build_s = time.perf_counter() - t0
    struct = ix.stats()["structure"]
    if struct["kind"] != "ivf":
        raise ValueError(f"{n} keys are too few for IVF (IndexConfig.ivf_min_train = {cfg.ivf_min_train})")
    # The raw index gets the ScopedIndex's trained centroids and is filled as a FAISS user fills
    # one, by one add() of the same keys in the same order: the same lists, the same candidates.
    # (Not a clone: clone_index packs the lists tighter than add does, and that alone searches
    # ~5% faster here.)
    t0 = time.perf_counter()
    centroids = ix.centroids()
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    raw = faiss.IndexIVFFlat(quantizer, dim, centroids.shape[0], faiss.METRIC_INNER_PRODUCT)
    raw.add(keys)
    raw.nprobe = struct["nprobe"]
    raw_build_s = time.perf_counter() - t0
    st = ix.stats()
    kk = first_k_for(st["keys"], st["edits"], st["faiss_ntotal"])
    arrays = [q[None] for q in queries]  # what a caller holds: (1, d) float32, validated by match
    units = [as_unit_rows(a, dim) for a in arrays]  # checked once up front, as a routed call does
    calls: dict[str, Callable[[int], Any]] = {
        "raw_k1": lambda i: raw.search(arrays[i], 1)[1],
        "raw_kk": lambda i: raw.search(arrays[i], kk)[1],
        "match_unit": lambda i: ix.match(units[i]),
        "match_array": lambda i: ix.match(arrays[i]),
    }
    for f in calls.values():  # first touches fault pages in; a live service is past them
        for i in range(min(32, nq)):
            f(i)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    answers: dict[str, list[int]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        # every query once per method and pass, so each call meets caches as random traffic
        # leaves them; the order rotates so no method always follows the same one
        for name in names[r % len(names):] + names[: r % len(names)]:
            f, out, got = calls[name], samples[name], answers[name]
            for i in range(nq):
                t = time.perf_counter()
                res = f(i)
                out.append(time.perf_counter() - t)
                if r == 0:
                    got.append(int(res.flat[0]))
    src = np.arange(nq)
    row: dict[str, Any] = {"n_keys": n, "nlist": struct["nlist"], "nprobe": struct["nprobe"], "k_match": kk,
                           "build_s": build_s, "raw_add_s": raw_build_s, "n_samples": nq * rounds}
    for name, v in samples.items():
        a = np.asarray(v) * 1e3
        row[f"{name}_ms_median"], row[f"{name}_ms_p99"] = float(np.median(a)), float(np.percentile(a, 99))
        row[f"{name}_ms_mean"] = float(a.mean())
    base = row["raw_k1_ms_median"]
    row["match_unit_vs_raw"] = row["match_unit_ms_median"] / base
    row["match_array_vs_raw"] = row["match_array_ms_median"] / base
    row["recall_at_1_match"] = float((np.asarray(answers["match_array"]) == src).mean())
    row["recall_at_1_raw"] = float((np.asarray(answers["raw_k1"]) == src).mean())
    row["match_unit_equals_array"] = answers["match_unit"] == answers["match_array"]
    return row


def run_vs_faiss(sizes: list[int], dim: int = 512, n_queries: int = 500, rounds: int = 3, seed: int = 0,
                 nprobe: int | None = None,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`ScopedIndex.match` (backend ``ivf``) against a raw ``faiss.IndexIVFFlat`` holding the same
    trained lists (same nlist and nprobe), one query per call, FAISS on one thread.

    Per size: latency median / p99 of raw ``search`` with k=1 (the baseline) and with the k that
    match fetches, of ``match`` given a `UnitRows` (checked once before, as routed calls pass
    queries) and given a plain (1, d) array (checked and normalised inside each call), the
    ratios of the two medians to the baseline, and recall@1 on near-duplicate queries of both.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        rows = []
        for n in sizes:
            logger.info("vs-faiss benchmark at %d keys", n)
            rows.append(_vs_faiss_one(n, dim, n_queries, rounds, seed, nprobe))
            if on_row is not None:
                on_row(rows[-1])
    finally:
        faiss.omp_set_num_threads(before)
    return {"meta": _meta(dim=dim, n_queries=n_queries, rounds=rounds, faiss_threads=1,
                          nprobe=("index default" if nprobe is None else nprobe)), "rows": rows}


_VS_COLS = [("N", "n_keys", "{:,}"), ("nlist / nprobe", ("nlist", "nprobe"), "{} / {}"),
            ("build s", "build_s", "{:.1f}"),
            ("raw IVF k=1 ms med / p99", ("raw_k1_ms_median", "raw_k1_ms_p99"), "{:.3f} / {:.3f}"),
            ("raw IVF k=8 ms med", "raw_kk_ms_median", "{:.3f}"),
            ("match (UnitRows) ms med / p99", ("match_unit_ms_median", "match_unit_ms_p99"),
             "{:.3f} / {:.3f}"),
            ("vs raw", "match_unit_vs_raw", "**{:.2f}x**"),
            ("match (array) ms med / p99", ("match_array_ms_median", "match_array_ms_p99"),
             "{:.3f} / {:.3f}"),
            ("vs raw ", "match_array_vs_raw", "{:.2f}x"),
            ("recall@1 match / raw", ("recall_at_1_match", "recall_at_1_raw"), "{:.3f} / {:.3f}")]


def format_vs_faiss(result: dict[str, Any], header: bool = True) -> str:
    return format_table(result, header=header, cols=_VS_COLS)


_VS_NOTES = """\
- **raw IVF**: `faiss.IndexIVFFlat` (IndexFlatIP quantizer, inner product) given the ScopedIndex's
  trained centroids and filled with one `add` of the same keys, so it holds the same lists;
  `search(q, k)` at the same nprobe. k=1 is the baseline of both ratios.
- **match (UnitRows)**: `ScopedIndex.match(q)` with `q` checked once beforehand
  (`index.as_unit_rows`), as routed calls pass queries. It fetches k=8 candidates, re-scores them
  exactly from the key table and applies the per-key thresholds.
- **match (array)**: the same with a plain (1, d) float32 array, checked and normalised in each call.
- Each method runs over every query once per pass (caches as random traffic leaves them); medians
  and p99 are over all passes. Absolute times on this shared machine drift from run to run; the
  ratios compare methods measured in the same run on the same data.
"""


def vs_faiss_markdown(result: dict[str, Any], command: str) -> str:
    """The results file: how it was made, the table, and how to read it."""
    m = result["meta"]
    return (
        f"# `ScopedIndex.match` vs raw FAISS IVF\n\n`{command}`: {m['time']}, faiss {m['faiss']}, "
        f"numpy {m['numpy']}, python {m['python']}, {m['cpus']} CPUs ({m['machine']}, shared; 1-min load "
        f"{m['load_avg_1m']:.1f} at the start), FAISS on 1 thread.\n\n"
        f"d = {m['dim']}; random unit keys, one per edit, threshold {m['threshold']}; queries = stored keys "
        f"plus noise (cos ~0.95), renormalised; {m['n_queries']} queries, {m['rounds']} pass(es) per method; "
        f"nprobe: {m['nprobe']}.\n\n{format_vs_faiss(result)}\n\n{_VS_NOTES}"
    )


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    from .fs import atomic_write_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())
