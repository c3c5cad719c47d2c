"""The edit debugger's endpoints and page files without a browser (tests/test_ui.py drives the page): the
files ship as package data, /ui carries a strict CSP, and the new reads (image, neighbours, route:explain,
generate:bare, scope-map) agree with the memory's own routing; /feedback is a write. Models: the seeded
random tiny LLaVA and the tiny offline CLIP."""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import numpy as np
import pytest
from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, Q, png_bytes, running

from esg_memory.errors import ConfigError
from esg_memory.serve import create_app
from esg_memory.serve.ui.data import KeyTable, candidates, image_media_type, key_table, scope_map
from esg_memory.serve.ui.routes import UI_CSP, UI_FILES, ui_file

TIMEOUT = httpx.Timeout(60.0, connect=5.0)
BLUE = png_bytes((30, 60, 220), "circle")


def wrap(serve_base, memory=None):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    return EditedModel.wrap(model, processor, memory=memory, encoder=encoder, config=cfg)


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def add(c: httpx.Client, image: bytes | None, answer: str, question: str = Q) -> int:
    body = {"question": question, "answer": answer, "tune": "never"}
    if image is not None:
        body["image"] = uri(image)
    r = c.post("/edits", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


# ------------------------------------------------------------------------------------------ page files


def test_page_files_ship_as_package_data_and_load_nothing_from_elsewhere():
    for name in UI_FILES:
        assert ui_file(name), name  # importlib.resources: what an installed wheel serves
    html = ui_file("index.html").decode()
    js = ui_file("app.js").decode()
    css = ui_file("app.css").decode()
    assert 'src="/ui/app.js"' in html and 'href="/ui/app.css"' in html
    for text in (html, js, css):
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text)  # no CDN, no remote fetch
    # no inline script or style: the CSP forbids them, the page must not need them
    assert re.findall(r"<script[^>]*>(.*?)</script>", html, re.S) == [""]
    assert " style=" not in html and "<style" not in html
    # server strings go in as text: no HTML sinks, no eval, the token never in localStorage or a cookie
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "localStorage", "document.cookie"):
        assert sink not in js, sink
    assert "sessionStorage" in js and 'credentials: "omit"' in js
    with pytest.raises(Exception, match="no UI file"):
        ui_file("../app.py")


def test_ui_is_served_with_a_strict_csp(serve_base, tmp_path):
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        for path, kind in (("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                           ("/ui/app.css", "text/css")):
            r = c.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(kind)
            csp = r.headers["content-security-policy"]
            assert csp == UI_CSP and "script-src 'self';" in csp and "unsafe" not in csp
            assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/ui/secret.txt").status_code == 404
        assert c.get("/ui/..%2Fapp.py").status_code == 404
        paths = c.get("/openapi.json").json()["paths"]
        for p in ("/edits/{edit_id}/image", "/edits/{edit_id}/neighbours", "/route:explain", "/generate:bare",
                  "/scope-map", "/feedback"):
            assert p in paths, p
        assert "/ui" not in paths


# ------------------------------------------------------------------------------------------ reads


def test_image_neighbours_and_explained_routing_agree_with_the_memory(serve_base, tmp_path):
    model = wrap(serve_base)
    with running(create_app(model, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        purple, green = add(c, PURPLE, "purple"), add(c, GREEN, "green")
        text_only = add(c, None, "Paris", "what is the capital of France?")
        r = c.get(f"/edits/{purple}/image")
        assert r.status_code == 200 and r.content == PURPLE and r.headers["content-type"] == "image/png"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get(f"/edits/{text_only}/image").status_code == 404
        assert c.get("/edits/99/image").status_code == 404

        nb = c.get(f"/edits/{purple}/neighbours", params={"k": 5}).json()
        assert nb["id"] == purple and nb["key"] == "anchor"
        assert {n["edit_id"] for n in nb["neighbours"]} == {green, text_only}  # never the edit itself
        own, _ = model.memory.keys_of(purple)
        for n in nb["neighbours"]:
            keys, thr = model.memory.keys_of(n["edit_id"])
            m = keys @ own[0] - thr
            j = int(np.argmax(m))
            assert math.isclose(n["score"], float(keys[j] @ own[0]), abs_tol=1e-5)
            assert math.isclose(n["margin"], float(m[j]), abs_tol=1e-5)
        scores = [n["score"] for n in nb["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        assert set(nb["constrained_by"]) == set(model.memory.get(purple).constrained_by)
        assert c.get("/edits/99/neighbours").status_code == 404

        for image, expected in ((PURPLE, purple), (GREEN, green), (BLUE, None)):
            plain = c.post("/route", json={"prompt": Q, "image": uri(image)}).json()["results"][0]
            ex = c.post("/route:explain", params={"k": 3}, json={"prompt": Q, "image": uri(image)}).json()
            row = ex["results"][0]
            assert {k: row[k] for k in plain} == plain  # /route's row, extended
            cands = row["candidates"]
            assert 1 <= len(cands) <= 3
            margins = [c_["margin"] for c_ in cands]
            assert margins == sorted(margins, reverse=True)
            for c_ in cands:
                assert math.isclose(c_["margin"], c_["score"] - c_["threshold"], abs_tol=1e-5)
                assert c_["in_scope"] == (c_["margin"] >= 0)
            if plain["edit_id"] is not None:
                assert cands[0]["edit_id"] == plain["edit_id"] and cands[0]["in_scope"]
                assert math.isclose(cands[0]["margin"], plain["margin"], abs_tol=1e-5)
                assert cands[0]["why"].startswith("routed here")
            else:
                assert not any(c_["in_scope"] for c_ in cands)
            for c_ in cands[1:]:
                assert c_["why"].startswith("out of scope" if not c_["in_scope"] else "in scope, but")
            if expected is not None:
                assert plain["edit_id"] == expected
        assert c.post("/route:explain", json={"prompt": ""}).status_code == 422
        assert c.post("/route:explain", params={"k": 0}, json={"prompt": Q}).status_code == 422


def test_bare_generation_is_the_base_model_and_the_edited_one_reports_its_edit(serve_base, tmp_path):
    model = wrap(serve_base)
    with running(create_app(model, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        eid = add(c, PURPLE, "purple")
        body = {"prompt": Q, "image": uri(PURPLE)}
        bare = c.post("/generate:bare", params={"max_new_tokens": 6}, json=body)
        assert bare.status_code == 200, bare.text
        edited = c.post("/generate", json={**body, "max_new_tokens": 6}).json()["results"][0]
        assert edited["edit_id"] == eid
        import io

        from PIL import Image

        im = Image.open(io.BytesIO(PURPLE)).convert("RGB")
        with model.disable_edits():
            want = model.answer([im], [Q], max_new_tokens=6)[0]
        assert bare.json()["results"][0]["text"] == want
        assert model.answer([im], [Q], max_new_tokens=6)[0] == edited["text"]  # edits on again outside
        assert c.post("/generate:bare", params={"max_new_tokens": 100000}, json=body).status_code == 422


def test_scope_map_is_deterministic_and_places_an_edit_input_on_its_anchor(serve_base, tmp_path):
    model = wrap(serve_base)
    with running(create_app(model, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.get("/scope-map").json()["points"] == []
        purple, green = add(c, PURPLE, "purple"), add(c, GREEN, "green")
        m1, m2 = c.get("/scope-map").json(), c.get("/scope-map").json()
        assert m1 == m2
        n_keys = sum(len(model.memory.keys_of(i)[1]) for i in (purple, green))
        assert len(m1["points"]) == n_keys
        for p in m1["points"]:
            assert math.isclose(p["radius"], math.sqrt(2 * (1 - p["threshold"])), rel_tol=1e-6)
        assert 0 < sum(m1["explained_variance"]) <= 1 + 1e-9
        got = c.post("/scope-map", json={"prompt": [Q, Q], "image": [uri(PURPLE), uri(GREEN)]}).json()
        assert got["points"] == m1["points"]
        for probe, eid in zip(got["probes"], (purple, green), strict=True):
            anchor = next(p for p in m1["points"] if p["edit_id"] == eid and p["key"] == "anchor")
            assert probe["edit_id"] == eid and probe["prompt"] == Q
            assert math.isclose(probe["x"], anchor["x"], abs_tol=1e-4)
            assert math.isclose(probe["y"], anchor["y"], abs_tol=1e-4)


def test_reads_of_the_debugger_are_protected_like_the_services(serve_base, tmp_path):
    app = create_app(wrap(serve_base), tmp_path / "m", token=TOKEN, protect_reads=True)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        eid = add(c, PURPLE, "purple")
        assert c.get("/ui").status_code == 200  # the page holds no data
        for method, path, body in (("GET", f"/edits/{eid}/image", None),
                                   ("GET", f"/edits/{eid}/neighbours", None),
                                   ("POST", "/route:explain", {"prompt": Q}), ("GET", "/scope-map", None),
                                   ("POST", "/generate:bare", {"prompt": Q})):
            assert c.request(method, path, json=body).status_code == 401, path
            assert c.request(method, path, json=body, headers={"Authorization": "Bearer " + "x" * 20}
                             ).status_code == 403, path
            assert c.request(method, path, json=body, headers=AUTH).status_code == 200, path


# ------------------------------------------------------------------------------------------ feedback


def test_feedback_is_a_journaled_write_behind_the_token(serve_base, tmp_path):
    model = wrap(serve_base)
    with running(create_app(model, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        purple = add(c, PURPLE, "purple")
        probe = {"prompt": "which colour is this circle?", "image": uri(PURPLE), "expected_edit_id": None}
        row = {"prompt": probe["prompt"], "image": probe["image"]}
        before = c.post("/route", json=row).json()["results"][0]
        assert c.post("/feedback", json=probe).status_code == 401
        wrong = {"Authorization": "Bearer " + "y" * 20}
        assert c.post("/feedback", json=probe, headers=wrong).status_code == 403
        # a cross-site form cannot authenticate: the token is read from the header only
        cookie = {"Cookie": f"token={TOKEN}; Authorization=Bearer {TOKEN}"}
        assert c.post("/feedback", data={"prompt": "x"}, headers=cookie).status_code == 401
        assert c.post("/feedback", json={"expected_edit_id": None}, headers=AUTH).status_code == 422
        assert c.post("/feedback", json={**probe, "expected_edit_id": 99}, headers=AUTH).status_code == 404
        r = c.post("/feedback", json=probe, headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["routed_before"] == (-1 if before["edit_id"] is None else before["edit_id"])
        if before["edit_id"] == purple:
            assert out["actions"] and purple in out["refit"]
        after = c.post("/route", json=row).json()["results"][0]
        assert out["routed_after"] == (-1 if after["edit_id"] is None else after["edit_id"])
    # journaled: a reload of the directory holds the feedback probe
    again = wrap(serve_base, memory=tmp_path / "m")
    fb = again.memory.history(purple)[-1].to_dict()["feedback"]
    assert (len(fb) > 0) == bool(out["refit"])


def test_a_read_only_server_refuses_feedback(serve_base, tmp_path):
    model = wrap(serve_base)
    model.add_edit(PURPLE, Q, "purple", tune="never")
    with running(create_app(model, None, read_only=True)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/feedback", json={"prompt": Q, "image": uri(PURPLE)})
        assert r.status_code == 403 and r.json()["error"] == "ReadOnlyError"


# ------------------------------------------------------------------------------------------ helpers


def test_candidates_and_projection_on_a_small_table():
    keys = np.eye(3, dtype=np.float32)
    table = KeyTable(keys, np.array([0.9, 0.9, 0.5], np.float32), np.array([0, 1, 1]),
                     ["anchor", "anchor", "p"], {0: "a", 1: "b"}, {0: "q0", 1: "q1"})
    q = np.array([1.0, 0.0, 0.0], np.float32)
    got = candidates(table, q, k=5)
    assert [c["edit_id"] for c in got] == [0, 1]
    assert got[0]["in_scope"] and got[0]["margin"] == pytest.approx(0.1)
    assert got[1]["key"] == "p" and got[1]["margin"] == pytest.approx(-0.5)  # its best key, not its anchor
    m = scope_map(table, probes=q[None, :])
    assert len(m["points"]) == 3 and len(m["probes"]) == 1
    # the projection is deterministic up to nothing: the same table gives the same numbers
    assert scope_map(table, probes=q[None, :]) == m
    empty = KeyTable(np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [], {}, {})
    assert scope_map(empty)["points"] == []
    assert image_media_type(PURPLE) == "image/png"
    assert image_media_type(b"<svg/>") == "application/octet-stream"


def test_key_table_reads_every_key(serve_base):
    model = wrap(serve_base)
    a = model.add_edit(PURPLE, Q, "purple", tune="never")
    b = model.add_edit(GREEN, Q, "green", tune="never")
    t = key_table(model.memory)
    assert sorted(set(t.owners.tolist())) == [a, b]
    assert len(t) == sum(len(model.memory.keys_of(i)[1]) for i in (a, b)) == len(t.origins)


# ------------------------------------------------------------------------------------------ esg-memory ui


def test_ui_command_refuses_a_missing_memory(tmp_path):
    import argparse

    from esg_memory.serve.ui.cli import run_ui_from_args

    with pytest.raises(ConfigError, match="no saved memory"):
        run_ui_from_args(argparse.Namespace(memory=str(tmp_path / "none"), port=0, log_level="warning"))


@contextlib.contextmanager
def _ui_command(*args: str, unset: str) -> Iterator[tuple[str, str]]:
    """``esg-memory ARGS`` in a subprocess: (the line it prints once it serves, its URL); stopped with
    SIGINT at the end, which must exit 0. ``unset``: an environment variable it must not see."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(unset, None)
    proc = subprocess.Popen([sys.executable, "-m", "esg_memory.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "/ui" not in line:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
            if proc.poll() is not None:
                break
        m = re.search(r"(http://127\.0\.0\.1:\d+)/ui", line)
        assert m, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield line, m.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_ui_command_serves_the_page_read_only_and_prints_its_url(serve_base, tmp_path):
    model = wrap(serve_base)
    eid = model.add_edit(PURPLE, Q, "purple", tune="never")
    model.save(tmp_path / "m")
    with _ui_command("--memory", str(tmp_path / "m"), "--model", "tiny-random-llava", "--clip",
                     "esg-tiny-clip", "ui", "--port", "0", unset="ESG_MEMORY_TOKEN") as (line, url):
        assert "read-only" in line and "1 edits" in line
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            assert c.get("/ui").headers["content-security-policy"] == UI_CSP
            assert c.get("/health").json()["read_only"] is True
            assert c.get(f"/edits/{eid}/image").content == PURPLE
            r = c.post("/edits", json={"question": Q, "answer": "x"})
            assert r.status_code == 403 and r.json()["error"] == "ReadOnlyError"


# ------------------------------------------------------------------------------------------ audit (eval run)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """One real tiny eval run's output directory, shared by the audit tests."""
    from _audit_fixtures import tiny_eval_run

    return tiny_eval_run(tmp_path_factory.mktemp("eval") / "run")


def test_audit_rows_agree_with_the_runs_results(eval_run):
    import json

    from esg_memory.serve.ui.audit_routes import create_audit_app

    res = json.loads((eval_run / "results.json").read_text())
    assert "audit.jsonl" in res["files"] and "probe_images" in res["files"]
    with running(create_audit_app(eval_run)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        h = c.get("/health").json()
        assert h["audit_only"] is True and h["run"] == eval_run.name
        first = c.get("/audit").json()
        assert (first["method"], first["protocol"]) == ("ours", "retention")
        assert first["run"]["methods"] == list(res["config"]["methods"])
        assert first["run"]["n_deletions"] == res["stream"]["n_deletions"] > 0
        assert len(first["summary"]) == 2 * len(res["config"]["methods"])
        labels_seen = set()
        for s in first["summary"]:
            m, p = s["method"], s["protocol"]
            agg = res["methods"][m][p]
            got = c.get("/audit", params={"method": m, "protocol": p}).json()
            rows = got["rows"]
            assert (got["method"], got["protocol"]) == (m, p)
            assert len(rows) == s["n_edits"] == agg["n_edits"]
            counts = {k: sum(r["label"] == k for r in rows) for k in ("correct", "under", "over", "fail")}
            n_ok = sum(counts.values())
            assert n_ok == agg["audit"]["n_successful"] == s["n_successful"]
            assert n_ok == sum(r["reliable"] for r in rows)
            for k, v in counts.items():
                assert s["counts"][k] == v
                want = agg["audit"][k]
                assert (want is None) if n_ok == 0 else want == pytest.approx(v / n_ok), (m, p, k)
            labels_seen |= {r["label"] for r in rows}
            for r in rows:
                kinds = [q["kind"] for q in r["probes"]]
                assert kinds.count("reliability") == 1 and "m_loc" in kinds
                assert (r["label"] == "unreliable") == (not r["reliable"])
                if r["reliable"]:  # the label is ScopeEdit's class of (generalizes, leaks)
                    assert r["label"] == {(True, False): "correct", (False, False): "under",
                                          (True, True): "over", (False, True): "fail"}[
                        (r["generalizes"], r["leaks"])]
                for q in r["probes"]:
                    assert q["question"] and q["target"] is not None and q["generated"] is not None
                    assert (q["score"] is not None) == (m == "ours")
                    if m == "bare":
                        assert q["fired"] is None
            for label in ("correct", "over"):
                only = c.get("/audit", params={"method": m, "protocol": p, "label": label}).json()["rows"]
                assert [r["case"] for r in only] == [r["case"] for r in rows if r["label"] == label]
            # the deletion audit: its residue shares are results.json's
            dele = got["deletions"]
            assert len(dele) == res["stream"]["n_deletions"] and all(d["deleted"] for d in dele)
            for stage in ("right_after", "final"):
                probes = [q for d in dele for q in d[stage]]
                want = agg_del = res["methods"][m]["deletion"][stage]
                assert len(probes) == agg_del["n_probes"]
                for k in ("text", "tokens", "bits"):
                    assert want[k] == pytest.approx(np.mean([q["residue"][k] for q in probes]))
                assert want["routed"] == pytest.approx(np.mean([q["fired"] is not None for q in probes]))
        assert len(labels_seen) >= 2, labels_seen  # the run tells methods apart
        # ours under retention is probes.jsonl's table: the same answers and margins per probe
        lines = {x["probe"]: x for x in map(json.loads, (eval_run / "probes.jsonl").read_text().splitlines())}
        for r in first["rows"]:
            for q in r["probes"]:
                line = lines[q["probe"]]
                assert (q["generated"], q["exact_match"], q["fired"]) == (
                    line["generated"], line["exact_match"], line["fired"])
                assert q["margin"] == line["margin"] and q["score"] == line["score"]
        for bad in ({"method": "nope"}, {"protocol": "later"}, {"label": "great"}):
            r = c.get("/audit", params=bad)
            assert r.status_code == 422 and r.json()["error"] == "InvalidInputError", bad


def test_audit_thumbnails_are_small_pngs_and_no_name_leaves_their_folder(eval_run, tmp_path):
    import hashlib
    import io
    import shutil

    from PIL import Image

    from esg_memory.serve.ui.audit_routes import create_audit_app

    run = tmp_path / "run"
    shutil.copytree(eval_run, run)
    images = run / "probe_images"
    planted = hashlib.sha256(b"not a thumbnail").hexdigest()
    (images / f"{planted}.png").write_bytes(PURPLE)  # a file whose bytes are not its name
    linked = hashlib.sha256((run / "results.json").read_bytes()).hexdigest()
    (images / f"{linked}.png").symlink_to(run / "results.json")  # its name is right, its place is not
    with running(create_audit_app(run)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        got = c.get("/audit").json()
        shas = {q["image"] for r in got["rows"] for q in r["probes"] if q["image"]}
        shas |= {r["image"] for r in got["rows"] if r["image"]}
        assert shas and all(len(s) == 64 for s in shas)
        for sha in shas:
            r = c.get(f"/audit/images/{sha}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert hashlib.sha256(r.content).hexdigest() == sha
            assert max(Image.open(io.BytesIO(r.content)).size) <= 96
        assert {p.stem for p in images.iterdir()} - {planted, linked} >= shas
        secret = (run / "results.json").read_bytes()
        for name in ("../results.json", "..%2Fresults.json", "..%2F..%2Fresults.json",
                     "%2e%2e%2fresults.json", "....//results.json", "/etc/passwd", "%2Fetc%2Fpasswd",
                     "A" * 64, sha.upper(), sha + ".png", sha[:63], "x" * 64, "%00" + sha[:61],
                     linked + "%2F"):
            r = c.get("/audit/images/" + name, follow_redirects=True)  # a trailing "/" is redirected
            assert r.status_code in (404, 422), (name, r.status_code)
            assert r.content != secret and b'"format"' not in r.content
        assert c.get("/audit/images/" + "0" * 64).status_code == 404
        assert c.get(f"/audit/images/{planted}").status_code == 404  # bytes that do not hash to the name
        assert c.get(f"/audit/images/{linked}").status_code == 404  # a link out of the folder, named right
    assert not [p for p in images.iterdir() if p.suffix != ".png"]


def test_audit_on_the_service_is_protected_like_its_reads(serve_base, eval_run, tmp_path):
    app = create_app(wrap(serve_base), tmp_path / "m", token=TOKEN, protect_reads=True, eval_dir=eval_run)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        sha = next(r["image"] for r in c.get("/audit", headers=AUTH).json()["rows"] if r["image"])
        for path in ("/audit", f"/audit/images/{sha}"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer " + "x" * 20}).status_code == 403, path
            assert c.get(path, headers=AUTH).status_code == 200, path
        doc = c.get("/openapi.json").json()
        assert {"/audit", "/audit/images/{sha}"} <= set(doc["paths"])
        for model in ("AuditReply", "AuditEditRow", "AuditProbe", "AuditDeletionRow", "AuditSummary"):
            assert model in doc["components"]["schemas"], model
    # the audit-only app decides as create_app does: protected beyond loopback, which needs a token
    from esg_memory.serve.ui.audit_routes import create_audit_app

    with pytest.raises(ConfigError, match="no bearer token"):
        create_audit_app(eval_run, host="0.0.0.0")
    with running(create_audit_app(eval_run, token=TOKEN, host="0.0.0.0")) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.get("/audit").status_code == 401 and c.get("/audit", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ui").status_code == 200
    # without an eval run the page can still ask: no run, no rows
    with running(create_app(wrap(serve_base), tmp_path / "m2", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        got = c.get("/audit")
        assert got.status_code == 200 and got.json()["run"] is None and got.json()["rows"] == []
        assert c.get("/audit/images/" + "0" * 64).status_code == 404


def test_a_directory_without_an_audit_is_refused_before_anything_is_served(serve_base, eval_run, tmp_path):
    import shutil

    from esg_memory.serve.ui.audit_routes import create_audit_app

    with pytest.raises(ConfigError, match="does not exist"):
        create_audit_app(tmp_path / "none")
    old = tmp_path / "old"
    shutil.copytree(eval_run, old)
    (old / "audit.jsonl").unlink()
    with pytest.raises(ConfigError, match="predates the audit file"):
        create_audit_app(old)
    with pytest.raises(ConfigError, match="predates the audit file"):
        create_app(wrap(serve_base), tmp_path / "m", token=TOKEN, eval_dir=old)
    # refused before the directory lock: the memory opens at once afterwards
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)) as url:
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    (old / "audit.jsonl").write_text('{"type": "header", "format": "other"}\n')
    with pytest.raises(ConfigError, match="esg-memory-eval-audit v1"):
        create_audit_app(old)
    (old / "audit.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1"):
        create_audit_app(old)


def test_ui_command_serves_an_eval_runs_audit_without_a_model(eval_run):
    with _ui_command("ui", "--eval", str(eval_run), "--port", "0", unset="ESG_MEMORY_DIR") as (line, url):
        assert f"the audit of {eval_run.name}" in line and "read-only" in line
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            assert c.get("/ui").headers["content-security-policy"] == UI_CSP
            assert c.get("/health").json()["audit_only"] is True
            assert c.get("/audit").json()["run"]["name"] == eval_run.name
            assert c.get("/edits").status_code == 404  # no memory here
