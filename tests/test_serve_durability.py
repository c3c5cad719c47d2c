"""The service journals every acknowledged write: SIGKILL the server process, restart, nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import pytest
import uvicorn  # noqa: F401  (an [all] extra: missing means failing, never skipping)
from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, Q, running

_SERVER = """
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
import torch
torch.set_num_threads(1)
from esg_memory.loading import load_base_model, load_encoder
from esg_memory.model import EditedModel
from esg_memory.config import EditedModelConfig
from esg_memory.serve import create_app, running_server
model, processor = load_base_model("tiny-random-llava")
cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
em = EditedModel.wrap(model, processor, memory=None, encoder=load_encoder("esg-tiny-clip"), config=cfg)
app = create_app(em, {mem!r}, token={token!r})
with running_server(app) as url:
    print(url, flush=True)
    time.sleep(300)
"""


def test_sigkilled_server_restarts_with_every_acknowledged_write(serve_base, tmp_path):
    from esg_memory.config import EditedModelConfig
    from esg_memory.model import EditedModel
    from esg_memory.serve import create_app

    mem = tmp_path / "mem"
    proc = subprocess.Popen([sys.executable, "-c", _SERVER.format(mem=str(mem), token=TOKEN)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), "the server did not start"
        with httpx.Client(base_url=url, timeout=60) as c:
            acked = {}
            for i, (img, ans) in enumerate([(PURPLE, "violet"), (GREEN, "green"), (None, "forty-two")]):
                files = {"image": ("x.png", img, "image/png")} if img is not None else None
                q = Q if img is not None else f"question {i}?"
                r = c.post("/edits", headers=AUTH, data={"question": q, "answer": ans}, files=files)
                assert r.status_code == 201, r.text
                acked[r.json()["id"]] = (1, ans)
            first, second, third = list(acked)
            assert c.delete(f"/edits/{second}", headers=AUTH).status_code == 200
            del acked[second]
            r = c.patch(f"/edits/{first}", headers=AUTH, data={"answer": "lilac"})
            assert r.status_code == 200
            acked[first] = (2, "lilac")
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no compaction: only the journal has the writes
        proc.wait()
    snapshot = json.loads((mem / "memory" / "snapshot" / "memory.json").read_text())
    assert snapshot["edits"] == [] and any((mem / "memory" / "journal").iterdir())
    model, processor, enc = serve_base
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    em = EditedModel.wrap(model, processor, memory=mem, encoder=enc, config=cfg)
    assert {e.id: (e.version, e.answer) for e in em.memory.list()} == acked
    # the dead server's locks are gone: a new writable server starts and serves the edits
    with running(create_app(em, mem, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", data={"prompt": Q, "max_new_tokens": "4"},
                   files={"image": ("x.png", PURPLE, "image/png")})
        assert r.json()["results"][0]["edit_id"] == first
        assert r.json()["results"][0]["edit_answer"] == "lilac"
        assert c.get(f"/edits/{second}").status_code == 404
        assert c.get(f"/edits/{third}").json()["answer"] == "forty-two"
    # a clean shutdown compacted: the snapshot now holds the edits, the journal is empty
    snapshot = json.loads((mem / "memory" / "snapshot" / "memory.json").read_text())
    assert sorted(e["id"] for e in snapshot["edits"]) == sorted(acked)
    assert os.path.getsize(next((mem / "memory" / "journal").glob("*.wal"))) == 24


def test_edited_model_on_a_durable_directory(serve_base, tmp_path):
    from esg_memory.config import EditedModelConfig
    from esg_memory.errors import LockError
    from esg_memory.memory import EditMemory
    from esg_memory.model import ADAPTER_KIND, EditedModel

    model, processor, enc = serve_base
    cfg = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, tune="never")
    d = tmp_path / "wrapped"
    em = EditedModel.wrap(model, processor, memory=d, encoder=enc, config=cfg, durable=True)
    try:
        assert (d / "edited_model.json").is_file() and em.memory.durable_path == (d / "memory").resolve()
        eid = em.add_edit(None, "who painted the mona lisa?", "leonardo", tune="never")
        with pytest.raises(LockError):
            EditedModel.wrap(model, processor, memory=d, encoder=enc, durable=True)
        # a reader sees the edit and its compiled adapter at once (journaled before add_edit returned)
        seen = EditMemory.load(d / "memory", enc)
        assert seen.get(eid).answer == "leonardo"
        assert seen.attachment(eid, ADAPTER_KIND) == em.memory.attachment(eid, ADAPTER_KIND)
        em.save(d)  # its own directory: a compaction (snapshot + journal truncated), not a second copy
        snap = json.loads((d / "memory" / "snapshot" / "memory.json").read_text())
        assert [e["id"] for e in snap["edits"]] == [eid] and snap["journal"]["lsn"] >= 2
        assert not (d / "memory" / "memory.json").exists()
    finally:
        em.close()
    again = EditedModel.wrap(model, processor, memory=d, encoder=enc, durable=True)
    try:
        hit = again.retrieve(prompts=["who painted the mona lisa?"])[0]
        assert (hit.edit_id, hit.answer) == (eid, "leonardo")
        assert again.memory.attachment(eid, ADAPTER_KIND) == seen.attachment(eid, ADAPTER_KIND)
    finally:
        again.close()
