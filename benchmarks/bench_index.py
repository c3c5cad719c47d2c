"""Benchmark the scoped vector index: add, match latency, remove, recall, memory per key.

    python benchmarks/bench_index.py --quick          # CI size: 1k and 10k keys, < 1 min
    python benchmarks/bench_index.py                  # 1k, 10k, 100k keys
    python benchmarks/bench_index.py --million        # ... and 1M (minutes; ~10 GB RAM)

Prints a markdown table and writes JSON (``--out``). Ratios are against ``flat`` measured in the
same run. ``esg-memory bench index`` calls `main`. The core lives in ``index/bench.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from index.bench import format_table, run_benchmark, write_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_index.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: N = 1k, 10k")
    p.add_argument("--million", action="store_true", help="also run N = 1M")
    p.add_argument("--sizes", type=int, nargs="+", help="explicit key counts (overrides the presets)")
    p.add_argument("--backends", nargs="+", default=["flat", "ivf", "hnsw"],
                   choices=["flat", "ivf", "hnsw", "auto"], help="flat always runs as the baseline")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = FAISS default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000])
    if args.million and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    if any(n < 2 for n in sizes) or args.dim < 1:
        p.error("sizes must be >= 2 and dim >= 1")
    small = args.quick

    def progress(row: dict) -> None:
        print(format_table({"rows": [row]}, header=False), flush=True)

    result = run_benchmark(sizes, args.backends, dim=args.dim, seed=args.seed, threads=args.threads,
                           n_single=100 if small else 200, n_batches=15 if small else 30,
                           n_mut=100 if small else 200, on_row=progress)
    result["meta"]["argv"] = list(sys.argv[1:] if argv is None else argv)
    print()
    print(format_table(result))
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
