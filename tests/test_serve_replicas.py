"""Serving replicas sharing one memory through PostgreSQL: real ``esg-memory serve --store`` processes.

Three replicas (tiny shipped models, CPU) on one fresh database, started once for the module. The
tests run in file order on the same replicas and record every write that got a 2xx in one ledger;
the last replica test checks that every acknowledged write is on every replica, and that no refused
write (503) is anywhere. Polls have a bound (no timing is asserted): propagation within 5 s.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import pytest
from _serve_fixtures import GREEN, PURPLE, Q

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "esg_memory.cli"]
MODELS = ["--model", "tiny-random-llava", "--clip", "esg-tiny-clip"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
PROPAGATE_S = 5.0  # bound on seeing another replica's write
RECOVER_S = 30.0  # bound on health transitions and restarts (reconnect back-off, loading on busy cores)
_answers = (f"answer-{i}" for i in itertools.count())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = PROPAGATE_S,
             show: Callable[[], str] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail after ``timeout`` seconds
    (``show``: what to add to the failure message)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            got = check()
        except httpx.TransportError as e:  # a replica still starting, or just killed
            got, last = None, e
        else:
            last = got
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s (last: {last!r}{'; ' + show() if show else ''})")
        time.sleep(0.05)


class Replica:
    """One ``esg-memory serve`` process (output in a log file: a full pipe would block the server)."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name, self.args, self.logs = name, args, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(60.0, connect=5.0))
        self._starts = itertools.count()

    def start(self) -> None:
        log = open(self.logs / f"{self.name}-{next(self._starts)}.log", "w")  # noqa: SIM115 (the child owns it)
        self.log_path = Path(log.name)
        argv = [*CLI, *MODELS, "serve", *self.args, "--insecure-local", "--port", str(self.port),
                "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        log.close()

    def wait_ready(self) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"replica {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            return self.client.get("/health").status_code == 200

        wait_for(f"replica {self.name} starting", up, timeout=180)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    # ------------------------------------------------------------------ requests
    def add(self, question: str, answer: str, image: bytes | None = None) -> httpx.Response:
        files = {"image": ("x.png", image, "image/png")} if image is not None else None
        return self.client.post("/edits", data={"question": question, "answer": answer, "tune": "never"},
                                files=files)

    def edit(self, eid: int) -> dict | None:
        r = self.client.get(f"/edits/{eid}")
        assert r.status_code in (200, 404), r.text
        return r.json() if r.status_code == 200 else None

    def generate(self, question: str, image: bytes | None = None) -> dict:
        files = {"image": ("x.png", image, "image/png")} if image is not None else None
        r = self.client.post("/generate", data={"prompt": question, "max_new_tokens": "4"}, files=files)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    def route(self, question: str, image: bytes | None = None) -> dict:
        files = {"image": ("x.png", image, "image/png")} if image is not None else None
        r = self.client.post("/route", data={"prompt": question}, files=files)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    def live(self) -> dict[int, str]:
        """{edit id: current answer} of every edit this replica serves."""
        out: dict[int, str] = {}
        for offset in itertools.count(0, 1000):
            page = self.client.get("/edits", params={"offset": offset, "limit": 1000})
            assert page.status_code == 200, page.text
            got = page.json()["edits"]
            out.update({e["id"]: e["answer"] for e in got})
            if len(got) < 1000:
                return out
        return out

    def health(self) -> httpx.Response:
        return self.client.get("/health")


class Ledger:
    """Every write a replica acknowledged (2xx), and the answers of writes it refused."""

    def __init__(self) -> None:
        self.live: dict[int, str] = {}  # edit id -> the acknowledged answer
        self.refused: set[str] = set()

    def add(self, replica: Replica, question: str | None = None, image: bytes | None = None) -> int:
        answer = next(_answers)
        r = replica.add(question or f"question about {answer}?", answer, image)
        assert r.status_code == 201, (replica.name, r.status_code, r.text)
        self.live[r.json()["id"]] = answer
        return r.json()["id"]

    def delete(self, replica: Replica, eid: int) -> None:
        r = replica.client.delete(f"/edits/{eid}")
        assert r.status_code == 200, (replica.name, r.status_code, r.text)
        del self.live[eid]

    def revise(self, replica: Replica, eid: int) -> None:
        answer = next(_answers)
        r = replica.client.patch(f"/edits/{eid}", data={"answer": answer, "tune": "never"})
        assert r.status_code == 200, (replica.name, r.status_code, r.text)
        self.live[eid] = answer


class Cluster:
    def __init__(self, url: str, replicas: dict[str, Replica]) -> None:
        self.url = url
        self.r = replicas
        self.ledger = Ledger()

    def others(self, name: str) -> list[Replica]:
        return [r for n, r in self.r.items() if n != name]


@pytest.fixture(scope="module")
def cluster(pg_server, tmp_path_factory) -> Iterator[Cluster]:
    url = pg_server.database()
    logs = tmp_path_factory.mktemp("replica-logs")
    # A: a long bound (stays "degraded" while the store is down); B: the default; C: a short one
    # (turns "unhealthy", HTTP 503, soon after the store goes)
    replicas = {
        "A": Replica("A", ["--store", url, "--staleness-bound", "60"], logs),
        "B": Replica("B", ["--store", url], logs),
        "C": Replica("C", ["--store", url, "--staleness-bound", "1"], logs),
    }
    try:
        for r in replicas.values():  # all at once: the first to store the seed snapshot wins
            r.start()
        for r in replicas.values():
            r.wait_ready()
        yield Cluster(url, replicas)
    finally:
        for r in replicas.values():
            r.stop()
            r.client.close()


# ------------------------------------------------------------------------------------------ propagation


def test_a_write_on_one_replica_is_served_by_the_others(cluster):
    a, b, c = cluster.r["A"], cluster.r["B"], cluster.r["C"]
    bare = {r.name: r.generate(Q, PURPLE) for r in (b, c)}
    assert all(row["edit_id"] is None for row in bare.values())
    eid = cluster.ledger.add(a, Q, PURPLE)
    answer = cluster.ledger.live[eid]
    for r in (b, c):
        got = wait_for(f"edit {eid} on {r.name}", lambda r=r: r.edit(eid))
        assert got["answer"] == answer and got["question"] == Q
        row = r.generate(Q, PURPLE)
        assert (row["edit_id"], row["edit_answer"]) == (eid, answer)
    assert c.generate("how many shapes are there?", GREEN)["edit_id"] is None  # out of scope

    # a revision on C is served by A and B
    cluster.ledger.revise(c, eid)
    revised = cluster.ledger.live[eid]
    for r in (a, b):
        wait_for(f"revision of {eid} on {r.name}",
                 lambda r=r: r.generate(Q, PURPLE)["edit_answer"] == revised)

    # a delete on B: A and C stop serving it, and answer as before the edit (bit-identical)
    cluster.ledger.delete(b, eid)
    for r in (a, c):
        wait_for(f"delete of {eid} on {r.name}", lambda r=r: r.edit(eid) is None)
        row = r.generate(Q, PURPLE)
        assert row["edit_id"] is None
        if r.name in bare:
            assert row["text"] == bare[r.name]["text"]
    # concurrent writers on all three: each write is planned on the log's head (no lost update)
    ids = [cluster.ledger.add(r) for r in (a, b, c, c, b, a)]
    for r in (a, b, c):
        wait_for(f"the concurrent writes on {r.name}", lambda r=r: set(ids) <= set(r.live()))


def test_sigkilled_replica_others_keep_serving_and_it_catches_up(cluster):
    a, b, c = cluster.r["A"], cluster.r["B"], cluster.r["C"]
    before = cluster.ledger.add(b)
    wait_for("B's write on A", lambda: a.edit(before))
    b.kill()  # no shutdown: its connections to the store just vanish
    while_down = [cluster.ledger.add(r) for r in (a, c, a)]
    gone = cluster.ledger.add(c)
    wait_for("C's write on A", lambda: a.edit(gone))
    cluster.ledger.delete(a, gone)
    for r in (a, c):
        wait_for(f"writes on {r.name} while B is down",
                 lambda r=r: set(while_down) <= set(r.live()) and gone not in r.live())
        assert r.generate(f"question about {cluster.ledger.live[while_down[0]]}?")["edit_id"] == while_down[0]
    b.start()
    b.wait_ready()
    live = b.live()
    assert set(while_down) | {before} <= set(live) and gone not in live
    assert {i: live[i] for i in while_down} == {i: cluster.ledger.live[i] for i in while_down}
    assert b.generate(f"question about {cluster.ledger.live[while_down[1]]}?")["edit_id"] == while_down[1]
    wait_for("the restarted B healthy", lambda: b.health().json()["status"] == "ok", RECOVER_S,
             show=lambda: b.health().text)
    assert b.health().json()["replica"]["applied"] == a.health().json()["replica"]["applied"]
    # and the restarted replica writes again, seen by the others
    again = cluster.ledger.add(b)
    for r in (a, c):
        wait_for(f"the restarted B's write on {r.name}", lambda r=r: r.edit(again))


def test_store_down_writes_refused_reads_served_then_recovered(cluster, pg_server):
    a, b, c = cluster.r["A"], cluster.r["B"], cluster.r["C"]
    keep = cluster.ledger.add(a)
    wait_for("the last write before the outage on C", lambda: c.edit(keep))
    probe = f"question about {cluster.ledger.live[keep]}?"
    pg_server.stop()
    try:
        answer = next(_answers)
        r = a.add(f"question about {answer}?", answer)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["error"] == "StoreUnavailableError" and body["status"] == 503
        assert "store" in body["detail"] and "password" not in body["detail"]
        cluster.ledger.refused.add(answer)
        r = c.client.delete(f"/edits/{keep}")
        assert r.status_code == 503 and r.json()["error"] == "StoreUnavailableError", r.text
        # reads go on from memory, on every replica
        for rep in (a, b, c):
            assert rep.generate(probe)["edit_id"] == keep
            assert rep.edit(keep)["answer"] == cluster.ledger.live[keep]

        def degraded() -> bool:
            h = a.health()
            return h.status_code == 200 and h.json()["status"] == "degraded" \
                and h.json()["replica"]["store"] == "unreachable"

        wait_for("A reporting degraded", degraded, RECOVER_S)
        assert a.health().json()["replica"]["healthy"] is True  # within its 60 s bound

        def unhealthy() -> bool:
            h = c.health()
            return h.status_code == 503 and h.json()["status"] == "unhealthy"

        wait_for("C reporting unhealthy (past its 1 s bound)", unhealthy, RECOVER_S)
        rc = c.health().json()["replica"]
        assert rc["healthy"] is False and rc["stale_s"] > rc["staleness_bound_s"] == 1.0
        assert rc["store"] == "unreachable" and rc["last_error"]
    finally:
        pg_server.start()

    def ok(rep: Replica) -> bool:
        h = rep.health()
        return h.status_code == 200 and h.json()["status"] == "ok" and h.json()["replica"]["store"] == "ok"

    for rep in (a, b, c):
        wait_for(f"{rep.name} healthy again", lambda rep=rep: ok(rep), RECOVER_S,
                 show=lambda rep=rep: rep.health().text)
    after = cluster.ledger.add(c)
    for rep in (a, b):
        wait_for(f"the first write after the outage on {rep.name}", lambda rep=rep: rep.edit(after))
    assert a.edit(keep) is not None  # the refused delete did not happen


def test_every_acknowledged_write_is_on_every_replica(cluster):
    if not cluster.ledger.live:  # run alone: its own write at least
        cluster.ledger.add(cluster.r["B"])
    expected = cluster.ledger.live
    for r in cluster.r.values():
        wait_for(f"{r.name} holding every acknowledged write", lambda r=r: r.live() == expected)
        assert not set(r.live().values()) & cluster.ledger.refused
        applied = r.health().json()["replica"]["applied"]
        assert applied == cluster.r["A"].health().json()["replica"]["applied"]


# ------------------------------------------------------------------------------------------ migrate


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start, no torch import: seconds saved per call)."""
    from esg_memory.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _route(capsys, memory: Path, question: str, image: Path | None) -> dict:
    extra = ["--image", str(image)] if image is not None else []
    rc, out, err = _main(capsys, "--memory", str(memory), "--clip", "esg-tiny-clip", "--json", "route",
                         "--question", question, *extra)
    assert rc == 0, err
    return json.loads(out)


def test_migrate_between_a_directory_and_a_store(cluster, pg_server, tmp_path, capsys):
    a = cluster.r["A"]
    while len(cluster.ledger.live) < 3:  # run alone: something to move
        cluster.ledger.add(a)
    image_edit = cluster.ledger.add(a, Q, PURPLE)
    purple = tmp_path / "purple.png"
    purple.write_bytes(PURPLE)
    inputs = [(f"question about {ans}?", None) for ans in list(cluster.ledger.live.values())[:3]]
    inputs += [(Q, purple), ("something nobody edited?", None)]
    expected = dict(cluster.ledger.live)
    wait_for("A at the head", lambda: a.live() == expected)

    # the replicas' store -> a directory (in this process), then DIR -> a fresh store -> DIR2 (real processes)
    first, second, url2 = tmp_path / "from-store", tmp_path / "round-trip", pg_server.database()
    rc, out, err = _main(capsys, "--clip", "esg-tiny-clip", "--json", "migrate", cluster.url, str(first))
    assert rc == 0 and json.loads(out)["edits"] == len(expected), err
    for src, dst in ((first, url2), (url2, second)):
        done = _cli("--clip", "esg-tiny-clip", "--json", "migrate", str(src), str(dst))
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == {"source": str(src), "target": str(dst), "edits": len(expected)}
    before = [_route(capsys, first, q, img) for q, img in inputs]
    after = [_route(capsys, second, q, img) for q, img in inputs]
    assert after == before  # bit for bit: ids, scores, thresholds, margins, explanations
    served = [a.route(q, None if img is None else PURPLE) for q, img in inputs]
    assert [r["edit_id"] for r in before] == [-1 if s["edit_id"] is None else s["edit_id"] for s in served]
    assert [r["score"] for r in before[:4]] == pytest.approx([s["score"] for s in served[:4]], abs=1e-6)
    assert before[3]["edit_id"] == image_edit and before[4]["edit_id"] == -1

    # refusals, each with a clear message and no traceback
    for src, dst, says in ((first, url2, "already holds a memory"), (url2, first, "not empty"),
                           (first, tmp_path / "x", "between a directory and a postgresql"),
                           (cluster.url, url2, "between a directory and a postgresql")):
        rc, _, err = _main(capsys, "--clip", "esg-tiny-clip", "migrate", str(src), str(dst))
        assert rc == 1 and says in err, err
    done = _cli("migrate", str(first), str(tmp_path / "y"))  # refused before the encoder loads
    assert done.returncode == 1 and "between a directory" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "y").exists()

    # the migrated directory serves: the same edits, the same routing, and it takes writes
    solo = Replica("solo", ["--memory", str(second)], tmp_path)
    try:
        solo.start()
        solo.wait_ready()
        assert solo.live() == expected
        assert [solo.route(q, None if img is None else PURPLE)["edit_id"] for q, img in inputs] == \
            [s["edit_id"] for s in served]
        assert solo.add("a new question?", "a new answer").status_code == 201
    finally:
        solo.stop()
        solo.client.close()
    assert solo.proc.returncode == 0, solo.log_tail()
    rc, out, err = _main(capsys, "--memory", str(second), "--clip", "esg-tiny-clip", "--json", "list")
    assert rc == 0 and len(json.loads(out)) == len(expected) + 1, err  # the served write is in the directory


# ------------------------------------------------------------------------------------------ refusals


def test_serve_refuses_a_path_for_store_in_a_real_process(tmp_path):
    done = subprocess.run([*CLI, "serve", "--store", "/tmp/not-a-url", "--insecure-local"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "--store takes a postgresql:// URL" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--store", "postgresql://u@/db?host=/nowhere", "--memory", "m", "--insecure-local"],
         "not both"),
        (["serve", "--memory", "m", "--staleness-bound", "3", "--insecure-local"], "--staleness-bound needs"),
        # the model loads, then the store cannot be reached: one line, no traceback, nothing served
        ([*MODELS, "serve", "--store", "postgresql://postgres@/db?host={tmp}", "--insecure-local", "--port",
          "1"], "cannot reach the store"),
    ],
    ids=["memory-and-store", "bound-without-store", "unreachable"],
)
def test_serve_store_refusals(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ESG_MEMORY_DIR", raising=False)
    monkeypatch.delenv("ESG_MEMORY_STORE", raising=False)
    rc, _, err = _main(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 1 and says in err, err
    assert not (tmp_path / "m").exists()  # refused before anything was created
