"""`esg-memory serve` through a real uvicorn on 127.0.0.1: auth, edits live and persisted, bad input, metrics,
concurrency. Models: the seeded random tiny LLaVA and the tiny offline CLIP (no downloads)."""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import pytest
import uvicorn  # noqa: F401  (an [all] extra: missing means failing, never skipping)
from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, Q, running
from PIL import Image

from esg_memory.errors import ConfigError, LockError
from esg_memory.serve import add_serve_arguments, create_app, load_token
from esg_memory.serve.batch import MicroBatcher
from esg_memory.serve.directory import DirectoryLock
from esg_memory.serve.metrics import Metrics
from index import RWLock

TIMEOUT = httpx.Timeout(60.0, connect=5.0)


def wrap(serve_base, memory=None):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    # no generated paraphrases/augmentations: tuning on one example keeps the test in seconds
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    return EditedModel.wrap(model, processor, memory=memory, encoder=encoder, config=cfg)


def bare_answer(em, image: bytes, prompt: str, n: int = 6) -> str:
    with em.disable_edits():
        return em.answer([Image.open(io.BytesIO(image))], [prompt], max_new_tokens=n)[0]


def gen(c, image: bytes, prompt: str, n: int = 6, **extra) -> dict:
    r = c.post("/generate", data={"prompt": prompt, "max_new_tokens": str(n), **extra},
               files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def add(c, image: bytes | None, question: str, answer: str, **fields) -> httpx.Response:
    files = {"image": ("x.png", image, "image/png")} if image is not None else None
    data = {"question": question, "answer": answer, **fields}
    return c.post("/edits", headers=AUTH, data=data, files=files)


# ------------------------------------------------------------------------------------------ end to end


def test_edit_lifecycle_live_persisted_and_exact(serve_base, tmp_path):
    mem = tmp_path / "mem"
    em = wrap(serve_base)
    bare_q = bare_answer(em, PURPLE, Q)
    bare_other = bare_answer(em, GREEN, "how many shapes are there?")
    with running(create_app(em, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert gen(c, PURPLE, Q)["text"] == bare_q
        r = add(c, PURPLE, Q, "purple", tune="sync")
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        assert r.json()["tune"]["mode"] == "sync"
        row = gen(c, PURPLE, Q)
        assert row["edit_id"] == eid and row["edit_answer"] == "purple"
        assert row["text"].strip().startswith("purple") and row["text"] != bare_q
        other = gen(c, GREEN, "how many shapes are there?")
        assert other["edit_id"] is None and other["text"] == bare_other  # out of scope: bit-identical
    # a new app over the same directory (what a restarted process does) serves the tuned edit
    em2 = wrap(serve_base, memory=mem)
    with running(create_app(em2, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        row = gen(c, PURPLE, Q)
        assert row["edit_id"] == eid and row["text"].strip().startswith("purple")
        r = c.delete(f"/edits/{eid}", headers=AUTH)
        assert r.status_code == 200 and r.json()["deleted"] is True
        row = gen(c, PURPLE, Q)
        assert row["edit_id"] is None and row["text"] == bare_q
        assert c.get(f"/edits/{eid}").status_code == 404
        assert c.delete(f"/edits/{eid}", headers=AUTH).status_code == 404


def test_restart_keeps_every_acknowledged_write(serve_base, tmp_path):
    mem = tmp_path / "mem"
    em = wrap(serve_base)
    with running(create_app(em, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        ids = []
        for i, (img, ans) in enumerate([(PURPLE, "violet"), (GREEN, "green"), (None, "forty-two")]):
            r = add(c, img, f"question {i}: {Q}" if img is None else Q, ans,
                    positives='["which colour is this shape?"]', metadata=f'{{"ticket": {i}}}')
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        assert c.delete(f"/edits/{ids[1]}", headers=AUTH).status_code == 200
        r = c.patch(f"/edits/{ids[0]}", headers=AUTH, data={"answer": "lilac"})
        assert r.status_code == 200 and r.json()["version"] == 2
        r = c.post(f"/edits/{ids[0]}/rollback", headers=AUTH, json={"version": 1})
        assert r.status_code == 200 and r.json()["version"] == 3
        assert c.post(f"/edits/{ids[0]}/rollback", headers=AUTH, json={"version": 9}).status_code == 409
        before = c.get("/edits").json()
        detail = c.get(f"/edits/{ids[0]}").json()
        # the lock file keeps a second writer off the directory while this one runs
        with pytest.raises(LockError):
            create_app(wrap(serve_base, memory=mem), mem, token=TOKEN)
    assert [v["answer"] for v in detail["history"]] == ["violet", "lilac", "violet"]
    em2 = wrap(serve_base, memory=mem)
    with running(create_app(em2, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        after = c.get("/edits").json()
        assert after["total"] == 2
        key = lambda e: (e["id"], e["version"], e["question"], e["answer"], e["image"], e["metadata"])  # noqa: E731
        assert [key(e) for e in after["edits"]] == [key(e) for e in before["edits"]]
        assert c.get(f"/edits/{ids[0]}").json()["history"] == detail["history"]
        assert gen(c, PURPLE, Q)["edit_id"] == ids[0]
        r = add(c, GREEN, Q, "green")
        assert r.json()["id"] not in ids  # ids are never reused, across restarts too


def test_background_tuning_is_persisted_when_it_finishes(serve_base, tmp_path):
    from esg_memory.config import AdapterConfig, EditedModelConfig
    from esg_memory.model import Adapter, EditedModel

    model, processor, encoder = serve_base
    # two steps: the point is the hand-over (tuned adapter swapped in, then persisted), not accuracy
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, adapters=AdapterConfig(max_steps=2))
    em = EditedModel.wrap(model, processor, memory=None, encoder=encoder, config=cfg)
    mem = tmp_path / "mem"
    with running(create_app(em, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = add(c, PURPLE, Q, "purple", tune="background")
        assert r.status_code == 201 and r.json()["tune"] == {"mode": "background", "status": "queued"}
        eid = r.json()["id"]
        deadline = time.monotonic() + 60
        while (t := c.get(f"/edits/{eid}").json())["tuning"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert t["tuning"] == "done" and t["tune_report"]["steps"] >= 1
        assert isinstance(t["gives_answer"], bool)  # checked after tuning
        live = em.memory.attachment(eid, "adapter")
        assert Adapter.from_bytes(live).kind == t["tune_report"]["kind"] != "compiled"
    on_disk = wrap(serve_base, memory=mem).memory.attachment(eid, "adapter")
    assert on_disk == live


# ------------------------------------------------------------------------------------------ auth


def test_auth_refused_and_accepted(serve_base, tmp_path):
    em = wrap(serve_base)
    with pytest.raises(ConfigError, match="token"):
        create_app(em, tmp_path / "a")
    with pytest.raises(ConfigError, match="at least"):
        create_app(em, tmp_path / "a", token="short")
    with running(create_app(em, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/edits", data={"question": Q, "answer": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "Unauthorized"
        assert c.post("/edits", data={"question": Q, "answer": "x"},
                      headers={"Authorization": "Basic " + TOKEN}).status_code == 401
        assert c.post("/edits", data={"question": Q, "answer": "x"},
                      headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"}).status_code == 403
        assert c.delete("/edits/0").status_code == 401
        # refused before the body is read: anonymous clients cannot make the server buffer uploads
        r = c.post("/edits", files={"image": ("x.png", os.urandom(1 << 20), "image/png")})
        assert r.status_code == 401
        assert c.patch("/edits/0", data={"answer": "y"}).status_code == 401
        assert c.post("/edits/0/rollback", json={"version": 1}).status_code == 401
        assert c.get("/edits").json()["total"] == 0  # nothing refused was written
        assert add(c, None, Q, "x").status_code == 201
        assert c.get("/health").status_code == 200 and c.get("/edits").status_code == 200
    # read-only: no token needed, every write 403
    with running(create_app(wrap(serve_base), None, read_only=True)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/edits", data={"question": Q, "answer": "x"})
        assert r.status_code == 403 and r.json()["error"] == "ReadOnlyError"
        assert gen(c, PURPLE, Q)["edit_id"] is None
    # insecure-local: writes without a token
    with running(create_app(wrap(serve_base), tmp_path / "l", insecure_local=True)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.post("/edits", data={"question": Q, "answer": "x"}).status_code == 201
    # protected reads
    with running(create_app(wrap(serve_base), tmp_path / "p", token=TOKEN, protect_reads=True)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.get("/edits").status_code == 401
        assert c.get("/edits", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------ bad input


def test_bad_uploads_rejected_and_nothing_written(serve_base, tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(PURPLE)
    outside = tmp_path / "secret.png"
    outside.write_bytes(GREEN)
    (root / "link.png").symlink_to(outside)
    em = wrap(serve_base)
    app = create_app(em, tmp_path / "m", token=TOKEN, allowed_root=root, max_upload_bytes=64 * 1024)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = add(c, b"this is not an image", Q, "x")
        assert r.status_code == 422 and r.json()["error"] == "ImageError"
        r = add(c, os.urandom(100 * 1024), Q, "x")
        assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
        # no Content-Length (chunked): the limit is enforced while the body streams in
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        chunked = iter([part + b"x" * 40_000, b"y" * 40_000])
        multipart = {**AUTH, "content-type": "multipart/form-data; boundary=b"}
        r = c.post("/edits", headers=multipart, content=chunked)
        assert r.status_code == 413, r.text
        for bad in ("../secret.png", str(outside), "link.png", "sub/../../secret.png"):
            r = c.post("/edits", headers=AUTH, data={"question": Q, "answer": "x", "image_path": bad})
            assert r.status_code == 403, (bad, r.text)
        r = c.post("/generate", data={"prompt": Q, "image_path": "../secret.png"})
        assert r.status_code == 403
        missing = {"question": Q, "answer": "x", "image_path": "sub/missing.png"}
        r = c.post("/edits", headers=AUTH, data=missing)
        assert r.status_code == 422
        assert c.post("/edits", headers=AUTH, data={"answer": "x"}).json()["error"] == "ValidationError"
        assert add(c, None, Q, "   ").status_code == 422
        assert add(c, None, Q, "x", positives="not json").status_code == 422
        assert add(c, None, Q, "x", positives='[{"text": "a", "evil": 1}]').status_code == 422
        assert add(c, None, Q, "x", metadata="[1]").status_code == 422
        assert add(c, None, Q, "x", tune="always").status_code == 422
        r = c.post("/generate", data={"prompt": Q, "max_new_tokens": "100000"})
        assert r.status_code == 422
        r = c.post("/generate", data={"prompt": [Q, Q, Q]},
                   files=[("image", ("a.png", PURPLE, "image/png")),
                          ("image", ("b.png", GREEN, "image/png"))])
        assert r.status_code == 422 and "one per prompt" in r.json()["detail"]
        assert c.get("/edits/abc").status_code == 422
        assert c.get("/edits").json()["total"] == 0  # every refusal left the memory as it was
        r = c.post("/edits", headers=AUTH, data={"question": Q, "answer": "x", "image_path": "sub/ok.png",
                                                 "positives": '[{"text": null, "image_path": "sub/ok.png"}]'})
        assert r.status_code == 201, r.text
        assert gen(c, PURPLE, Q)["edit_id"] == r.json()["id"]
    with running(create_app(wrap(serve_base), tmp_path / "n", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:  # no allowed root: paths are disabled
        r = c.post("/edits", headers=AUTH, data={"question": Q, "answer": "x", "image_path": str(outside)})
        assert r.status_code == 403 and "allowed-root" in r.json()["detail"]


# ------------------------------------------------------------------------------------------ metrics


def _families(text: str) -> dict[str, object]:
    """The scrape parsed by prometheus_client's own parser: family name -> family."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` (0 when absent)."""
    for fam in _families(text).values():
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_metrics_count_requests_latency_edits_hits(serve_base, tmp_path):
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        before = c.get("/metrics").text
        eid = add(c, PURPLE, Q, "purple").json()["id"]
        for _ in range(3):
            assert gen(c, PURPLE, Q, n=2)["edit_id"] == eid
        gen(c, GREEN, "how many shapes are there?", n=2)
        c.get("/edits/999")
        c.get("/no/such/path")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = r.text
        fams = _families(m)
        for name in ("esg_memory_http_requests", "esg_memory_edit_hits", "esg_memory_generate_rows",
                     "esg_memory_writes"):
            assert fams[name].type == "counter", name
        assert fams["esg_memory_http_request_seconds"].type == "histogram"
        assert fams["esg_memory_edits"].type == "gauge"
        req = "esg_memory_http_requests_total"
        assert _sample(m, req, endpoint="/generate", method="POST", status="200") == 4
        assert _sample(m, req, endpoint="/edits", method="POST", status="201") == 1
        assert _sample(m, req, endpoint="/edits/{edit_id}", method="GET", status="404") == 1
        assert _sample(m, req, endpoint="unmatched", method="GET", status="404") == 1
        assert _sample(m, "esg_memory_http_request_seconds_count", endpoint="/generate", method="POST") == 4
        assert _sample(m, "esg_memory_http_request_seconds_bucket", endpoint="/generate", method="POST",
                       le="+Inf") == 4
        assert _sample(m, "esg_memory_edits") == 1
        assert _sample(m, "esg_memory_edit_hits_total") == 3
        assert _sample(m, "esg_memory_generate_rows_total") == 4
        assert _sample(m, "esg_memory_writes_total", op="add") == 1
        assert _sample(m, "esg_memory_persist_seconds_count") == 1
        # counters only go up: the scrape before the requests saw less (the first /metrics, not counted yet)
        assert _sample(before, req, endpoint="/generate", method="POST", status="200") == 0
        assert _sample(before, "esg_memory_edits") == 0
        again = c.get("/metrics").text
        assert _sample(again, req, endpoint="/metrics", method="GET", status="200") == 2
        assert c.get(f"/edits/{eid}").json()["hits"] == 3
        # seeded sampling runs alone (never batched with others), so it is reproducible
        opts = {"do_sample": "true", "temperature": "1.5", "top_p": "0.9", "seed": "7"}
        first, again = (gen(c, GREEN, "what is it?", n=4, **opts)["text"] for _ in range(2))
        assert first == again
        bad = {"prompt": Q, "temperature": "0", "do_sample": "true"}
        assert c.post("/generate", data=bad).status_code == 422
        assert "/edits/{edit_id}/rollback" in c.get("/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_generate_while_adding_and_deleting(serve_base, tmp_path):
    """Readers never see an edit whose delete was acknowledged before they sent the request."""
    em = wrap(serve_base)
    app = create_app(em, tmp_path / "m", token=TOKEN, max_upload_bytes=1 << 20)
    deleted: dict[int, float] = {}
    lock = threading.Condition()  # readers notify after each request they record, and when they stop
    readers_done = [0]
    errors: list[str] = []
    rows_seen: list[tuple[float, int | None, str | None]] = []
    answers: dict[int, str] = {}
    stop = threading.Event()
    with running(app) as url:

        def reader(k: int) -> int:
            n = 0
            try:
                with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
                    while not stop.is_set() and n < 40:
                        t0 = time.monotonic()
                        r = c.post("/generate", data={"prompt": [Q, f"{Q} ({k})"], "max_new_tokens": "2"},
                                   files={"image": ("x.png", PURPLE, "image/png")})
                        if r.status_code != 200:
                            errors.append(r.text)
                            continue
                        with lock:
                            rows_seen.extend((t0, x["edit_id"], x["edit_answer"])
                                             for x in r.json()["results"])
                            lock.notify_all()
                        n += 1
            finally:
                with lock:
                    readers_done[0] += 1
                    lock.notify_all()
            return n

        def served_since(t: float) -> bool:
            """A request sent after ``t`` came back (or no reader is left to send one)."""
            return any(t0 > t for t0, _, _ in rows_seen) or readers_done[0] == 4

        with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=url, timeout=TIMEOUT) as w:
            futs = [pool.submit(reader, k) for k in range(4)]
            for i in range(6):
                eid = add(w, PURPLE, Q, f"answer {i}").json()["id"]
                answers[eid] = f"answer {i}"
                acked = time.monotonic()
                with lock:  # give readers the live edit: wait until a request sent after the ack is served
                    lock.wait_for(lambda t=acked: served_since(t), timeout=60)
                assert w.delete(f"/edits/{eid}", headers=AUTH).status_code == 200
                with lock:
                    deleted[eid] = time.monotonic()
            stop.set()
            done = [f.result(timeout=120) for f in futs]
            batches = w.get("/metrics").text
    assert not errors, errors[:3]
    assert sum(done) >= 4
    fired = [(e, a) for _, e, a in rows_seen if e is not None]
    assert fired, "no request ever saw a live edit: the test would prove nothing"
    assert all(answers[e] == a for e, a in fired)  # the reported edit is the one whose answer was used
    stale = [(t, e) for t, e, _ in rows_seen if e is not None and deleted[e] < t]
    assert not stale, stale[:5]
    assert _sample(batches, "esg_memory_batch_rows_count") >= 1


# ------------------------------------------------------------------------------------------ units


def test_micro_batcher_groups_equal_keys_and_isolates_failures():
    gate = threading.Event()
    entered = threading.Event()
    calls: list[tuple[str, list[int]]] = []

    def run(key, payloads):
        entered.set()
        gate.wait(10)
        calls.append((key, list(payloads)))
        if key == "bad" and len(payloads) > 1:
            raise ValueError("batch failed")
        if any(p < 0 for p in payloads):
            raise ValueError("negative")
        return [p * 10 for p in payloads]

    b = MicroBatcher(run, max_rows=3, wait_s=0.0)
    try:
        first = b.submit("a", 0)
        assert entered.wait(10)  # the worker is now blocked inside run() with job 0
        futs = [b.submit(k, p) for k, p in [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5)]]
        gate.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in futs] == [10, 20, 30, 40, 50]
        assert calls[1] == ("a", [1, 3, 4])  # same key joins, up to max_rows, FIFO
        assert ("b", [2]) in calls and ("a", [5]) in calls
        good, bad = b.submit("bad", 1), b.submit("bad", -1)
        assert good.result(10) == 10
        with pytest.raises(ValueError, match="negative"):
            bad.result(10)
    finally:
        gate.set()
        b.close()


def _waits_in(thread: threading.Thread, method, timeout: float = 10.0) -> bool:
    """Bounded poll: True once ``thread`` blocks on the lock inside ``method`` (of `RWLock`), or has ended."""
    code = method.__wrapped__.__code__  # the generator behind the @contextmanager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            return True
        # blocked means: the innermost frame is Condition.wait, and the lock's method called it
        frame = sys._current_frames().get(thread.ident)
        if frame is not None and frame.f_code is threading.Condition.wait.__code__ \
                and frame.f_back is not None and frame.f_back.f_code is code:
            return True
        time.sleep(0.001)
    return False


def test_rwlock_writer_is_not_starved():
    rw = RWLock()
    order: list[str] = []
    release = threading.Event()
    written = threading.Event()

    def writer() -> None:
        with rw.write():
            order.append("w")
            written.set()
            release.wait(5)

    def reader() -> None:
        with rw.read():
            order.append("r")

    with rw.read():
        w = threading.Thread(target=writer)
        w.start()
        assert _waits_in(w, RWLock.write)  # the writer waits for our read lock
        r = threading.Thread(target=reader)
        r.start()
        assert _waits_in(r, RWLock.read)  # the new reader blocks (or, were it let in, is done)
        assert order == []  # the writer waits for us; the new reader queues behind the writer
    assert written.wait(5)
    assert order == ["w"]
    release.set()
    w.join(5)
    r.join(5)
    assert order == ["w", "r"]


def test_metrics_render_format():
    m = Metrics()
    m.counter("x_total", "X.")
    m.counter("hits", "H.")
    m.histogram("lat_seconds", "L.", (0.1, 1.0))
    m.gauge("g", "G.", lambda: 3)
    m.gauge("broken", "B.", lambda: 1 / 0)
    m.inc("x_total", path='a"b')
    m.inc("hits", 2)
    m.observe("lat_seconds", 0.5)
    m.observe("lat_seconds", 5.0)
    text = m.render()
    fams = _families(text)
    # counters keep one _total suffix whether or not the declared name has it
    assert fams["esg_memory_x"].type == "counter" and fams["esg_memory_hits"].type == "counter"
    assert 'esg_memory_x_total{path="a\\"b"} 1.0' in text
    assert _sample(text, "esg_memory_x_total", path='a"b') == 1 == m.value("x_total", path='a"b')
    assert _sample(text, "esg_memory_hits_total") == 2 == m.value("hits") == m.value("hits_total")
    assert m.value("x_total", path="never") == 0
    assert _sample(text, "esg_memory_lat_seconds_bucket", le="0.1") == 0
    assert _sample(text, "esg_memory_lat_seconds_bucket", le="1.0") == 1
    assert _sample(text, "esg_memory_lat_seconds_bucket", le="+Inf") == 2
    assert _sample(text, "esg_memory_lat_seconds_sum") == 5.5 and _sample(text, "esg_memory_g") == 3
    assert math.isnan(_sample(text, "esg_memory_broken"))  # a broken gauge does not break the scrape
    with pytest.raises(ValueError, match="labels"):
        m.inc("hits", op="x")  # label names are fixed by the first use
    with pytest.raises(KeyError):
        m.inc("undeclared")
    other = Metrics()  # one registry per instance: nothing shared
    other.counter("hits", "H.")
    assert other.value("hits") == 0


def test_directory_lock_token_loading_and_cli_arguments(tmp_path, monkeypatch):
    a = DirectoryLock(tmp_path).acquire()
    with pytest.raises(LockError):
        DirectoryLock(tmp_path).acquire()
    a.release()
    DirectoryLock(tmp_path).acquire().release()
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    assert load_token(f) == TOKEN
    monkeypatch.setenv("ESG_MEMORY_TOKEN", TOKEN[::-1])
    assert load_token(None) == TOKEN[::-1]
    monkeypatch.setenv("ESG_MEMORY_TOKEN", "short")
    with pytest.raises(ConfigError):
        load_token(None)
    with pytest.raises(ConfigError):
        load_token(tmp_path / "missing")
    # as a subcommand, the parent's --memory/--model survive; given after `serve` they win
    parent = argparse.ArgumentParser()
    parent.add_argument("--memory")
    parent.add_argument("--model", default="tiny-llava")
    sub = parent.add_subparsers(dest="command")
    add_serve_arguments(sub.add_parser("serve"))
    args = parent.parse_args(["--memory", "m1", "serve", "--port", "9", "--insecure-local"])
    assert (args.memory, args.model, args.port, args.insecure_local) == ("m1", "tiny-llava", 9, True)
    assert parent.parse_args(["serve", "--memory", "m2"]).memory == "m2"


def test_run_from_args_refuses_before_loading_models(tmp_path, monkeypatch, capsys):
    from esg_memory.serve import main

    monkeypatch.delenv("ESG_MEMORY_TOKEN", raising=False)
    d = tmp_path / "notmem"
    d.mkdir()
    (d / "thesis.txt").write_text("precious")
    spec = ["--model", "tiny-random-llava", "--clip", "esg-tiny-clip"]
    assert main(["--memory", str(tmp_path / "new"), *spec]) == 1
    assert "without a bearer token" in capsys.readouterr().err
    assert main(["--memory", str(d), *spec, "--insecure-local"]) == 1
    assert "not an esg-memory directory" in capsys.readouterr().err
    assert sorted(p.name for p in Path(d).iterdir()) == ["thesis.txt"]


def test_unjournaled_write_is_refused_and_not_applied(serve_base, tmp_path, monkeypatch):
    """If the journal cannot be written (disk full), the add is refused and not applied: live matches disk."""
    from esg_memory.serve.generation import GenerateOptions
    from esg_memory.serve.service import EditService

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the memory directory should be")
    with pytest.raises(OSError):
        EditService(wrap(serve_base), blocker)
    em = wrap(serve_base)
    svc = EditService(em, tmp_path / "m")
    real = os.fdatasync
    try:
        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fdatasync", full)
        with pytest.raises(OSError):
            svc.add_edit(PURPLE, Q, "purple", tune="never")
        assert len(em.memory) == 0
        assert svc.health()["status"] == "degraded" and "No space" in svc.health()["last_persist_error"]
        row = svc.generate([(Image.open(io.BytesIO(PURPLE)), Q)], GenerateOptions(max_new_tokens=2))[0]
        assert row["edit_id"] is None
        monkeypatch.setattr(os, "fdatasync", real)
        eid = svc.add_edit(PURPLE, Q, "purple", tune="never")["id"]
        assert svc.health()["status"] == "ok"
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
        svc.close()
    assert [e.id for e in wrap(serve_base, memory=tmp_path / "m").memory.list()] == [eid]
