"""Cost of durability: journal append + fsync per write, replay time, compaction, crash trials.

For each memory size N (edits added one by one to a durable memory, `EditMemory.open`):

* per write kind (add, revise, attach, delete): wall time of the call and the part spent in the
  journal's append + fsync, and the record size (mean / p99);
* replay: `EditMemory.load` of the directory while all N+ records are still in the journal, vs the
  same state loaded from a compacted snapshot (the baseline, measured in the same run);
* compaction (snapshot + journal truncation) time, and a plain `save` of the same memory;
* crash trials (`benchmarks/_crash.py`): kills, acknowledged writes, lost (must be 0).

The encoder is the numpy one of the crash harness (dim 64, as the tiny CLIP), so the numbers are
the memory's and the disk's, not a model's.

    python benchmarks/bench_journal.py                 # N = 200, 1000; 24 crash trials
    python benchmarks/bench_journal.py --quick         # N = 100; 6 crash trials

Writes ``journal.json`` and ``journal.md`` (``journal_quick.*`` with --quick) to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _crash import CrashEncoder, _spec, run_crash_trials
from _report import write_report
from tqdm import tqdm

logger = logging.getLogger("bench_journal")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def stats_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "mean_ms": round(statistics.fmean(xs) * 1000, 3) if xs else None,
            "p50_ms": round(pct(xs, 50) * 1000, 3), "p99_ms": round(pct(xs, 99) * 1000, 3)}


def measure(n: int, workdir: Path) -> dict[str, Any]:
    from esg_memory.config import JournalConfig, MemoryConfig
    from esg_memory.memory import EditMemory

    enc = CrashEncoder(dim=64)
    path = workdir / f"mem{n}"
    EditMemory(enc, MemoryConfig(n_text_positives=2, n_image_positives=2)).save(path)
    mem = EditMemory.open(path, enc, journal=JournalConfig(compact_bytes=0, compact_on_close=False))
    w = mem.journal.writer
    kinds: dict[str, dict[str, list[float]]] = {}

    def timed(kind: str, fn) -> Any:
        f0, o0 = w.fsync_seconds, w.offset
        t0 = time.perf_counter()
        out = fn()
        d = kinds.setdefault(kind, {"call": [], "journal": [], "bytes": []})
        d["call"].append(time.perf_counter() - t0)
        d["journal"].append(w.fsync_seconds - f0)
        d["bytes"].append(float(w.offset - o0))
        return out

    ids = []
    for k in tqdm(range(n), desc=f"adds {n}", leave=False):
        ids.append(timed("add", lambda k=k: mem.add(edit_id=k, **_spec(k))))
    for j, eid in enumerate(ids[: min(100, n)]):
        timed("revise", lambda eid=eid, j=j: mem.revise(eid, answer=f"revised {j}"))
        timed("attach", lambda eid=eid: mem.attach(eid, "adapter", os.urandom(4096)))
    for eid in ids[-min(50, n // 4):]:
        timed("delete", lambda eid=eid: mem.delete(eid))
    records = w.next_lsn - 1
    journal_bytes = sum(p.stat().st_size for p in (path / "journal").glob("*.wal"))
    mem.close()  # no compaction: everything is still in the journal
    t0 = time.perf_counter()
    replayed = EditMemory.load(path, enc)
    replay_s = time.perf_counter() - t0
    with EditMemory.open(path, enc) as w2:
        t0 = time.perf_counter()
        w2.compact()
        compact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    snap = EditMemory.load(path, enc)
    snapshot_load_s = time.perf_counter() - t0
    assert [(e.id, e.version) for e in snap.list()] == [(e.id, e.version) for e in replayed.list()]
    t0 = time.perf_counter()
    snap.save(workdir / f"plain{n}")
    save_s = time.perf_counter() - t0
    out: dict[str, Any] = {"edits_added": n, "edits_final": len(snap), "records": records,
                           "journal_bytes": journal_bytes}
    for kind, d in kinds.items():
        out[kind] = {"call": stats_ms(d["call"]), "journal": stats_ms(d["journal"]),
                     "record_bytes_mean": round(statistics.fmean(d["bytes"])),
                     "record_bytes_p99": round(pct(d["bytes"], 99))}
    out["replay"] = {"load_from_journal_s": round(replay_s, 3), "records": records,
                     "per_record_ms": round(1000 * replay_s / max(records, 1), 3),
                     "load_from_snapshot_s": round(snapshot_load_s, 3),
                     "ratio_vs_snapshot": round(replay_s / snapshot_load_s, 2) if snapshot_load_s else None}
    out["compaction_s"] = round(compact_s, 3)
    out["plain_save_s"] = round(save_s, 3)
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Journal benchmark ({'quick' if r['quick'] else 'full'})", "",
             f"{r['machine']['cpus']} CPUs (shared), load average at end {r['machine']['loadavg_at_end']}; "
             "numpy encoder (dim 64). Times per call; *journal* = append + fsync (fdatasync) of its "
             "record.", "",
             "| edits | write | call p50 / p99 ms | journal p50 / p99 ms | journal share of call (mean) | "
             "record bytes mean / p99 |", "|---|---|---|---|---|---|"]
    for m in r["sizes"]:
        for kind in ("add", "revise", "attach", "delete"):
            if kind not in m:
                continue
            c, j = m[kind]["call"], m[kind]["journal"]
            share = round(j["mean_ms"] / c["mean_ms"], 2) if c["mean_ms"] else None
            lines.append(f"| {m['edits_added']} | {kind} | {c['p50_ms']} / {c['p99_ms']} | "
                         f"{j['p50_ms']} / {j['p99_ms']} | {share} | "
                         f"{m[kind]['record_bytes_mean']} / {m[kind]['record_bytes_p99']} |")
    lines += ["", "| edits | records replayed | load via journal replay s | per record ms | "
              "load from compacted snapshot s | ratio | compaction s | plain save s |",
              "|---|---|---|---|---|---|---|---|"]
    for m in r["sizes"]:
        p = m["replay"]
        lines.append(f"| {m['edits_final']} | {p['records']} | {p['load_from_journal_s']} | "
                     f"{p['per_record_ms']} | "
                     f"{p['load_from_snapshot_s']} | {p['ratio_vs_snapshot']} | {m['compaction_s']} | "
                     f"{m['plain_save_s']} |")
    c = r["crash"]
    lines += ["", "Crash trials (`benchmarks/_crash.py`, SIGKILL at random moments, "
              f"seed {r['crash_seed']}): {c['trials']} trials, {c['kills']} kills "
              f"({c['kills_during_compaction']} during a compaction), "
              f"{c['acknowledged']} acknowledged writes, {c['recovered']} recovered, **{c['lost']} lost**, "
              f"{c['partial']} partial; in-flight write present {c['in_flight_present']} / absent "
              f"{c['in_flight_absent']} times; {c['seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    sizes = args.sizes or ([100] if args.quick else [200, 1000])
    trials = args.trials or (6 if args.quick else 24)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as d:
        results = [measure(n, Path(d)) for n in sizes]
        crash = run_crash_trials(trials, args.seed, Path(d) / "crash")
    report = {"benchmark": "journal", "quick": args.quick, "sizes": results, "crash": crash,
              "crash_seed": args.seed,
              "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                          "python": platform.python_version(), "platform": platform.platform()}}
    write_report(args.out, "journal_quick" if args.quick else "journal", report, markdown(report))
    return 0 if crash["lost"] == 0 and crash["partial"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
