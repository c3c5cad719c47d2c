"""Benchmark core for `ScopedIndex` (the CLI lives in ``benchmarks/bench_index.py``).

Synthetic data on purpose: random unit keys in d dimensions (one key per edit, threshold 0.9)
and near-duplicate queries (a stored key plus Gaussian noise, cosine ~0.95 to it). Random
high-dimensional vectors are the hard case for approximate search (no cluster structure), so
recall here is a lower bound for real CLIP keys. Every ratio is against ``flat`` measured in the
same run on the same data.
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

from .backends import IndexConfig
from .scoped import ScopedIndex

__all__ = ["format_table", "run_benchmark", "write_json"]

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


def format_table(result: dict[str, Any], header: bool = True) -> str:
    lines = []
    if header:
        lines.append("| " + " | ".join(c[0] for c in _COLS) + " |")
        lines.append("|" + "|".join("---" for _ in _COLS) + "|")
    for r in result["rows"]:
        cells = []
        for _, key, fmt in _COLS:
            vals = [r.get(k) for k in key] if isinstance(key, tuple) else [r.get(key)]
            cells.append("-" if any(v is None for v in vals) else fmt.format(*vals))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    from .fs import atomic_write_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())
