"""Serving replicas sharing one memory through PostgreSQL, beside the single-directory store.

Three setups, each real ``esg-memory serve`` processes on this machine, measured in the same run:

- ``directory``: one server on a memory directory (``--memory DIR``), the embedded default;
- ``store x1``: one server on a PostgreSQL store (``--store URL``);
- ``store x3``: three servers on one store (one fresh database).

Per setup, after seeding ``--seed-edits`` edits:

1. *writes*: one client adds ``--writes`` edits in turn (no tuning), round-robin over the replicas,
   with no other load: writes/s and latency (each reply comes once the write is durable: fsynced
   journal, or committed log row);
2. *generate + propagation*: ``--clients`` client threads per replica call ``/generate`` without
   pause for ``--duration`` s (half the rows in scope of a seeded edit) while a writer, every
   ``--write-interval`` s, adds an edit on one replica or deletes the last one it added (rotating
   over the replicas). After each acknowledged write, one poller per *other* replica asks
   ``GET /edits/{id}`` every ``--poll-ms`` ms until the add is there (or the delete is gone): the
   propagation delay, from the write's reply to the first reply showing it. It includes the
   poll's own round trip, so it bounds visibility from above; polls and writer count in the load.

A delete still visible on a replica past the staleness bound counts as "deleted served past the
bound" (the issue's zero-tolerance figure). PostgreSQL is a throwaway server (Debian's binaries,
``benchmarks/_postgres_server.py``; fsync off unless ``--pg-fsync``).

    python benchmarks/bench_replicas.py            # 30 s generate phases, 60 writes (~6 min)
    python benchmarks/bench_replicas.py --quick    # 8 s phases, 20 writes (~3 min)

Writes ``replicas.json`` + ``replicas.md`` (``replicas_quick.*`` with --quick) to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _postgres_server import PgServer
from _report import write_report
from PIL import Image, ImageDraw

logger = logging.getLogger("bench_replicas")
ROOT = Path(__file__).resolve().parents[1]
COLORS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 20), (160, 32, 200), (20, 190, 190)]
SHAPES = ["circle", "rect"]


def png(color: tuple[int, int, int], shape: str) -> bytes:
    im = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)([13, 13, 51, 51], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``esg-memory serve`` process (output to a log file, so a full pipe never blocks it)."""

    def __init__(self, name: str, memory_args: list[str], args: argparse.Namespace, logs: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(args.threads),
        }
        argv = [
            sys.executable,
            "-m",
            "esg_memory.cli",
            "--model",
            args.model,
            "--clip",
            args.clip,
            "serve",
            *memory_args,
            "--insecure-local",
            "--port",
            self.url.rsplit(":", 1)[1],
            "--log-level",
            "warning",
        ]
        self.log = logs / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(120.0, connect=5.0))

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}):\n"
                        f"{self.log.read_text(errors='replace')[-3000:]}"
                    )
                try:
                    if c.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def add(c: httpx.Client, question: str, answer: str, image: bytes) -> int:
    r = c.post(
        "/edits",
        data={"question": question, "answer": answer, "tune": "never"},
        files={"image": ("x.png", image, "image/png")},
    )
    if r.status_code != 201:
        raise RuntimeError(f"add refused: {r.status_code} {r.text[:300]}")
    return int(r.json()["id"])


class Inputs:
    """Edit inputs (distinct question x picture pairs) and out-of-scope rows for /generate."""

    def __init__(self, seed: int) -> None:
        self.pictures = {(c, s): png(c, s) for c in COLORS for s in SHAPES}
        self.counter = itertools.count()
        self.rng = random.Random(seed)

    def new_edit(self) -> tuple[str, str, bytes]:
        i = next(self.counter)
        key = list(self.pictures)[i % len(self.pictures)]
        return f"what is written under picture number {i}?", f"answer-{i}", self.pictures[key]


def _seed(servers: list[Server], inputs: Inputs, n: int) -> list[tuple[str, bytes]]:
    """``n`` edits on the first server (all replicas see them once it returns); their inputs."""
    rows = []
    with servers[0].client() as c:
        for _ in range(n):
            q, a, img = inputs.new_edit()
            add(c, q, a, img)
            rows.append((q, img))
    for s in servers[1:]:
        with s.client() as c:
            while len(c.get("/edits", params={"limit": 1000}).json()["edits"]) < n:
                time.sleep(0.05)
    return rows


def write_phase(servers: list[Server], inputs: Inputs, n: int) -> dict[str, Any]:
    clients = [s.client() for s in servers]
    lat = []
    try:
        t0 = time.perf_counter()
        for i in range(n):
            q, a, img = inputs.new_edit()
            t = time.perf_counter()
            add(clients[i % len(clients)], q, a, img)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    return {
        "writes": n,
        "writes_per_s": round(n / wall, 2),
        "write_p50_ms": ms(percentile(lat, 50)),
        "write_p99_ms": ms(percentile(lat, 99)),
    }


def _visible(c: httpx.Client, eid: int) -> bool:
    r = c.get(f"/edits/{eid}")
    if r.status_code not in (200, 404):
        raise RuntimeError(f"GET /edits/{eid}: {r.status_code} {r.text[:200]}")
    return r.status_code == 200


def load_phase(
    servers: list[Server],
    inputs: Inputs,
    seeded: list[tuple[str, bytes]],
    args: argparse.Namespace,
    clients: int,
    duration: float,
) -> dict[str, Any]:
    stop = threading.Event()
    gen_lat: list[float] = []
    errors = itertools.count()
    lock = threading.Lock()
    outside = [
        (f"how many shapes are in this picture {k}?", img) for k, img in enumerate(inputs.pictures.values())
    ]

    def generator(server: Server, seed: int) -> None:
        rng = random.Random(seed)
        with server.client() as c:
            while not stop.is_set():
                q, img = rng.choice(seeded) if rng.random() < 0.5 else rng.choice(outside)
                t = time.perf_counter()
                r = c.post(
                    "/generate",
                    data={"prompt": q, "max_new_tokens": str(args.max_new_tokens)},
                    files={"image": ("x.png", img, "image/png")},
                )
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        gen_lat.append(dt)
                    else:
                        next(errors)

    delays: dict[str, list[float]] = {"add": [], "delete": []}  # upper bounds
    lower: list[float] = []
    past_bound: list[float] = []
    write_lat: list[float] = []

    # one open connection per server for its poller (a new client per poll would time its connect)
    pollers = {s.name: s.client() for s in servers}

    def wait_seen(server: Server, eid: int, kind: str, acked: float, out: list[tuple[float, float]]) -> None:
        # The change became visible after the last poll that missed it was sent and before the
        # first poll that saw it came back: (lower, upper) bounds on the delay after the ack.
        want, missed_sent, c = kind == "add", acked, pollers[server.name]
        while True:
            sent = time.perf_counter()
            if _visible(c, eid) == want:
                break
            missed_sent = sent
            if sent - acked > 60:
                raise RuntimeError(f"{kind} of {eid} not on {server.name} within 60 s")
            time.sleep(args.poll_ms / 1000)
        out.append((max(0.0, missed_sent - acked), time.perf_counter() - acked))

    def writer() -> None:
        clients = [s.client() for s in servers]
        mine: list[int] = []
        try:
            for i in itertools.count():
                if stop.wait(args.write_interval):
                    return
                k = i % len(servers)
                kind = "delete" if mine and i % 2 else "add"
                t = time.perf_counter()
                if kind == "add":
                    q, a, img = inputs.new_edit()
                    eid = add(clients[k], q, a, img)
                    mine.append(eid)
                else:
                    eid = mine.pop()
                    r = clients[k].delete(f"/edits/{eid}")
                    if r.status_code != 200:
                        raise RuntimeError(f"delete refused: {r.status_code} {r.text[:200]}")
                acked = time.perf_counter()
                write_lat.append(acked - t)
                got: list[tuple[float, float]] = []
                waits = [
                    threading.Thread(target=wait_seen, args=(s, eid, kind, acked, got))
                    for j, s in enumerate(servers)
                    if j != k
                ]
                for p in waits:
                    p.start()
                for p in waits:
                    p.join()
                delays[kind].extend(hi for _, hi in got)
                lower.extend(lo for lo, _ in got)
                if kind == "delete":
                    past_bound.extend(hi for _, hi in got if hi > args.staleness_bound)
        finally:
            for c in clients:
                c.close()

    threads = [
        threading.Thread(target=generator, args=(s, 1000 * j + i), daemon=True)
        for j, s in enumerate(servers)
        for i in range(clients)
    ]
    w = threading.Thread(target=writer, daemon=True)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    w.start()
    time.sleep(duration)
    stop.set()
    w.join(120)
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    for c in pollers.values():
        c.close()
    both = delays["add"] + delays["delete"]
    out = {
        "generate_requests": len(gen_lat),
        "generate_errors": next(errors),
        "seconds": round(wall, 2),
        "generate_per_s": round(len(gen_lat) / wall, 2),
        "generate_p50_ms": ms(percentile(gen_lat, 50)),
        "generate_p99_ms": ms(percentile(gen_lat, 99)),
        "writes_during_load": len(write_lat),
        "write_under_load_p50_ms": ms(percentile(write_lat, 50)),
    }
    if len(servers) > 1:
        out |= {
            "propagation_samples": len(both),
            "propagation_p50_ms": ms(percentile(both, 50)),
            "propagation_p99_ms": ms(percentile(both, 99)),
            "propagation_max_ms": ms(max(both, default=None)),
            "propagation_lower_p50_ms": ms(percentile(lower, 50)),
            "propagation_lower_p99_ms": ms(percentile(lower, 99)),
            "add_p99_ms": ms(percentile(delays["add"], 99)),
            "delete_p99_ms": ms(percentile(delays["delete"], 99)),
            "deleted_served_past_bound": len(past_bound),
        }
    return out


def run_setup(
    name: str, memory_args: list[list[str]], args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    logger.info("%s: starting %d server(s)", name, len(memory_args))
    t0 = time.perf_counter()
    servers = [Server(f"{name.replace(' ', '')}-{i}", a, args, logs) for i, a in enumerate(memory_args)]
    try:
        for s in servers:
            s.wait_ready()
        started = time.perf_counter() - t0
        inputs = Inputs(args.seed)
        seeded = _seed(servers, inputs, args.seed_edits)
        logger.info("%s: %d writes", name, args.writes)
        writes = write_phase(servers, inputs, args.writes)
        logger.info("%s: %s s of generate load", name, args.duration)
        load = load_phase(servers, inputs, seeded, args, args.clients, args.duration)
        idle = {}
        if len(servers) > 1:  # the same writes and polls with no generate load: the log's own delay
            logger.info("%s: %s s of writes without generate load", name, args.duration / 2)
            got = load_phase(servers, inputs, seeded, args, 0, args.duration / 2)
            idle = {f"idle_{k}": v for k, v in got.items() if k.startswith(("propagation", "deleted"))}
    finally:
        for s in servers:
            s.stop()
    return {"setup": name, "replicas": len(servers), "start_s": round(started, 1), **writes, **load, **idle}


def run(args: argparse.Namespace) -> dict[str, Any]:
    pg = PgServer(fsync=args.pg_fsync)
    tmp = Path(tempfile.mkdtemp(prefix="esg-bench-replicas-"))
    try:
        bound = ["--staleness-bound", str(args.staleness_bound)]
        setups = [
            ("directory", [["--memory", str(tmp / "dir")]]),
            ("store x1", [["--store", pg.database(), *bound]]),
        ]
        url = pg.database()
        setups.append(("store x3", [["--store", url, *bound]] * 3))
        rows = [run_setup(name, mem_args, args, tmp) for name, mem_args in setups]
    finally:
        pg.close()
    base = rows[0]
    for r in rows:
        r["writes_vs_directory"] = round(r["writes_per_s"] / base["writes_per_s"], 2)
        r["generate_vs_directory"] = round(r["generate_per_s"] / base["generate_per_s"], 2)
    return {
        "quick": args.quick,
        "model": args.model,
        "encoder": args.clip,
        "clients_per_replica": args.clients,
        "duration_s": args.duration,
        "write_interval_s": args.write_interval,
        "poll_ms": args.poll_ms,
        "max_new_tokens": args.max_new_tokens,
        "seed_edits": args.seed_edits,
        "staleness_bound_s": args.staleness_bound,
        "pg_fsync": args.pg_fsync,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_end": round(os.getloadavg()[0], 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "results": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else str(v)

    m = report["machine"]
    lines = [
        f"# Replicas benchmark ({'quick' if report['quick'] else 'full'})",
        "",
        f"`esg-memory serve` processes on `{report['model']}` + `{report['encoder']}`, one machine "
        f"({m['cpus']} CPUs, shared by every server, PostgreSQL and the clients; load average at end "
        f"{m['loadavg_at_end']}; {m['time']}). PostgreSQL fsync {'on' if report['pg_fsync'] else 'off'}; "
        f"{report['seed_edits']} edits seeded.",
        "",
        "| setup | servers | writes/s (1 client) | vs directory | write p50 / p99 ms | generate/s "
        f"({report['clients_per_replica']} clients per server) | vs directory | generate p50 / p99 ms | "
        "propagation p50 / p99 / max ms (n) | deleted served past the bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        prop = (
            f"{r['propagation_p50_ms']} / {r['propagation_p99_ms']} / {r['propagation_max_ms']} "
            f"({r['propagation_samples']})"
            if "propagation_samples" in r
            else "–"
        )
        lines.append(
            f"| {r['setup']} | {r['replicas']} | {r['writes_per_s']} | {r['writes_vs_directory']} | "
            f"{cell(r['write_p50_ms'])} / {cell(r['write_p99_ms'])} | {r['generate_per_s']} | "
            f"{r['generate_vs_directory']} | {cell(r['generate_p50_ms'])} / {cell(r['generate_p99_ms'])} | "
            f"{prop} | "
            f"{r.get('deleted_served_past_bound', '–')} |"
        )
    lines += [
        "",
        "Propagation (ms; a write acknowledged on one server until another shows it), as bounds: *upper* "
        "is the reply of the first poll that saw it, *lower* the sending of the last poll that missed it.",
        "",
        "| setup | load | upper p50 / p99 / max | lower p50 / p99 | samples | deleted served past bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for pre, load in (("", f"{report['clients_per_replica']} generate clients per server"),
                          ("idle_", "no generate load")):
            if f"{pre}propagation_samples" not in r:
                continue
            lines.append(
                f"| {r['setup']} | {load} | {r[pre + 'propagation_p50_ms']} / "
                f"{r[pre + 'propagation_p99_ms']} / {r[pre + 'propagation_max_ms']} | "
                f"{r[pre + 'propagation_lower_p50_ms']} / "
                f"{r[pre + 'propagation_lower_p99_ms']} | {r[pre + 'propagation_samples']} | "
                f"{r.get(pre + 'deleted_served_past_bound', '–')} |"
            )
    lines += [
        "",
        f"- *writes*: {report['results'][0]['writes']} adds (no tuning) from one client, round-robin over "
        "the servers, nothing else running; each reply comes once the write is durable.",
        f"- *generate*: {report['duration_s']} s of `/generate` ({report['max_new_tokens']} new tokens, "
        f"half the rows in scope of a seeded edit) while a writer adds or deletes an edit every "
        f"{report['write_interval_s']} s, rotating over the servers.",
        f"- *propagation*: from a write's reply on one server to the first `GET /edits/{{id}}` on another "
        f"that shows it (polled every {report['poll_ms']} ms; includes that request's round trip, so an "
        f"upper bound), adds and deletes together. Target p99 <= 100 ms. A delete"
        f" seen later than the staleness "
        f"bound ({report['staleness_bound_s']} s) counts as served past it.",
        "- All servers share the same cores: 3 servers cannot serve 3x the generate rate of one here; on one "
        "GPU each they would. The ratios compare setups measured in the same run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 s phases, 20 writes (~3 min)")
    p.add_argument("--duration", type=float, help="seconds of generate load per setup (30; quick 8)")
    p.add_argument("--writes", type=int, help="adds timed in the write phase (60; quick 20)")
    p.add_argument("--seed-edits", type=int, default=20)
    p.add_argument("--clients", type=int, default=4, help="generate clients per server")
    p.add_argument("--write-interval", type=float, default=0.25, help="seconds between writes under load")
    p.add_argument("--poll-ms", type=float, default=2.0)
    p.add_argument("--staleness-bound", type=float, default=2.0, help="the replicas' --staleness-bound")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--pg-fsync", action="store_true", help="PostgreSQL with fsync on (default off)")
    p.add_argument("--model", default="tiny-random-llava")
    p.add_argument("--clip", default="esg-tiny-clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.duration = args.duration or (8.0 if args.quick else 30.0)
    args.writes = args.writes or (20 if args.quick else 60)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run(args)
    write_report(args.out, "replicas_quick" if args.quick else "replicas", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
