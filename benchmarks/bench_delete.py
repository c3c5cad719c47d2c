"""Latency of one `EditMemory.delete` call: synchronous re-fit of the holders vs two-phase delete.

    python benchmarks/bench_delete.py                      # N = 12, 100, 1000; 12 deletes per mode
    python benchmarks/bench_delete.py --sizes 10000 --deletes 8 --out benchmarks/results/bench_delete_10k.json

For each size one memory of N easy-vqa edits is built (the untrained ``esg-tiny-clip`` puts them all
within the neighbour radius: the dense worst case, where every deleted edit has full neighbour sets
to revisit). Then, in the same memory, deletes alternate between the modes of ``MemoryConfig.settle``:

* ``sync`` (the baseline: the behaviour before two-phase delete): the call re-fits the holders;
* ``manual``: the call only removes the edit; the holders' re-fit is timed apart (`settle`);
* ``background``: the call as ``manual`` plus waking the settler thread; the benchmark waits until it
  has settled before the next delete (so no measurement overlaps a settle).

Then a *burst*: background deletes 5 ms apart, so each lands while the settler re-fits the previous
one's holders. The settler gives way to a waiting writer between two re-fits (a call waits for one
re-fit at most); the same burst with that disabled (the call waits for the whole settle) is the
baseline.

Each deleted edit is picked among those with holders, so every call in every mode has a re-fit to
do (or to defer). Medians per mode and the ratio sync / two-phase are reported; all in one run, on
one machine (noisy when shared: compare ratios). Data: PyPI ``easy-vqa`` (MIT). Prints a markdown
table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from _dense_stream import dense_stream

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_delete.json"
MODES = ("sync", "manual", "background")


def measure(encoder, n: int, deletes: int) -> dict:
    from esg_memory import EditMemory
    from esg_memory.config import MemoryConfig

    mem = EditMemory(encoder, MemoryConfig())
    t = time.perf_counter()
    mem.add_many(dense_stream(n))
    build_s = time.perf_counter() - t
    calls: dict[str, list[float]] = {m: [] for m in MODES}
    settles: list[float] = []
    holders: dict[str, list[int]] = {m: [] for m in MODES}
    for i in range(deletes * len(MODES)):
        if len(mem) < 2:
            break
        mode = MODES[i % len(MODES)]
        held = {e.id: mem.holders(e.id) for e in mem.list()}
        victim = max((e for e in held if held[e]), key=lambda e: (len(held[e]), -e), default=None)
        if victim is None:
            break
        mem.set_settle(mode)
        holders[mode].append(len(held[victim]))
        t = time.perf_counter()
        mem.delete(victim)
        calls[mode].append(time.perf_counter() - t)
        if mode == "manual":
            t = time.perf_counter()
            mem.settle()
            settles.append(time.perf_counter() - t)
        while mode == "background" and mem.pending_refits:  # the settler thread's work
            time.sleep(0.0005)
        if mem.pending_refits:
            raise SystemExit(f"deletes still pending after a {mode} delete")
    med = {m: 1000 * statistics.median(v) for m, v in calls.items() if v}
    burst = {"give_way": burst_deletes(mem, deletes, give_way=True),
             "no_give_way": burst_deletes(mem, deletes, give_way=False)}
    return {
        "burst_call_ms": burst,
        "n": n,
        "build_s": build_s,
        "deletes_per_mode": {m: len(v) for m, v in calls.items()},
        "mean_holders": {m: statistics.mean(v) for m, v in holders.items() if v},
        "delete_call_ms_median": med,
        "delete_call_ms_min": {m: 1000 * min(v) for m, v in calls.items() if v},
        "settle_ms_median": 1000 * statistics.median(settles) if settles else float("nan"),
        "speedup_manual": med["sync"] / med["manual"],
        "speedup_background": med["sync"] / med["background"],
    }


def burst_deletes(mem, k: int, give_way: bool) -> dict | None:
    """``k`` background deletes back to back, without waiting for the settler between them.

    Each call may wait for the writer lock while the settler re-fits holders: with ``give_way`` (the
    library's behaviour) the settler stops between two re-fits for a waiting writer; without it (the
    behaviour before, emulated by hiding the waiting writer from it) the call waits for the whole
    settle in progress.
    """
    from esg_memory.memory.settle import WriterMutex

    real = WriterMutex.contended
    if not give_way:
        WriterMutex.contended = property(lambda self: False)  # type: ignore[method-assign]
    mem.set_settle("background")
    lat: list[float] = []
    try:
        for _ in range(k):
            held = {e.id: mem.holders(e.id) for e in mem.list()}
            victim = max((e for e in held if held[e]), key=lambda e: (len(held[e]), -e), default=None)
            if victim is None:
                break
            t = time.perf_counter()
            mem.delete(victim)
            lat.append(time.perf_counter() - t)
            time.sleep(0.005)  # the settler's turn: a settle is under way when the next delete comes
        mem.settle()
    finally:
        WriterMutex.contended = real
    if not lat:
        return None  # the modes above deleted every edit that had holders
    lat.sort()
    return {"median": 1000 * statistics.median(lat), "max": 1000 * lat[-1], "n": len(lat)}


def format_table(rows: list[dict]) -> str:
    out = [
        "| N | holders (mean) | delete sync ms (baseline) | delete two-phase ms (manual / background) "
        "| settle ms | sync / two-phase | burst: call ms median / max (settler gives way) "
        "| burst: same, settler does not give way |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        med = r["delete_call_ms_median"]
        out.append(
            f"| {r['n']} | {r['mean_holders']['sync']:.1f} | {med['sync']:.2f} | "
            f"{med['manual']:.3f} / {med['background']:.3f} | {r['settle_ms_median']:.2f} | "
            f"{r['speedup_manual']:.0f}x / {r['speedup_background']:.0f}x | {_burst(r, 'give_way')} | "
            f"{_burst(r, 'no_give_way')} |"
        )
    return "\n".join(out)


def _burst(r: dict, key: str) -> str:
    b = r.get("burst_call_ms", {}).get(key)
    return "-" if not b else f"{b['median']:.2f} / {b['max']:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[12, 100, 1000])
    p.add_argument("--deletes", type=int, default=12, help="deletes per mode and size")
    p.add_argument("--encoder", default="esg-tiny-clip")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from esg_memory import ClipKeyEncoder

    torch.set_num_threads(args.threads)
    logging.getLogger("esg_memory").setLevel(logging.WARNING)
    rows = []
    for n in args.sizes:
        rows.append(measure(ClipKeyEncoder(args.encoder), n, args.deletes))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    meta = {
        "encoder": args.encoder,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(format_table(rows) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
