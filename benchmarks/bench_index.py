"""Benchmark the scoped vector index: add, match latency, remove, recall, memory per key.

    python benchmarks/bench_index.py --quick          # CI size: 1k and 10k keys, < 1 min
    python benchmarks/bench_index.py                  # 1k, 10k, 100k keys
    python benchmarks/bench_index.py --million        # ... and 1M (minutes; ~10 GB RAM)

    python benchmarks/bench_index.py --vs-faiss --quick   # smoke: 5k keys, seconds
    python benchmarks/bench_index.py --vs-faiss           # 10k, 100k, 1M keys (~10 min; ~11 GB RAM)

Prints a markdown table and writes JSON (``--out``). Ratios are against ``flat`` measured in the
same run. ``esg-memory bench index`` calls `main`. The core lives in ``index/bench.py``.

``--vs-faiss`` measures single-query ``ScopedIndex.match`` (backend ivf, nlist ~ 4 sqrt(N), the
index's nprobe unless ``--nprobe``) against a raw ``faiss.IndexIVFFlat`` over the same trained lists,
FAISS on one thread, and writes ``results/index.json`` and ``results/index.md`` (``--out``, and the
``.md`` beside it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from index.bench import (
    format_table,
    format_vs_faiss,
    run_benchmark,
    run_vs_faiss,
    vs_faiss_markdown,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_index.json"
VS_FAISS_OUT = Path(__file__).resolve().parent / "results" / "index.json"


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
    p.add_argument("--out", type=Path, help=f"JSON output path (default {DEFAULT_OUT.name}; "
                   f"{VS_FAISS_OUT.name} with --vs-faiss)")
    p.add_argument("--vs-faiss", action="store_true",
                   help="single-query match vs raw faiss.IndexIVFFlat (N = 10k, 100k, 1M; --quick: 5k)")
    p.add_argument("--nprobe", type=int, help="--vs-faiss: fixed nprobe (default: the index's own rule)")
    p.add_argument("--rounds", type=int, help="--vs-faiss: passes over the queries per method (3; --quick 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv_used = list(sys.argv[1:] if argv is None else argv)
    if args.vs_faiss:
        return _vs_faiss(p, args, argv_used)
    args.out = args.out or DEFAULT_OUT
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
    result["meta"]["argv"] = argv_used
    print()
    print(format_table(result))
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return 0


def _vs_faiss(p: argparse.ArgumentParser, args: argparse.Namespace, argv_used: list[str]) -> int:
    sizes = args.sizes or ([5_000] if args.quick else [10_000, 100_000, 1_000_000])
    rounds = args.rounds or (1 if args.quick else 3)
    if any(n < 2048 for n in sizes) or args.dim < 1 or rounds < 1 or (args.nprobe or 1) < 1:
        p.error("--vs-faiss needs sizes >= 2048 (IVF trains from there), dim, rounds and nprobe >= 1")
    out = args.out or VS_FAISS_OUT
    print(format_vs_faiss({"rows": []}), flush=True)  # the header; rows follow as sizes finish
    def progress(row: dict) -> None:
        print(format_vs_faiss({"rows": [row]}, header=False), flush=True)

    result = run_vs_faiss(sizes, dim=args.dim, n_queries=200 if args.quick else 500, rounds=rounds,
                          seed=args.seed, nprobe=args.nprobe, on_row=progress)
    result["meta"]["argv"] = argv_used
    write_json(result, out)
    md = out.with_suffix(".md")
    md.write_text(vs_faiss_markdown(result, " ".join(["python benchmarks/bench_index.py", *argv_used])))
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
