"""Cost of writes to an `EditMemory` when every edit neighbours every other (dense keys).

    python benchmarks/bench_memory_scale.py                       # N = 300, 1000; baseline at 300
    python benchmarks/bench_memory_scale.py --sizes 1000 3000 --baseline-sizes 300 1000

The untrained ``esg-tiny-clip`` puts every easy-vqa image+question at cosine ~0.99, so the whole
memory lies within the neighbour radius: the worst case for neighbour re-fits. For each size it
times ``add_many(N)``, then one ``add`` and one ``delete`` at N edits, and counts the edits each
re-fits. The baseline, measured in the same run, is the uncapped rule (``max_neighbours=0``:
every edit within the radius constrains, and is re-fitted with, its neighbours). Data: PyPI
``easy-vqa`` (MIT). Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from _dense_stream import dense_stream

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_memory_scale.json"


class _RefitCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.last = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("re-fitted edits"):
            self.last = len(re.findall(r"\d+", msg))


def measure(make_encoder, n: int, cap: int | None, counter: _RefitCounter) -> dict:
    from esg_memory import EditMemory
    from esg_memory.config import MemoryConfig

    # settle="sync": the delete call re-fits its holders, so its time and re-fit count are the write's
    # whole cost (the default two-phase delete defers them; bench_delete.py compares the two).
    extra = {} if cap is None else {"max_neighbours": cap}
    cfg = MemoryConfig(settle="sync", **extra)
    data = dense_stream(n + 1)
    mem = EditMemory(make_encoder(), cfg)  # a fresh encoder: its content cache must not carry over
    t = time.perf_counter()
    mem.add_many(data[:n])
    t_many = time.perf_counter() - t
    t = time.perf_counter()
    mem.add(**data[n])
    t_add, r_add = time.perf_counter() - t, counter.last
    t = time.perf_counter()
    mem.delete(n // 2)
    t_del, r_del = time.perf_counter() - t, counter.last
    return {
        "n": n,
        "max_neighbours": cfg.max_neighbours,
        "add_many_s": t_many,
        "one_add_s": t_add,
        "one_add_refits": r_add,
        "one_delete_s": t_del,
        "one_delete_refits": r_del,
    }


def format_table(rows: list[dict]) -> str:
    base = {r["n"]: r for r in rows if r["max_neighbours"] == 0}
    out = [
        "| N | max_neighbours | add_many(N) s | one add s (refits) | one delete s (refits) "
        "| add_many vs uncapped |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["n"])
        ratio = f"{b['add_many_s'] / r['add_many_s']:.1f}x faster" if b and r is not b else "baseline"
        if not b:
            ratio = "-"
        out.append(
            f"| {r['n']} | {r['max_neighbours'] or 'all (uncapped)'} | {r['add_many_s']:.2f} | "
            f"{r['one_add_s']:.3f} ({r['one_add_refits']}) | "
            f"{r['one_delete_s']:.3f} ({r['one_delete_refits']}) | {ratio} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--baseline-sizes", type=int, nargs="*", default=[300], help="uncapped runs (slow)")
    p.add_argument("--cap", type=int, default=None, help="max_neighbours (default: MemoryConfig's)")
    p.add_argument("--encoder", default="esg-tiny-clip")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from esg_memory import ClipKeyEncoder

    torch.set_num_threads(args.threads)
    counter = _RefitCounter()
    log = logging.getLogger("esg_memory.memory")
    log.addHandler(counter)
    log.setLevel(logging.INFO)
    log.propagate = False

    def make_encoder():
        return ClipKeyEncoder(args.encoder)

    rows = []
    for n in args.baseline_sizes:
        rows.append(measure(make_encoder, n, 0, counter))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    for n in args.sizes:
        rows.append(measure(make_encoder, n, args.cap, counter))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    rows.sort(key=lambda r: (r["n"], r["max_neighbours"] != 0))
    print()
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "encoder": args.encoder,
        "threads": args.threads,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(format_table(rows) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
