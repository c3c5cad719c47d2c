"""Throughput and latency of ``POST /generate`` on the service, while a writer adds edits.

For each memory size (0 and 10k edits by default; built with ``EditMemory.add_many``, no tuning):

1. *in-process*: one thread calling ``EditedModel.answer`` on one (image, question) row at a time,
   no HTTP, no writer — the baseline, measured in the same run on the same memory (which is the
   service's: the service runs in this process);
2. *service, 1 client*: the HTTP + batcher overhead on the same serial load (1 and 2 alternate in
   ``--rounds`` slices, so both see the same background load on a shared machine);
3. *service, N clients + writer*: N client threads send ``/generate`` while a writer adds one edit
   every ``--writer-interval`` s (each journaled and fsynced before its reply), as in production;
4. *old persistence, same size*: ``--old-writes`` adds done the way the service persisted before the
   journal (add, then a full atomic snapshot of the memory) — the write-latency baseline.

Memories are built once per size and kept (a durable wrapper directory) under ``--cache``
(default ``benchmarks/results/.cache``, gitignored): each run copies the cached directory and the
service resumes its journal, so a 10k-edit memory costs its build (minutes) only the first time.

Requests are real pixels and questions from easy-vqa's test split (the ``easy-vqa`` package);
edits are easy-vqa (image, question) pairs with new answers, so requests hit edits in proportion
to the memory's coverage of that pool (reported). The server runs in this process (uvicorn in a
thread), so clients and server share the GIL and the cores: the ratios are conservative.

    python benchmarks/bench_service.py            # 0 and 10000 edits, 20 s per phase
    python benchmarks/bench_service.py --quick    # 0 and 50 edits, 3 s per phase (< 1 min)

Writes ``service.json`` and ``service.md`` (``service_quick.*`` with --quick) to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_report
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger("bench_service")
TOKEN = "bench-token-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def easy_vqa_pool(limit: int, seed: int) -> list[tuple[bytes, str, str]]:
    """(png bytes, question, answer) rows from easy-vqa's test split, shuffled."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    qs, answers, ids = easy_vqa.get_test_questions()
    cache: dict[int, bytes] = {}
    rows = []
    for q, a, i in zip(qs, answers, ids, strict=True):
        if i not in cache:
            cache[i] = Path(paths[i]).read_bytes()
        rows.append((cache[i], q, a))
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize(lat: list[float], seconds: float, errors: int) -> dict[str, Any]:
    return {
        "requests": len(lat),
        "errors": errors,
        "seconds": round(seconds, 2),
        "rps": round(len(lat) / seconds, 2) if seconds > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1000, 1),
        "p99_ms": round(percentile(lat, 99) * 1000, 1),
        "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else float("nan"),
    }


def build_memory(encoder: Any, pool: list[tuple[bytes, str, str]], n: int, chunk: int) -> tuple[Any, float]:
    from esg_memory.memory import EditMemory

    mem = EditMemory(encoder)
    t0 = time.perf_counter()
    specs = []
    for j in range(n):
        img, q, _ = pool[j % len(pool)]
        # past the pool's size the same (image, question) gets a distinct variant question
        question = q if j < len(pool) else f"{q} (variant {j // len(pool)})"
        specs.append({"image": img, "question": question, "answer": f"edited answer {j}"})
    for s in tqdm(range(0, n, chunk), desc=f"add_many {n}", disable=n <= chunk):
        mem.add_many(specs[s:s + chunk])
    return mem, time.perf_counter() - t0


def cached_memory_dir(args: argparse.Namespace, base: Any, processor: Any, encoder: Any,
                      pool: list[tuple[bytes, str, str]], n: int) -> tuple[Path, float | None]:
    """A durable wrapper directory with ``n`` edits under ``--cache`` (built on first use): (dir, build s)."""
    from esg_memory.model import EditedModel

    d = Path(args.cache) / f"service-{args.model}-{args.clip}-{n}"
    if (d / "edited_model.json").is_file():
        # the cache was built for this same model (the name is in the path); rewrite its identity
        # record so a change in how the library fingerprints models does not invalidate it
        EditedModel.wrap(base, processor, memory=None, encoder=encoder).save_meta(d)
        return d, None
    mem, build_s = build_memory(encoder, pool, n, args.chunk)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mem.make_durable(tmp / "memory")
    EditedModel.wrap(base, processor, memory=mem).save_meta(tmp)
    mem.close()
    os.replace(tmp, d)
    return d, build_s


def old_snapshot_writes(em: Any, pool: list[tuple[bytes, str, str]], k: int,
                        budget_s: float) -> dict[str, Any]:
    """Adds persisted the pre-journal way: each followed by a full atomic snapshot of the memory."""
    lat: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        t_end = time.perf_counter() + budget_s
        for j in range(k):
            img, q, _ = pool[j % len(pool)]
            s = time.perf_counter()
            eid = em.add_edit(Image.open(io.BytesIO(img)), f"{q} (old-style write {j})", f"old {j}",
                              tune="never")
            em.memory.save(Path(d) / "snapshot")  # what EditService.persist did per write
            lat.append(time.perf_counter() - s)
            em.delete_edit(eid)
            if time.perf_counter() > t_end:
                break
    return {"writes": len(lat), "write_p50_ms": round(percentile(lat, 50) * 1000, 1),
            "write_p99_ms": round(percentile(lat, 99) * 1000, 1),
            "write_max_ms": round(max(lat) * 1000, 1) if lat else None}


def in_process(em: Any, requests: list[tuple[Image.Image, str]], seconds: float, max_new: int,
               seed: int = 0) -> tuple[list[float], float]:
    """Serial ``EditedModel.answer`` calls for ``seconds``: (latencies, elapsed)."""
    rng = random.Random(seed)
    lat: list[float] = []
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while time.perf_counter() < t_end:
        im, q = requests[rng.randrange(len(requests))]
        s = time.perf_counter()
        em.answer([im], [q], max_new_tokens=max_new)
        lat.append(time.perf_counter() - s)
    return lat, time.perf_counter() - t0


def load_phase(url: str, requests: list[tuple[bytes, str]], seconds: float, clients: int, max_new: int,
               writer_interval: float | None, writer_pool: list[tuple[bytes, str, str]]) -> dict:
    import httpx

    lat: list[float] = []
    hits = [0, 0]
    errors = [0]
    lock = threading.Lock()
    stop = threading.Event()
    writes: list[float] = []
    write_errors = [0]

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                img, q = requests[rng.randrange(len(requests))]
                s = time.perf_counter()
                r = c.post("/generate", data={"prompt": q, "max_new_tokens": str(max_new)},
                           files={"image": ("x.png", img, "image/png")})
                d = time.perf_counter() - s
                with lock:
                    if r.status_code != 200:
                        errors[0] += 1
                        continue
                    lat.append(d)
                    row = r.json()["results"][0]
                    hits[0] += row["edit_id"] is not None
                    hits[1] += 1

    def writer() -> None:
        rng = random.Random(99)
        with httpx.Client(base_url=url, timeout=300) as c:
            k = 0
            while not stop.is_set():
                img, q, _ = writer_pool[rng.randrange(len(writer_pool))]
                s = time.perf_counter()
                r = c.post("/edits", headers=AUTH, data={"question": f"{q} (writer {k})", "answer": f"w{k}"},
                           files={"image": ("x.png", img, "image/png")})
                d = time.perf_counter() - s
                if r.status_code == 201:
                    writes.append(d)
                else:
                    write_errors[0] += 1
                k += 1
                stop.wait(max(0.0, writer_interval - d))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    if writer_interval is not None:
        threads.append(threading.Thread(target=writer, daemon=True))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    out = summarize(lat, elapsed, errors[0])
    out["latencies"] = lat
    out["edit_hit_rate"] = round(hits[0] / hits[1], 3) if hits[1] else 0.0
    if writer_interval is not None:
        out["writes"] = len(writes)
        out["write_errors"] = write_errors[0]
        out["writes_per_s"] = round(len(writes) / elapsed, 2)
        out["write_p50_ms"] = round(percentile(writes, 50) * 1000, 1)
        out["write_p99_ms"] = round(percentile(writes, 99) * 1000, 1)
    return out


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, v = line.rsplit(" ", 1)
            vals[name] = float(v)
    return vals


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from esg_memory.loading import load_base_model, load_encoder
    from esg_memory.model import EditedModel
    from esg_memory.serve import ServiceConfig, create_app, running_server

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, processor = load_base_model(args.model)
    encoder = load_encoder(args.clip)
    logger.info("models loaded in %.1fs", time.perf_counter() - t0)
    pool = easy_vqa_pool(max(args.edits) + 500, seed=0)
    # requests: the first 1000 pool rows (edited when the memory is large enough), as bytes and PIL
    req_bytes = [(img, q) for img, q, _ in pool[:1000]]
    req_pil = [(Image.open(io.BytesIO(img)).convert("RGB"), q) for img, q in req_bytes]
    writer_pool = pool[-500:]
    results = []
    for n in args.edits:
        src, build_s = cached_memory_dir(args, base, processor, encoder, pool, n)
        row: dict[str, Any] = {"edits": n, "build_s": None if build_s is None else round(build_s, 1)}
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            shutil.copytree(src, d, dirs_exist_ok=True)
            em = EditedModel.wrap(base, processor, memory=d, encoder=encoder)  # snapshot + journal replay
            row["load_s"] = round(time.perf_counter() - t, 2)
            cfg = ServiceConfig(max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms)
            t = time.perf_counter()
            app = create_app(em, d, token=TOKEN, config=cfg)  # resumes the directory's journal
            row["service_start_s"] = round(time.perf_counter() - t, 2)
            in_process(em, req_pil, min(2.0, args.duration / 4), args.max_new_tokens)  # warm caches, adapters
            with running_server(app) as url:
                # the serial phases alternate in slices so both see the same background load
                ip_lat, ip_s, http_lat, http_s, hit = [], 0.0, [], 0.0, []
                piece = args.duration / args.rounds
                for r in range(args.rounds):
                    lat, el = in_process(em, req_pil, piece, args.max_new_tokens, seed=r)
                    ip_lat += lat
                    ip_s += el
                    one = load_phase(url, req_bytes, piece, 1, args.max_new_tokens, None, writer_pool)
                    http_lat += one["latencies"]
                    http_s += one["seconds"]
                    hit.append(one["edit_hit_rate"])
                row["in_process"] = summarize(ip_lat, ip_s, 0)
                row["service_1_client"] = summarize(http_lat, http_s, 0)
                row["service_1_client"]["edit_hit_rate"] = round(statistics.fmean(hit), 3)
                before = scrape(url)
                row["service_with_writer"] = load_phase(
                    url, req_bytes, args.duration, args.clients, args.max_new_tokens, args.writer_interval,
                    writer_pool)
                row["service_with_writer"].pop("latencies")
                after = scrape(url)
                t = time.perf_counter()
                em.memory.compact()  # what the background and shutdown compactions cost at this size
                row["compaction_s"] = round(time.perf_counter() - t, 2)
            # the pre-journal baseline, on a plain (non-journaled) copy of the same memory
            old = EditedModel.wrap(base, processor, memory=d, encoder=encoder)
            row["old_snapshot_writes"] = old_snapshot_writes(old, writer_pool, args.old_writes,
                                                             args.old_budget)
            delta = {k: after.get(f"esg_memory_{k}", 0.0) - before.get(f"esg_memory_{k}", 0.0)
                     for k in ("batch_rows_count", "batch_rows_sum", "persist_seconds_count",
                               "persist_seconds_sum", "compactions")}
            w = row["service_with_writer"]
            w["mean_batch_rows"] = (round(delta["batch_rows_sum"] / delta["batch_rows_count"], 2)
                                    if delta["batch_rows_count"] else 0.0)
            pc = delta["persist_seconds_count"]
            w["persist_mean_ms"] = round(1000 * delta["persist_seconds_sum"] / pc, 1) if pc else None
            w["background_compactions"] = int(delta["compactions"])
        base_rps = row["in_process"]["rps"]
        for k in ("service_1_client", "service_with_writer"):
            row[k]["rps_ratio_vs_in_process"] = round(row[k]["rps"] / base_rps, 3) if base_rps else None
        results.append(row)
        logger.info("%d edits: %s", n, json.dumps(row))
    return {
        "benchmark": "service",
        "quick": args.quick,
        "model": args.model,
        "encoder": args.clip,
        "clients": args.clients,
        "writer_interval_s": args.writer_interval,
        "max_new_tokens": args.max_new_tokens,
        "max_batch_rows": args.max_batch_rows,
        "batch_wait_ms": args.batch_wait_ms,
        "duration_s": args.duration,
        "torch_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Service benchmark ({'quick' if report['quick'] else 'full'})",
        "",
        f"`/generate` on `{report['model']}` + `{report['encoder']}`, {report['max_new_tokens']} new tokens, "
        f"{report['clients']} clients with a writer adding one edit every {report['writer_interval_s']} s "
        f"(each journaled + fsynced before its reply); {report['duration_s']} s per phase; "
        f"{report['machine']['cpus']} CPUs, load average at end {report['machine']['loadavg_at_end']}.",
        "",
        "| edits | phase | req/s | ratio vs in-process | p50 ms | p99 ms | errors | edit hits | batch rows "
        "| writes/s | write p50 / p99 ms | journal ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for key, label in (("in_process", "in-process, serial"), ("service_1_client", "HTTP, 1 client"),
                           ("service_with_writer", f"HTTP, {report['clients']} clients + writer")):
            p = r[key]
            ratio = p.get("rps_ratio_vs_in_process", 1.0 if key == "in_process" else None)
            w = (f"{p['writes_per_s']} | {p['write_p50_ms']} / {p['write_p99_ms']} | {p['persist_mean_ms']}"
                 if "writes" in p else "– | – | –")
            lines.append(
                f"| {r['edits']} | {label} | {p['rps']} | {ratio} | {p['p50_ms']} | {p['p99_ms']} | "
                f"{p['errors']} | {p.get('edit_hit_rate', '–')} | {p.get('mean_batch_rows', '–')} | {w} |"
            )
    lines += [
        "",
        "Write latency (HTTP `POST /edits`, no tuning) with the journal vs the pre-journal service,",
        "which followed each add with a full atomic snapshot of the memory (measured in-process on the",
        "same memory, no HTTP and no concurrent readers, so the baseline is if anything flattered):",
        "",
        "| edits | journal: write p50 / p99 ms | journal append+fsync ms (mean) | full snapshot per write: "
        "p50 / p99 ms (n) | p50 ratio | compaction s |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        w, o = r["service_with_writer"], r["old_snapshot_writes"]
        ratio = round(o["write_p50_ms"] / w["write_p50_ms"], 1) if w.get("write_p50_ms") else None
        lines.append(f"| {r['edits']} | {w['write_p50_ms']} / {w['write_p99_ms']} | {w['persist_mean_ms']} | "
                     f"{o['write_p50_ms']} / {o['write_p99_ms']} ({o['writes']}) | {ratio} | "
                     f"{r['compaction_s']} |")
    lines += ["", "Memory directories (cached under `--cache`; built with add_many, no tuning):", ""]
    lines += [f"- {r['edits']} edits: built in {'(cached)' if r['build_s'] is None else r['build_s']} s, "
              f"loaded (snapshot + journal replay) in {r['load_s']} s, "
              f"service started in {r['service_start_s']} s" for r in report["results"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="0 and 50 edits, 3 s phases (< 1 min)")
    p.add_argument("--edits", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated memory sizes (default 0,10000; quick 0,50)")
    p.add_argument("--duration", type=float, default=None, help="seconds per phase (default 20; quick 3)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--writer-interval", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=3.0)
    p.add_argument("--chunk", type=int, default=500, help="edits per add_many call while building")
    p.add_argument("--rounds", type=int, default=4, help="alternating in-process / HTTP slices")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--model", default="tiny-random-llava")
    p.add_argument("--clip", default="esg-tiny-clip")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--cache", default=str(Path(__file__).resolve().parent / "results" / ".cache"),
                   help="where built memories are kept between runs")
    p.add_argument("--old-writes", type=int, default=5, help="pre-journal (full snapshot) writes to time")
    p.add_argument("--old-budget", type=float, default=120.0, help="seconds at most for those")
    args = p.parse_args(argv)
    args.edits = args.edits or ([0, 50] if args.quick else [0, 10000])
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run(args)
    write_report(args.out, "service_quick" if args.quick else "service", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
