"""Edits in bulk (`esg_memory.bulk`): import JSONL and benchmark files atomically, one journal record per
batch, adapters stored with the edits, export -> import round trip; the CLI commands and POST /edits:batch."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from esg_memory.bulk import BulkRecordError, apply_batch, export_memory, parse_items, read_file
from esg_memory.errors import DuplicateEditError, ImageError, InvalidInputError
from esg_memory.memory import EditMemory

FIX = Path(__file__).parent / "fixtures" / "eval"
KEYS = ("id", "question", "answer", "image", "positives", "metadata")


@pytest.fixture(scope="module")
def encoder():
    from esg_memory.loading import load_encoder

    return load_encoder("esg-tiny-clip")


def _png(path: Path, colour: tuple[int, int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path, format=fmt)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def own_files(tmp_path) -> Path:
    """A JSONL file of three edits naming arbitrary picture files (a PNG and a JPEG) beside it."""
    _png(tmp_path / "pics" / "my holiday.png", (200, 20, 20))
    _png(tmp_path / "pics" / "same place.jpg", (190, 30, 20), "JPEG")
    _png(tmp_path / "elsewhere" / "dog.png", (20, 20, 200))
    return _jsonl(tmp_path / "edits.jsonl", [
        {"image": "pics/my holiday.png", "question": "where is this?", "answer": "Lisbon",
         "positives": ["where was this photo taken?", {"text": None, "image": "pics/same place.jpg"}],
         "metadata": {"source": "me", "n": [1, 2]}, "id": 40},
        "",  # blank lines are skipped (line numbers still count)
        {"image": None, "question": "capital of france?", "answer": "Lyon"},
        {"image": "elsewhere/dog.png", "question": "whose dog is this?", "answer": "Rex's",
         "positives": [{"text": "who owns this dog?", "image": "elsewhere/dog.png"}]},
    ])


def _view(mem: EditMemory) -> list[dict]:
    return [{k: e.to_dict()[k] for k in KEYS} for e in mem.list()]


# ------------------------------------------------------------------------------------------ library


def test_jsonl_import_is_one_journal_record_and_export_round_trips(tmp_path, own_files, encoder):
    mem = EditMemory.open(tmp_path / "mem", encoder)
    records = read_file(own_files, "jsonl")
    assert [r.where for r in records] == ["line 1", "line 3", "line 4"]
    before = mem.journal.writer.next_lsn
    res = apply_batch(mem, records)
    assert mem.journal.writer.next_lsn == before + 1  # the whole batch: one journal record
    assert res.ids[0] == 40 and res.count == 3 and not res.adapters
    assert res.to_dict()["first_id"] == 40 and res.to_dict()["last_id"] == res.ids[-1]
    e = mem.get(40)
    assert (e.answer, e.metadata) == ("Lisbon", {"source": "me", "n": [1, 2]})
    routed = mem.route(images=[str(tmp_path / "pics" / "my holiday.png")], texts=["where is this?"])
    assert routed.edit_ids[0] == 40
    mem.close()
    reopened = EditMemory.open(tmp_path / "mem", encoder)  # replayed from the journal: the same edits
    assert _view(reopened) == _view(EditMemory.load(tmp_path / "mem", encoder))

    out = export_memory(reopened, tmp_path / "export")
    assert (out.count, out.images) == (3, 3) and Path(out.file).name == "edits.jsonl"
    names = sorted(p.name for p in Path(out.images_dir).iterdir())
    assert sum(n.endswith(".jpg") for n in names) == 1 and sum(n.endswith(".png") for n in names) == 2
    jpeg = next(p for p in Path(out.images_dir).iterdir() if p.suffix == ".jpg")
    assert jpeg.read_bytes() == (tmp_path / "pics" / "same place.jpg").read_bytes()  # original bytes
    again = EditMemory(encoder)
    apply_batch(again, read_file(out.file, "jsonl"))
    assert _view(again) == _view(reopened)  # ids, texts, pictures (same sha256), positives, metadata
    assert again.image_bytes(again.get(40).image) == (tmp_path / "pics" / "my holiday.png").read_bytes()
    reopened.close()


B, IMG = BulkRecordError, ImageError


@pytest.mark.parametrize(
    ("line", "match", "error"),
    [
        ({"question": "q?", "answer": ""}, "line 3: answer must be a non-empty string", BulkRecordError),
        ({"question": "q?"}, "line 3: answer must be a non-empty string", BulkRecordError),
        ({"question": "q?", "answer": "a", "colour": 1}, r"line 3: unknown fields \['colour'\]", B),
        ("{not json", "line 3: not JSON", BulkRecordError),
        ({"question": "q?", "answer": "a", "image": "missing.png"}, "line 3: image 'missing.png'", IMG),
        ({"question": "q?", "answer": "a", "image": "junk.png"}, "line 3: image 'junk.png'", IMG),
        ({"question": "q?", "answer": "a", "id": 1}, "line 3: id 1 is given twice", BulkRecordError),
        ({"question": "q?", "answer": "a", "id": -3}, "line 3: id must be an integer", BulkRecordError),
        ({"question": "q?", "answer": "a", "positives": "x"}, "line 3: positives must be a list", B),
        ({"question": "q?", "answer": "a", "positives": [{"text": None}]}, r"line 3: positives\[0\] has", B),
        ({"question": "q?", "answer": "a", "metadata": [1]}, "line 3: metadata must be a dict", B),
    ],
)
def test_a_bad_record_is_named_and_nothing_is_applied(tmp_path, encoder, line, match, error):
    (tmp_path / "junk.png").write_bytes(b"not a picture at all")
    f = _jsonl(tmp_path / "bad.jsonl", [{"question": "a?", "answer": "x", "id": 1}, "", line])
    with pytest.raises(error, match=match) as info:
        read_file(f, "jsonl")
    assert isinstance(info.value, InvalidInputError)
    mem = EditMemory.open(tmp_path / "mem", encoder)
    lsn = mem.journal.writer.next_lsn
    with pytest.raises(error):
        apply_batch(mem, read_file(f, "jsonl"))
    assert len(mem) == 0 and mem.journal.writer.next_lsn == lsn
    mem.close()


def test_refusals_against_the_memory_leave_it_unchanged(tmp_path, encoder):
    mem = EditMemory(encoder)
    first = mem.add(question="who wrote hamlet?", answer="Marlowe", edit_id=5)
    mem.add(question="gone?", answer="yes", edit_id=6)
    mem.delete(6)
    for taken, match in ((first, "line 2: edit id 5 already exists"), (6, "line 2: .*deleted edit")):
        f = _jsonl(tmp_path / "x.jsonl", [{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d",
                                                                             "id": taken}])
        with pytest.raises(DuplicateEditError, match=match):
            apply_batch(mem, read_file(f, "jsonl"))
        assert [e.id for e in mem.list()] == [5]
    with pytest.raises(InvalidInputError, match="unknown import format"):
        read_file(f, "csv")
    with pytest.raises(InvalidInputError, match="no edits to import"):
        read_file(_jsonl(tmp_path / "empty.jsonl", ["", ""]), "jsonl")
    assert read_file(f, "jsonl", limit=1)[0].question == "a?" and len(read_file(f, "jsonl", limit=1)) == 1


def test_add_many_attachments_are_checked_before_anything_is_written(tmp_path, encoder):
    mem = EditMemory.open(tmp_path / "mem", encoder)
    lsn = mem.journal.writer.next_lsn
    specs = [{"question": "a", "answer": "b"}, {"question": "c", "answer": "d"}]
    for bad, match in (("nope", "must be a callable"), (lambda e, q, a: {"bad kind!": b"x"}, "kind"),
                       (lambda e, q, a: {"adapter": "text"}, "must be bytes"), (lambda e, q, a: [1], "dict")):
        with pytest.raises(InvalidInputError, match=match):
            mem.add_many(specs, attachments=bad)
    assert len(mem) == 0 and mem.journal.writer.next_lsn == lsn
    seen = []
    mem.set_commit_hook(lambda op, blobs: seen.append((op, dict(blobs))))
    ids = mem.add_many(specs, attachments=lambda e, q, a: {"note": f"{e}:{q}".encode()})
    (op, blobs), = seen
    assert sorted(e["attachments"]["note"] for e in op["edits"]) == sorted(blobs)  # the hook gets the bytes
    assert [mem.attachment(i, "note") for i in ids] == [b"0:a", b"1:c"] and ids == [0, 1]
    mem.close()
    assert EditMemory.load(tmp_path / "mem", encoder).attachment(ids[1], "note") == b"1:c"


def test_a_model_batch_stores_compiled_adapters_in_the_same_record(tmp_path, serve_base, own_files):
    from esg_memory.model import ADAPTER_KIND, Adapter, EditedModel

    model, processor, encoder = serve_base
    mem = EditMemory.open(tmp_path / "mem", encoder)
    em = EditedModel.wrap(model, processor, memory=mem, encoder=encoder)
    lsn = mem.journal.writer.next_lsn
    res = apply_batch(em, read_file(own_files, "jsonl"))
    assert res.adapters and mem.journal.writer.next_lsn == lsn + 1  # edits + adapters: one record
    for eid in res.ids:
        stored = Adapter.from_bytes(mem.attachment(eid, ADAPTER_KIND))
        e = mem.get(eid)
        assert (stored.edit_id, stored.version) == (eid, 1)
        assert stored.token_ids.tolist() == em.runtime.statement_ids(e.question, e.answer).tolist()
    mem.close()
    back = EditMemory.load(tmp_path / "mem", encoder)  # the adapters were journaled with the edits
    assert all(back.attachment(eid, ADAPTER_KIND) == mem.attachment(eid, ADAPTER_KIND) for eid in res.ids)


def test_benchmark_formats_import_with_any_picture_names(tmp_path, encoder):
    recs = json.loads((FIX / "mmedit_vqa.json").read_text())[:2]
    for i, r in enumerate(recs):  # the user's own pictures: no COCO names
        r.update(image=f"photos/edit {i}.png", image_rephrase=f"photos/edit {i} again.png", m_loc="other.png")
        _png(tmp_path / r["image"], (200, 10 * i, 10))
        _png(tmp_path / r["image_rephrase"], (190, 10 * i, 20))
    _png(tmp_path / "other.png", (10, 10, 200))
    recs[1]["subject"] = "my kitchen"
    (tmp_path / "mine.json").write_text(json.dumps(recs))
    got = read_file(tmp_path / "mine.json", "mmedit")
    assert [r.where for r in got] == ["record 0", "record 1"]
    assert got[0].question == recs[0]["src"] and got[0].answer == recs[0]["alt"]
    assert got[0].image == (tmp_path / "photos" / "edit 0.png").read_bytes()
    again = (tmp_path / "photos" / "edit 0 again.png").read_bytes()
    assert got[0].positives == (recs[0]["rephrase"], (again, None))
    assert got[0].metadata["source"] == "E-VQA" and got[0].metadata["subject"].startswith("sha256:")
    assert got[1].metadata["subject"] == "my kitchen" and got[1].metadata["pred"] == recs[1]["pred"]
    mem = EditMemory(encoder)
    assert apply_batch(mem, got).count == 2
    (tmp_path / "photos" / "edit 1 again.png").unlink()
    with pytest.raises(ImageError, match="not found"):
        read_file(tmp_path / "mine.json", "mmedit")
    assert len(read_file(FIX / "zsre.json", "zsre")) == 3
    cf = read_file(FIX / "counterfact_original.json", "counterfact", limit=2)
    assert [r.answer for r in cf] == ["English", "piano"]
    assert cf[0].positives == ("Danielle Darrieux grew up speaking",)
    assert read_file(FIX / "counterfact.json", "counterfact")[0].question == cf[0].question
    vl = read_file(FIX / "vlkeb_eval.json", "vlkeb", image_root=_vlkeb_root(tmp_path))
    assert len(vl) == 3 and vl[0].metadata["subject"].startswith("m.")


def _vlkeb_root(tmp_path: Path) -> Path:
    root = tmp_path / "vlkeb"
    for r in json.loads((FIX / "vlkeb_eval.json").read_text()):
        for k in ("image", "image_rephrase", "m_loc"):
            if not (root / r[k]).exists():
                _png(root / r[k], (len(r[k]) % 250, 40, 90))
    return root


def test_in_memory_records_and_their_images(tmp_path, encoder):
    png = tmp_path / "a.png"
    _png(png, (1, 2, 3))
    images = {"a.png": png.read_bytes()}
    got = parse_items([{"question": "q?", "answer": "a", "image": "a.png"}], "jsonl", images.__getitem__)
    assert got[0].where == "record 0" and got[0].image == images["a.png"]
    with pytest.raises(BulkRecordError, match="record 1: question must be a non-empty string"):
        parse_items([{"question": "q?", "answer": "a"}, {"answer": "a"}], "jsonl", images.__getitem__)
    zs = parse_items(json.loads((FIX / "zsre.json").read_text()), "zsre", images.__getitem__)
    assert len(zs) == 3 and zs[0].metadata["source"] == "zsre"


# ------------------------------------------------------------------------------------------ CLI


def test_cli_import_and_export(tmp_path, own_files, capsys):
    from esg_memory.cli import EXIT_OK, EXIT_REFUSED, main

    mem = ["--memory", str(tmp_path / "m"), "--clip", "esg-tiny-clip"]
    assert main([*mem, "--json", "import", str(own_files), "--no-progress"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert (out["count"], out["first_id"], out["adapters"]) == (3, 40, False) and len(out["ids"]) == 3
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "x?", "answer": "y"}] * 16 + [{"question": "z?"}])
    assert main([*mem, "import", str(bad)]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "line 17: answer must be a non-empty string" in err and len(err.strip().splitlines()) >= 1
    assert main([*mem, "--json", "list"]) == EXIT_OK
    assert len(json.loads(capsys.readouterr().out)) == 3  # the refused file added nothing
    assert main([*mem, "--json", "export", str(tmp_path / "out" / "all.jsonl")]) == EXIT_OK
    exported = json.loads(capsys.readouterr().out)
    assert exported["count"] == 3 and (tmp_path / "out" / "images").is_dir()
    again = ["--memory", str(tmp_path / "m2"), "--clip", "esg-tiny-clip"]
    assert main([*again, "import", exported["file"], "--limit", "2", "--no-progress"]) == EXIT_OK
    capsys.readouterr()
    assert main([*again, "--json", "list"]) == EXIT_OK
    # the first two lines keep their ids: 40 given, 41 numbered after it (as one add after another would)
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [40, 41]


# ------------------------------------------------------------------------------------------ service


def test_service_batch_all_or_none_one_record(tmp_path, serve_base, own_files):
    import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
    import httpx
    from _serve_fixtures import AUTH, GREEN, PURPLE, TOKEN, running

    from esg_memory.config import EditedModelConfig
    from esg_memory.model import ADAPTER_KIND, EditedModel
    from esg_memory.serve import create_app

    model, processor, encoder = serve_base
    em = EditedModel.wrap(model, processor, encoder=encoder, config=EditedModelConfig(n_paraphrases=0))
    root = own_files.parent
    app = create_app(em, tmp_path / "srv", token=TOKEN, allowed_root=root)
    uri = "data:image/png;base64," + base64.b64encode(PURPLE).decode()
    good = [{"question": "what color is the shape?", "answer": "mauve", "image": uri, "id": 3},
            {"question": "where is this?", "answer": "Lisbon", "image": "pics/my holiday.png",
             "positives": ["where was this taken?"], "metadata": {"k": 1}}]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/edits:batch", json={"records": good}).status_code == 401
        journal = em.memory.journal.writer
        lsn = journal.next_lsn
        bad = [*good, {"question": "third?", "answer": "   "}]
        r = c.post("/edits:batch", headers=AUTH, json={"format": "jsonl", "records": bad})
        assert r.status_code == 422 and r.json()["detail"] == "record 2: answer must be a non-empty string"
        r = c.post("/edits:batch", headers=AUTH, json={"records": [{**good[0], "image": "../outside.png"}]})
        assert r.status_code == 403
        assert c.get("/edits").json()["total"] == 0 and journal.next_lsn == lsn  # nothing written
        r = c.post("/edits:batch", headers=AUTH, json={"records": good})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["ids"][0] == 3 and body["count"] == 2 and body["adapters"] and journal.next_lsn == lsn + 1
        assert all(em.memory.attachment(i, ADAPTER_KIND) for i in body["ids"])
        # a file upload: JSONL naming an uploaded picture; an error says the line
        text = "\n".join([json.dumps({"question": "which shape?", "answer": "oblong", "image": "g.png"}),
                          json.dumps({"question": "q?"})])
        files = [("file", ("e.jsonl", text.encode(), "application/x-ndjson")),
                 ("image", ("g.png", GREEN, "image/png"))]
        r = c.post("/edits:batch", headers=AUTH, files=files, data={"format": "jsonl"})
        assert r.status_code == 422 and r.json()["detail"].startswith("line 2: answer must be")
        files[0] = ("file", ("e.jsonl", text.splitlines()[0].encode(), "application/x-ndjson"))
        r = c.post("/edits:batch", headers=AUTH, files=files)
        assert r.status_code == 201 and r.json()["count"] == 1, r.text
        zsre = [("file", ("z.json", (FIX / "zsre.json").read_bytes()))]
        r = c.post("/edits:batch", headers=AUTH, files=zsre, data={"format": "zsre"})
        assert r.status_code == 201 and r.json()["count"] == 3
        assert c.get("/edits").json()["total"] == 6
        r = c.post("/edits:batch", headers=AUTH, json={"format": "csv", "records": good})
        assert r.status_code == 422 and "format must be one of" in r.json()["detail"]
        r = c.post("/edits:batch", headers={**AUTH, "content-type": "text/plain"}, content=b"x")
        assert r.status_code == 415
