"""The cost curve of an `EditMemory` as it grows: time per add, per delete, per route and per replayed
journal record against N, on a uniform synthetic stream (issue #20).

The stream: N text edits whose keys are seeded random unit vectors (`SyntheticEncoder`: a key is a
function of its text alone, so neighbours are as rare as in a large, varied memory), d = 512,
no generated positives or hard negatives (the keys have no structure for them to find). The memory
grows by ``add_many`` chunks of ``--chunk`` edits; at each checkpoint N it measures, each in its
own phase:

- **add**: ``--probes`` single ``add`` calls (median and p90 per call; each re-fits the edits it
  enters the neighbour set of);
- **delete**: ``--probes`` single ``delete`` calls of the edits just added (the default two-phase
  delete, then `settle` timed on its own, per deleted edit);
- **route**: ``--queries`` single-row ``route_ids`` calls on stored keys plus noise, half of them of
  deleted or never-added inputs (out of scope), keys precomputed (excluding key encoding, as the
  target does);
- **replay**: the memory made durable at N (one snapshot) and ``EditMemory.load`` timed (the open
  time); then ``--replay-records`` adds journaled after it and the load timed again: the difference
  over the records is the replay cost per record (reading and installing it).

Flat or logarithmic is the target, never linear. Prints a table, writes ``cost_curve.json``,
``cost_curve.md`` and ``cost_curve.png`` (log-log, one line per operation) to ``--out``.

    python benchmarks/bench_cost_curve.py                  # N = 1k, 3k, 10k, 30k, 100k (~15 min)
    python benchmarks/bench_cost_curve.py --quick          # N = 500, 2k (< 1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its helper modules, also when imported

from _report import write_report
from tqdm import tqdm

logger = logging.getLogger("bench_cost_curve")
DIM = 512


class SyntheticEncoder:
    """Seeded random unit keys: a text's key is a function of its text (sha256-seeded), an image's of
    its bytes; a pair is their normalised sum. No model, so the curve is the memory's own cost."""

    name = "synthetic-uniform-512"
    dim = DIM

    @staticmethod
    def _unit(token: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(token).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), np.float32)
        return np.stack([self._unit(b"t" + t.encode()) for t in texts])

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        rows = [self._unit(b"i" + (bytes(i) if isinstance(i, (bytes, bytearray)) else str(i).encode()))
                for i in images]
        return np.stack(rows) if rows else np.zeros((0, DIM), np.float32)

    def encode(self, images: Sequence[Any], texts: Sequence[str | None]) -> np.ndarray:
        out = []
        for im, t in zip(images, texts, strict=True):
            v = np.zeros(DIM, np.float32)
            if t is not None:
                v += self.encode_texts([t])[0]
            if im is not None:
                v += self.encode_images([im])[0]
            out.append(v / np.linalg.norm(v))
        return np.stack(out) if out else np.zeros((0, DIM), np.float32)


def edit(i: int) -> dict[str, Any]:
    return {"question": f"what is the value of synthetic fact number {i}?", "answer": f"value {i}"}


def _ms(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 3)


def checkpoint(mem: Any, n: int, next_i: int, args: argparse.Namespace, work: Path) -> tuple[dict, int]:
    from esg_memory import EditMemory

    rng = np.random.default_rng(n)
    row: dict[str, Any] = {"n_edits": n}
    # add
    add_t, added = [], []
    for _ in range(args.probes):
        t = time.perf_counter()
        added.append(mem.add(**edit(next_i)))
        add_t.append(time.perf_counter() - t)
        next_i += 1
    row |= {"add_ms_median": _ms(add_t, 50), "add_ms_p90": _ms(add_t, 90)}
    # delete (two-phase), then the settle of all of them
    del_t = []
    for eid in added:
        t = time.perf_counter()
        mem.delete(eid)
        del_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    mem.settle()
    settle_s = time.perf_counter() - t
    row |= {"delete_ms_median": _ms(del_t, 50), "delete_ms_p90": _ms(del_t, 90),
            "settle_ms_per_delete": round(settle_s * 1000 / len(added), 3)}
    # route: keys precomputed; half near a live edit's key, half of deleted / never-added inputs
    ids = mem.list()
    picks = rng.choice(len(ids), size=args.queries // 2)
    texts = [ids[int(j)].question for j in picks]
    texts += [edit(int(e))["question"] for e in added[: args.queries // 4]]
    texts += [f"an unrelated question {k}?" for k in range(args.queries - len(texts))]
    keys = [mem.query_keys(texts=[q]) for q in texts]
    for k in keys[:20]:
        mem.route_ids(keys=k)  # warm
    route_t = []
    for k in keys:
        t = time.perf_counter()
        mem.route_ids(keys=k)
        route_t.append(time.perf_counter() - t)
    row |= {"route_ms_median": _ms(route_t, 50), "route_ms_p90": _ms(route_t, 90)}
    # replay: a durable copy at N, records journaled after its snapshot, loaded with and without them
    d = work / f"durable-{n}"
    mem.make_durable(d)

    def load_s() -> float:  # the fastest of three loads: the difference below is small beside the snapshot
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            EditMemory.load(d, SyntheticEncoder())
            best = min(best, time.perf_counter() - t)
        return best

    snapshot_only = load_s()  # N edits, all in the snapshot
    for _ in range(args.replay_records):
        mem.add(**edit(next_i))
        next_i += 1
    with_journal = load_s()  # the same snapshot, then that many records replayed
    log = mem.journal
    mem.set_journal(None)  # the memory goes on growing in memory only
    log.close(mem)  # releases the directory lock (compacted already: nothing to write)
    shutil.rmtree(d, ignore_errors=True)
    row |= {"open_s": round(snapshot_only, 3),
            "replay_ms_per_record": round((with_journal - snapshot_only) * 1000 / args.replay_records, 3)}
    return row, next_i


def run(args: argparse.Namespace) -> dict[str, Any]:
    from esg_memory import EditMemory
    from esg_memory.config import MemoryConfig

    cfg = MemoryConfig(n_text_positives=0, n_image_positives=0, n_generic_questions=0)
    mem = EditMemory(SyntheticEncoder(), cfg, backend=args.backend)
    work = Path(tempfile.mkdtemp(prefix="esg-cost-curve-"))
    rows, next_i, have = [], 0, 0
    try:
        with tqdm(total=max(args.sizes), unit="edit", desc="growing") as bar:
            for n in sorted(args.sizes):
                while have < n:
                    k = min(args.chunk, n - have)
                    t = time.perf_counter()
                    mem.add_many([edit(next_i + j) for j in range(k)])
                    rate = k / (time.perf_counter() - t)
                    next_i, have = next_i + k, have + k
                    bar.update(k)
                row, next_i = checkpoint(mem, n, next_i, args, work)
                row["add_many_edits_per_s"] = round(rate, 1)
                rows.append(row)
                have = len(mem)
                logger.info("N=%d: %s", n, row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stream = "uniform synthetic (seeded random unit keys, d=512, text edits, no generated positives)"
    return {"stream": stream,
            "backend": args.backend, "probes": args.probes, "queries": args.queries, "chunk": args.chunk,
            "replay_records": args.replay_records,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_at_end": round(os.getloadavg()[0], 2),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "rows": rows}


COLS = [
    ("N", "n_edits"),
    ("add ms med / p90", ("add_ms_median", "add_ms_p90")),
    ("delete ms med / p90", ("delete_ms_median", "delete_ms_p90")),
    ("settle ms / delete", "settle_ms_per_delete"),
    ("route ms med / p90", ("route_ms_median", "route_ms_p90")),
    ("replay ms / record", "replay_ms_per_record"),
    ("open s (snapshot)", "open_s"),
    ("add_many edits/s", "add_many_edits_per_s"),
]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Cost curve ({report['stream']})", "",
             f"Backend `{report['backend']}`, {report['probes']} adds and deletes, "
             f"{report['replay_records']} journaled records and {report['queries']} single-row routes per "
             f"checkpoint; {m['cpus']} CPUs shared, load average at end {m['loadavg_at_end']}, {m['time']}.",
             "",
             "| " + " | ".join(c for c, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in report["rows"]:
        cells = [" / ".join(str(r[k]) for k in key) if isinstance(key, tuple) else str(r[key])
                 for _, key in COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n_edits"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("add_ms_median", "add"), ("delete_ms_median", "delete (call)"),
                       ("settle_ms_per_delete", "settle per delete"), ("route_ms_median", "route (1 row)"),
                       ("replay_ms_per_record", "replay per record")):
        ax.plot(n, [max(r[key], 1e-3) for r in report["rows"]], marker="o", label=label)
    ax.plot(n, [n_ / n[0] * report["rows"][0]["add_ms_median"] for n_ in n], "k:", label="linear (from add)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("edits in the memory (N)")
    ax.set_ylabel("ms per operation (median)")
    ax.set_title("EditMemory cost per operation vs N (uniform synthetic stream)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 500, 2000")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--replay-records", type=int, default=1000, help="adds journaled after the snapshot")
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([500, 2000] if args.quick else [1000, 3000, 10000, 30000, 100000])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    report = run(args)
    stem = "cost_curve_quick" if args.quick else "cost_curve"
    plot(report, write_report(args.out, stem, report, markdown(report)).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
