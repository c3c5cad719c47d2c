"""The native HTTP API's contract through a real uvicorn: JSON bodies beside multipart (same validation, same
errors), the reply and error models in /openapi.json, reads protected beyond loopback, and the serve options
that place the base model (--device / --dtype / --device-map). Models: the seeded random tiny LLaVA and the
tiny offline CLIP (no downloads)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
from pathlib import Path

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import prometheus_client  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import pytest
import uvicorn  # noqa: F401  (an [all] extra: missing means failing, never skipping)
from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, Q, running
from PIL import Image

from esg_memory.errors import ConfigError
from esg_memory.loading import model_placement
from esg_memory.serve import add_serve_arguments, create_app, main, running_server
from esg_memory.serve.auth import is_loopback, reads_protected
from esg_memory.serve.cli import open_model

TIMEOUT = httpx.Timeout(60.0, connect=5.0)
ROOT = Path(__file__).resolve().parent.parent


def wrap(serve_base, memory=None):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    return EditedModel.wrap(model, processor, memory=memory, encoder=encoder, config=cfg)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


# ------------------------------------------------------------------------------------------ JSON bodies


def test_json_bodies_write_generate_and_route_like_multipart(serve_base, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "green.png").write_bytes(GREEN)
    (root / "purple.png").write_bytes(PURPLE)
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN, allowed_root=root)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        before_json = c.post("/route", json={"prompt": Q, "image": b64(PURPLE)}).json()["results"][0]
        assert before_json["edit_id"] is None
        body = {"question": Q, "answer": "purple", "image": data_uri(PURPLE), "tune": "never",
                "metadata": {"ticket": 7},
                "positives": ["which colour is this shape?",
                              {"text": "and this one?", "image": b64(PURPLE)},
                              {"text": None, "image_index": 0},
                              {"text": "a file", "image_path": "purple.png"}],
                "positive_image": [b64(PURPLE)]}
        r = c.post("/edits", headers=AUTH, json=body)
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        assert r.json()["version"] == 1 and r.json()["persist_seconds"] >= 0
        got = c.get(f"/edits/{eid}").json()
        assert got["metadata"] == {"ticket": 7} and got["answer"] == "purple"
        assert len(got["positives"]) == 4
        # the same input, once as JSON and once as a multipart upload, is routed alike
        as_json = c.post("/route", json={"prompt": [Q], "image": [b64(PURPLE)]}).json()["results"][0]
        as_form = c.post("/route", data={"prompt": Q},
                         files={"image": ("x.png", PURPLE, "image/png")}).json()["results"][0]
        assert as_json["edit_id"] == as_form["edit_id"] == eid and as_json == as_form
        gen_json = c.post("/generate", json={"prompt": [Q, Q], "image": data_uri(PURPLE),
                                             "max_new_tokens": 3}).json()["results"]
        gen_form = c.post("/generate", data={"prompt": [Q, Q], "max_new_tokens": "3"},
                          files={"image": ("x.png", PURPLE, "image/png")}).json()["results"]
        assert [row["edit_id"] for row in gen_json] == [eid, eid]
        assert [row["text"] for row in gen_json] == [row["text"] for row in gen_form]
        # image_path in JSON, text-only rows
        r = c.post("/generate", json={"prompt": "how many shapes?", "image_path": "green.png",
                                      "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["results"][0]["edit_id"] is None
        assert c.post("/generate", json={"prompt": ["hello"], "max_new_tokens": 2}).status_code == 200
        # revise and roll back with JSON
        r = c.patch(f"/edits/{eid}", headers=AUTH, json={"answer": "violet", "tune": "never"})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert c.get(f"/edits/{eid}").json()["answer"] == "violet"
        r = c.patch(f"/edits/{eid}", headers=AUTH, json={"image": b64(GREEN)})
        assert r.status_code == 200 and r.json()["version"] == 3
        assert c.post(f"/edits/{eid}/rollback", headers=AUTH, json={"version": 1}).json()["version"] == 4
        assert c.get(f"/edits/{eid}").json()["answer"] == "purple"
        # a form's positives text may carry an inline image over Starlette's 1 MiB default part size
        noise = io.BytesIO()
        Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3)).save(noise, format="PNG")
        positives = json.dumps([{"text": "noise?", "image": b64(noise.getvalue())}])
        assert len(positives) > 1 << 20
        r = c.post("/edits", headers=AUTH, data={"question": "what is this noise?", "answer": "static",
                                                 "tune": "never", "positives": positives})
        assert r.status_code == 201, r.text
        assert c.get(f"/edits/{r.json()['id']}").json()["positives"][0]["image"] is not None


def test_json_refusals_match_multipart_and_write_nothing(serve_base, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(GREEN)
    app = create_app(wrap(serve_base), tmp_path / "m", token=TOKEN, allowed_root=root,
                     max_upload_bytes=64 * 1024)
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        def post_json(path, body, **kw):
            return c.post(path, headers=AUTH, json=body, **kw)

        def refused(r, status, kind):
            assert r.status_code == status, r.text
            assert set(r.json()) == {"error", "detail", "status"}, r.text
            assert r.json()["error"] == kind and r.json()["status"] == status, r.text
            return r.json()

        refused(post_json("/edits", {"question": Q, "answer": "x", "image": "not base64!"}), 422,
                "InvalidInputError")
        refused(post_json("/edits", {"question": Q, "answer": "x", "image": "data:image/png,abc"}), 422,
                "InvalidInputError")
        refused(post_json("/edits", {"question": Q, "answer": "x", "image": 12}), 422, "InvalidInputError")
        refused(post_json("/edits", {"question": Q, "answer": "x", "image": b64(b"no image here")}), 422,
                "ImageError")
        form = refused(c.post("/edits", headers=AUTH, data={"question": Q, "answer": "x"},
                              files={"image": ("x.png", b"no image here", "image/png")}), 422, "ImageError")
        assert "uploaded image" in form["detail"]
        bad_pos = {"question": Q, "answer": "x", "positives": [{"text": "a", "image": "%%%"}]}
        detail = refused(post_json("/edits", bad_pos), 422, "InvalidInputError")["detail"]
        assert "positives[0].image" in detail
        # a missing field: the same validation error from both content types
        from_json = refused(post_json("/edits", {"answer": "x"}), 422, "ValidationError")
        from_form = refused(c.post("/edits", headers=AUTH, data={"answer": "x"}), 422, "ValidationError")
        assert from_json["detail"] == from_form["detail"]
        assert from_json["detail"][0]["loc"] == ["body", "question"]
        # an unknown field, a bad option: refused alike too
        for send in (lambda b: post_json("/edits", b), lambda b: c.post("/edits", headers=AUTH, data=b)):
            refused(send({"question": Q, "answer": "x", "typo_field": "1"}), 422, "ValidationError")
            refused(send({"question": Q, "answer": "x", "tune": "always"}), 422, "ValidationError")
        for send in (lambda b: c.post("/generate", json=b), lambda b: c.post("/generate", data=b)):
            refused(send({"prompt": Q, "temperature": "0", "do_sample": "true"}), 422, "ValidationError")
            refused(send({"prompt": Q, "max_new_tokens": "100000"}), 422, "InvalidInputError")
        refused(post_json("/edits", {"question": Q, "answer": "x", "metadata": [1]}), 422, "ValidationError")
        refused(c.post("/edits", headers=AUTH, data={"question": Q, "answer": "x", "metadata": "[1]"}), 422,
                "ValidationError")
        refused(c.post("/edits", headers={**AUTH, "content-type": "application/json"}, content=b"{nope"), 422,
                "InvalidInputError")
        refused(post_json("/edits", [Q, "x"]), 422, "InvalidInputError")
        refused(c.post("/edits", headers={**AUTH, "content-type": "text/plain"}, content=b"question=q"), 415,
                "UnsupportedMediaType")
        refused(c.post("/generate", json={"prompt": [Q, Q, Q], "image": [b64(PURPLE), b64(GREEN)]}), 422,
                "InvalidInputError")
        refused(post_json("/edits", {"question": Q, "answer": "x", "image_path": "../secret.png"}), 403,
                "PathForbiddenError")
        r = c.post("/route", json={"prompt": Q, "image_path": "../secret.png"})
        refused(r, 403, "PathForbiddenError")
        # too large: refused by its declared length and while it streams in (no Content-Length)
        big = {"question": Q, "answer": "x", "image": b64(b"x" * 100 * 1024)}
        refused(post_json("/edits", big), 413, "PayloadTooLarge")
        chunks = iter([json.dumps(big).encode()[:40_000], json.dumps(big).encode()[40_000:]])
        r = c.post("/edits", headers={**AUTH, "content-type": "application/json"}, content=chunks)
        refused(r, 413, "PayloadTooLarge")
        # writes are authenticated before a JSON body is read, as multipart ones
        assert c.post("/edits", json={"question": Q, "answer": "x"}).status_code == 401
        assert c.get("/edits").json()["total"] == 0  # no refusal wrote anything


def test_openapi_documents_both_bodies_every_reply_and_the_error_body(serve_base, tmp_path):
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        spec = c.get("/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    for path, method in (("/edits", "post"), ("/edits/{edit_id}", "patch"), ("/generate", "post"),
                         ("/route", "post")):
        content = paths[path][method]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}, path
        form, js = content["multipart/form-data"]["schema"], content["application/json"]["schema"]
        image = "image"
        flat = json.dumps(form["properties"][image])
        assert '"binary"' in flat and "base64" not in flat, path
        assert "base64" in json.dumps(js["properties"][image]), path
        assert "$ref" not in json.dumps(content), path  # self-contained: nothing to resolve
    edit_form = paths["/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edit_form["properties"]["positives"]["type"] == "string"  # JSON text in a form
    edit_json = paths["/edits"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert edit_json["required"] == ["question", "answer"]
    assert "image_index" in json.dumps(edit_json["properties"]["positives"])
    replies = {("/edits", "post", "201"): "EditWritten", ("/edits", "get", "200"): "EditList",
               ("/edits/{edit_id}", "get", "200"): "EditDetail",
               ("/edits/{edit_id}", "patch", "200"): "EditWritten",
               ("/edits/{edit_id}", "delete", "200"): "EditDeleted",
               ("/edits/{edit_id}/rollback", "post", "200"): "EditRolledBack",
               ("/generate", "post", "200"): "GenerateReply", ("/route", "post", "200"): "RouteReply",
               ("/health", "get", "200"): "Health"}
    for (path, method, status), model in replies.items():
        got = paths[path][method]["responses"][status]["content"]["application/json"]["schema"]
        assert got == {"$ref": f"#/components/schemas/{model}"}, (path, method, got)
        assert model in schemas
    written = schemas["EditWritten"]
    assert {"gives_answer", "tuning", "id", "version", "persist_seconds"} <= set(written["properties"])
    assert written.get("additionalProperties") is True  # the service's dicts may grow
    for path, method, status in (("/edits", "post", "401"), ("/edits", "post", "413"),
                                 ("/edits/{edit_id}", "delete", "404"), ("/generate", "post", "422"),
                                 ("/generate", "post", "503")):
        got = paths[path][method]["responses"][status]["content"]["application/json"]["schema"]
        assert got == {"$ref": "#/components/schemas/ErrorBody"}, (path, method, status)
    assert set(schemas["ErrorBody"]["required"]) == {"error", "detail", "status"}
    assert "text/plain" in json.dumps(paths["/metrics"]["get"]["responses"]["200"]["content"])


def test_replies_keep_extra_service_fields_and_omit_unsent_ones(serve_base, tmp_path):
    app = create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)
    service = app.state.service
    real = service.add_edit
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/edits", headers=AUTH, json={"question": Q, "answer": "x", "tune": "never"})
        assert r.status_code == 201
        assert {"id", "version", "persist_seconds"} <= set(r.json())
        sent = set(real(None, Q + "?", "y", tune="never"))  # the keys the service itself sends
        r = c.post("/edits", headers=AUTH, json={"question": Q + "!", "answer": "z", "tune": "never"})
        assert set(r.json()) == sent

        def richer(*args, **kwargs):
            return {**real(*args, **kwargs), "gives_answer": True, "tuning": "pending", "brand_new": [1, 2]}

        service.add_edit = richer
        got = c.post("/edits", headers=AUTH, json={"question": Q + "#", "answer": "w", "tune": "never"})
        got = got.json()
        assert got["gives_answer"] is True and got["tuning"] == "pending" and got["brand_new"] == [1, 2]
        health = c.get("/health").json()
        assert {"status", "edits", "read_only", "queued", "uptime_s"} <= set(health)
        assert health["edits"] == 4


# ------------------------------------------------------------------------------------------ read policy


def test_loopback_detection_and_the_read_policy():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "192.168.0.2", "example.com", "localhost.evil.com", None):
        assert not is_loopback(host), host
    assert reads_protected("0.0.0.0", None, TOKEN) is True
    assert reads_protected("127.0.0.1", None, None) is False
    assert reads_protected(None, None, None) is False  # an in-process app: the loopback default
    assert reads_protected("0.0.0.0", False, None) is False  # --open-reads
    assert reads_protected("127.0.0.1", True, TOKEN) is True  # --protect-reads
    with pytest.raises(ConfigError, match="--open-reads"):
        reads_protected("0.0.0.0", None, None)
    with pytest.raises(ConfigError, match="--protect-reads"):
        reads_protected("127.0.0.1", True, None)


def _reads(c, headers=None, eid: int = 0) -> dict[str, int]:
    h = headers or {}
    return {
        "list": c.get("/edits", headers=h).status_code,
        "get": c.get(f"/edits/{eid}", headers=h).status_code,
        "route": c.post("/route", json={"prompt": Q}, headers=h).status_code,
        "generate": c.post("/generate", json={"prompt": Q, "max_new_tokens": 1}, headers=h).status_code,
        "metrics": c.get("/metrics", headers=h).status_code,
        "health": c.get("/health", headers=h).status_code,
    }


def test_reads_are_protected_beyond_loopback_unless_opened(serve_base, tmp_path):
    # built for a wildcard bind: every read needs the token, /health stays open and holds no edit data
    app = create_app(wrap(serve_base), tmp_path / "a", token=TOKEN, host="0.0.0.0")
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/edits", headers=AUTH, json={"question": Q, "answer": "a secret answer", "tune": "never"})
        assert r.status_code == 201
        eid = r.json()["id"]
        anon = _reads(c, eid=eid)
        assert anon == {"list": 401, "get": 401, "route": 401, "generate": 401, "metrics": 401, "health": 200}
        assert c.get("/edits", headers={"Authorization": "Bearer " + "x" * 30}).status_code == 403
        authed = _reads(c, AUTH, eid=eid)
        assert set(authed.values()) == {200}
        health = c.get("/health").text
        assert "a secret answer" not in health and Q not in health
        if any(getattr(r, "path", "") == "/v1/models" for r in app.routes):  # the OpenAI routes follow too
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/openapi.json").status_code == 200  # the API description is no edit data
    # loopback: open by default, --protect-reads protects
    with running(create_app(wrap(serve_base), tmp_path / "b", token=TOKEN, host="127.0.0.1")) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert _reads(c) == {"list": 200, "get": 404, "route": 200, "generate": 200, "metrics": 200,
                             "health": 200}  # GET /edits/0: no such edit, but readable
    with running(create_app(wrap(serve_base), tmp_path / "c", token=TOKEN, host="localhost",
                            protect_reads=True)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert _reads(c)["list"] == 401 and _reads(c)["metrics"] == 401 and _reads(c)["health"] == 200
    # beyond loopback, --open-reads opens them; a read-only server then needs no token at all
    with running(create_app(wrap(serve_base), None, read_only=True, host="0.0.0.0",
                            protect_reads=False)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert _reads(c)["list"] == 200 and _reads(c)["generate"] == 200
    with pytest.raises(ConfigError, match="no bearer token"):
        create_app(wrap(serve_base), None, read_only=True, host="0.0.0.0")
    with pytest.raises(ConfigError, match="no bearer token"):
        create_app(wrap(serve_base), None, read_only=True, protect_reads=True)


def test_an_app_built_for_loopback_is_not_bound_beyond_it(serve_base, tmp_path):
    app = create_app(wrap(serve_base), None, read_only=True)  # in-process default: loopback, reads open
    try:
        with pytest.raises(ConfigError, match="built for loopback"), running_server(app, "0.0.0.0", 0):
            pass
    finally:
        app.state.service.close()


def test_cli_read_flags_and_refusals_before_loading_models(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ESG_MEMORY_TOKEN", raising=False)
    parser = add_serve_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).protect_reads is None
    assert parser.parse_args(["--protect-reads"]).protect_reads is True
    assert parser.parse_args(["--open-reads"]).protect_reads is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--protect-reads", "--open-reads"])
    capsys.readouterr()
    # an unknown model name would fail only when loading: these refusals come first
    spec = ["--memory", str(tmp_path / "new"), "--model", "no-such-model", "--clip", "esg-tiny-clip"]
    assert main([*spec, "--read-only", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "no bearer token" in err and "--open-reads" in err
    assert main([*spec, "--read-only", "--protect-reads"]) == 1
    assert "no bearer token" in capsys.readouterr().err
    # --insecure-local without a token binds 127.0.0.1, so its reads are open: refused only at the model
    assert main([*spec, "--insecure-local", "--host", "0.0.0.0"]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_dockerfile_binds_beyond_loopback_and_so_needs_the_token(tmp_path, monkeypatch, capsys):
    docker = (ROOT / "Dockerfile").read_text()
    line = next(x for x in docker.splitlines() if x.startswith("ENTRYPOINT"))
    entry = json.loads(line.split(None, 1)[1])
    cmd = json.loads(next(x for x in docker.splitlines() if x.startswith("CMD")).split(None, 1)[1])
    assert entry[:3] == ["python", "-m", "esg_memory.serve"] and "--host" in entry
    host = entry[entry.index("--host") + 1]
    assert not is_loopback(host)  # so reads are protected by default there
    assert "--token-file" in cmd
    monkeypatch.delenv("ESG_MEMORY_TOKEN", raising=False)
    args = [a for a in entry[3:]]
    args[args.index("--memory") + 1] = str(tmp_path / "data")
    # without the token file, even a read-only container refuses to start
    assert main([*args, "--read-only", "--model", "no-such-model"]) == 1
    assert "no bearer token" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ model placement


def test_model_placement_options_are_checked_before_loading(monkeypatch):
    import torch

    assert model_placement() == {}
    assert model_placement(dtype="bfloat16", device="cpu") == {"dtype": "bfloat16", "device": "cpu"}
    with pytest.raises(ConfigError, match="--dtype"):
        model_placement(dtype="float64")
    with pytest.raises(ConfigError, match="--device"):
        model_placement(device="not-a-device")
    with pytest.raises(ConfigError, match="not both"):
        model_placement(device="cpu", device_map="auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            model_placement(device="cuda")
    import accelerate  # noqa: F401  (an [all] extra: missing means failing, never skipping)
    assert model_placement(device_map="auto") == {"device_map": "auto"}
    assert model_placement(device_map='{"": "cpu"}') == {"device_map": {"": "cpu"}}
    with pytest.raises(ConfigError, match="JSON"):
        model_placement(device_map="{nope")
    import builtins

    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate" or name.startswith("accelerate."):
            raise ImportError("No module named 'accelerate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    with pytest.raises(ConfigError, match=r"esg-memory\[accelerate\]"):
        model_placement(device_map="auto")


def test_serve_options_parse_and_survive_a_parent_parser():
    parent = argparse.ArgumentParser()
    parent.add_argument("--device", default="cpu")
    sub = parent.add_subparsers(dest="command")
    add_serve_arguments(sub.add_parser("serve"))
    args = parent.parse_args(["--device", "cpu", "serve", "--dtype", "bfloat16", "--device-map", "auto"])
    assert (args.device, args.dtype, args.device_map) == ("cpu", "bfloat16", "auto")
    alone = add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    assert getattr(alone, "dtype", None) is None and getattr(alone, "device", None) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_served_model_in_the_requested_dtype(tmp_path, dtype):
    import torch

    placement = model_placement(device="cpu", dtype=dtype)
    em = open_model("tiny-random-llava", "esg-tiny-clip", tmp_path / "m", **placement)
    want = getattr(torch, dtype)
    assert em.base_model.dtype == want
    assert {p.dtype for p in em.base_model.parameters() if p.is_floating_point()} == {want}
    with running(create_app(em, tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/edits", headers=AUTH, json={"question": Q, "answer": "purple", "image": b64(PURPLE),
                                                  "tune": "never"})
        assert r.status_code == 201, r.text
        rows = c.post("/generate", json={"prompt": [Q, "how many shapes?"], "max_new_tokens": 3,
                                         "image": [b64(PURPLE), b64(GREEN)]}).json()["results"]
        assert rows[0]["edit_id"] == r.json()["id"] and rows[1]["edit_id"] is None
        assert all(isinstance(row["text"], str) for row in rows)


def test_run_from_args_places_the_model_and_passes_the_read_policy(tmp_path, monkeypatch):
    """The CLI path end to end, short of binding 0.0.0.0: the options reach the model and the app."""
    import torch

    import esg_memory.serve.cli as serve_cli

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    seen: dict = {}
    monkeypatch.setattr(serve_cli, "serve", lambda model, memory_dir, **kw: seen.update(model=model,
                                                                                        memory_dir=memory_dir,
                                                                                        **kw))
    argv = ["--memory", str(tmp_path / "m"), "--model", "tiny-random-llava", "--clip", "esg-tiny-clip",
            "--host", "0.0.0.0", "--token-file", str(token_file), "--dtype", "bfloat16", "--device", "cpu"]
    assert main(argv) == 0
    assert seen["model"].base_model.dtype == torch.bfloat16
    assert seen["host"] == "0.0.0.0" and seen["protect_reads"] is None and seen["token"] == TOKEN
    kw = {k: v for k, v in seen.items() if k not in ("model", "memory_dir", "port", "log_level")}
    with running(create_app(seen["model"], seen["memory_dir"], **kw)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        assert c.get("/edits").status_code == 401  # built for 0.0.0.0: reads protected
        r = c.post("/generate", headers=AUTH, json={"prompt": Q, "image": b64(PURPLE), "max_new_tokens": 2})
        assert r.status_code == 200 and isinstance(r.json()["results"][0]["text"], str)
    assert main([*argv, "--dtype", "float64"]) == 1  # refused before loading


def test_add_takes_negatives_in_json_and_forms(serve_base, tmp_path):
    near = "which colour does the shape have?"
    with running(create_app(wrap(serve_base), tmp_path / "m", token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        def routed(prompt: str, image: bytes) -> int | None:
            r = c.post("/route", json={"prompt": prompt, "image": b64(image)})
            return r.json()["results"][0]["edit_id"]

        # a bad negative is refused (422) and writes nothing
        bad = {"question": Q, "answer": "x", "negatives": [{"text": None, "image_index": 3}]}
        r = c.post("/edits", headers=AUTH, json=bad)
        assert r.status_code == 422 and "negatives[0].image_index" in r.json()["detail"], r.text
        r = c.post("/edits", headers=AUTH, json={"question": Q, "answer": "x", "image": b64(PURPLE),
                                                 "negatives": [Q]})
        assert r.status_code == 422 and "own input" in r.json()["detail"], r.text
        assert c.get("/edits").json()["edits"] == []

        body = {"question": Q, "answer": "purple", "image": b64(PURPLE), "tune": "never",
                "negatives": [near, {"text": None, "image_index": 0}], "negative_image": [b64(GREEN)]}
        r = c.post("/edits", headers=AUTH, json=body)
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        assert routed(Q, PURPLE) == eid and routed(near, PURPLE) is None and routed(Q, GREEN) is None
        fb = c.get(f"/edits/{eid}").json()["history"][-1]["feedback"]
        assert [(f["kind"], f["text"]) for f in fb] == [("negative", near), ("negative", Q)]
        assert fb[0]["image"] != fb[1]["image"] and None not in (fb[0]["image"], fb[1]["image"])

        # the same as a form: negatives as JSON text, the images as uploads
        r = c.post("/edits", headers=AUTH,
                   data={"question": "how many shapes?", "answer": "nine", "tune": "never",
                         "negatives": json.dumps(["how many circles?"])},
                   files={"image": ("x.png", GREEN, "image/png")})
        assert r.status_code == 201, r.text
        fb = c.get(f"/edits/{r.json()['id']}").json()["history"][-1]["feedback"]
        assert [f["text"] for f in fb] == ["how many circles?"]
