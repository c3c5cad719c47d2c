"""Snapshot format 2: images and attachments packed into one safetensors file each (issue #20).

A snapshot used to hold one file (and one fsync) per image and per attachment; now it is a constant
handful of files. What was checked per file is still checked per packed entry; format 1 directories
still load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image
from PIL import Image
from safetensors.numpy import load_file, save

from esg_memory.config import MemoryConfig
from esg_memory.errors import FormatError
from esg_memory.memory import EditMemory
from esg_memory.persist import FORMAT_VERSION

CFG = MemoryConfig(n_text_positives=2, n_image_positives=1, n_generic_questions=4)
V1 = Path(__file__).parent / "fixtures" / "formats" / "v1" / "memory"
ENTRIES = ["attachments.safetensors", "blobs.safetensors", "index", "keys.safetensors", "memory.json"]


def noise_image(seed: int) -> Image.Image:
    """A small picture unique to ``seed`` (deterministic)."""
    px = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(px, "RGB")


def filled(n: int) -> EditMemory:
    m = EditMemory(HashKeyEncoder(), CFG)
    for k in range(n):
        m.add(noise_image(k), f"what is in picture {k}?", f"thing {k}", metadata={"k": k})
    pos = [(shape_image("red", shift=2), None)]
    m.add(shape_image("red"), "What color is the circle?", "red", positives=pos)
    text = m.add(question="Who wrote the play Hamlet?", answer="Marlowe")
    m.attach(0, "x", b"\x00adapter-zero" * 50)
    m.attach(text, "x", b"text adapter")
    m.attach(text, "y", b"text adapter")  # the same bytes twice: stored once, recorded twice
    m.revise(0, answer="changed")
    m.attach(0, "x", b"second version")
    return m


def probes(n: int):
    images = [noise_image(k) for k in range(0, n, 3)] + [shape_image("red", shift=1), None]
    texts = [f"what is in picture {k}?" for k in range(0, n, 3)]
    texts += ["What color is the circle?", "Who wrote Hamlet?"]
    return images, texts


def saved_state(m: EditMemory, d: Path) -> dict:
    """Everything a save writes, exactly (keys.safetensors' metadata is written in random order)."""
    m.save(d)
    doc = json.loads((d / "memory.json").read_text())
    doc.pop("checksum")
    keys_file = doc["files"].pop("keys.safetensors")
    assert keys_file["bytes"] == (d / "keys.safetensors").stat().st_size
    keys = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in load_file(d / "keys.safetensors").items()}
    packs = {n: (d / n).read_bytes() for n in ("blobs.safetensors", "attachments.safetensors")}
    return {"doc": doc, "keys": keys, "packs": packs}


def routing(m: EditMemory, n: int) -> list:
    r = m.route(*probes(n))
    fields = ("edit_ids", "versions", "scores", "thresholds", "margins", "runner_up", "nearest")
    return [(f, np.asarray(getattr(r, f)).tobytes()) for f in fields]


def test_round_trip_is_bit_for_bit(tmp_path):
    m = filled(12)
    before = saved_state(m, tmp_path / "a")
    doc = before["doc"]
    assert doc["format_version"] == FORMAT_VERSION == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ENTRIES
    assert all(set(a) == {"edit", "version", "kind", "sha256", "bytes"} for a in doc["attachments"])
    m2 = EditMemory.load(tmp_path / "a", HashKeyEncoder())
    assert saved_state(m2, tmp_path / "b") == before  # memory.json, keys, both packs: identical
    assert routing(m2, 12) == routing(m, 12)
    for e in m.list():
        assert m2.get(e.id) == e
        assert [v.to_dict() for v in m2.history(e.id)] == [v.to_dict() for v in m.history(e.id)]
        for a, b in zip(m.keys_of(e.id), m2.keys_of(e.id), strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        if e.image:
            assert m2.open_image(e.image).tobytes() == m.open_image(e.image).tobytes()
    text = m.list()[-1].id
    assert m2.attachment(0, "x", version=1) == b"\x00adapter-zero" * 50
    assert m2.attachment(0, "x") == b"second version"
    assert m2.attachment(text, "x") == m2.attachment(text, "y") == b"text adapter"
    assert len(load_file(tmp_path / "a" / "attachments.safetensors")) == 3  # the shared bytes once


def test_empty_packs_round_trip(tmp_path):
    m = EditMemory(HashKeyEncoder(), CFG)
    m.add(question="Who wrote the play Hamlet?", answer="Marlowe")
    m.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ENTRIES
    assert load_file(tmp_path / "m" / "blobs.safetensors") == {}
    assert load_file(tmp_path / "m" / "attachments.safetensors") == {}
    m2 = EditMemory.load(tmp_path / "m", HashKeyEncoder())
    assert [e.to_dict() for e in m2.list()] == [e.to_dict() for e in m.list()]
    EditMemory(HashKeyEncoder(), CFG).save(tmp_path / "none")  # no edits at all
    assert len(EditMemory.load(tmp_path / "none", HashKeyEncoder())) == 0


def test_file_count_does_not_grow_with_images(tmp_path):
    m = filled(40)
    m.save(tmp_path / "m")
    files = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*"))
    index_files = [f for f in files if f.startswith("index/")]
    assert [f for f in files if not f.startswith("index/")] == ENTRIES
    assert len(index_files) <= 6  # the index's own files: a fixed set
    blobs = load_file(tmp_path / "m" / "blobs.safetensors")
    assert len(blobs) == 40 + 2  # every distinct image, packed
    for name, t in blobs.items():
        assert name == f"blob.{hashlib.sha256(t.tobytes()).hexdigest()}" and t.dtype == np.uint8
    small = tmp_path / "small"
    filled(3).save(small)
    assert sorted(p.name for p in small.rglob("*")) == sorted(p.name for p in (tmp_path / "m").rglob("*"))


def test_format_1_directory_still_loads_and_is_rewritten_as_2(tmp_path):
    assert (V1 / "blobs").is_dir() and json.loads((V1 / "memory.json").read_text())["format_version"] == 1
    old = EditMemory.load(V1, HashKeyEncoder())
    old.save(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ENTRIES
    new = EditMemory.load(tmp_path / "new", HashKeyEncoder())
    assert [e.to_dict() for e in new.list()] == [e.to_dict() for e in old.list()]
    images, texts = probes(0)
    r1, r2 = old.route(images=images, texts=texts), new.route(images=images, texts=texts)
    for f in ("edit_ids", "versions", "scores", "thresholds", "margins"):
        assert np.array_equal(getattr(r1, f), getattr(r2, f), equal_nan=True)
    assert new.attachment(0, "adapter", version=1) == old.attachment(0, "adapter", version=1)
    for e in old.list():
        if e.image:
            assert new.open_image(e.image).tobytes() == old.open_image(e.image).tobytes()


def test_converting_a_plain_directory_removes_its_files(tmp_path):
    for name, make in (("v2", lambda d: filled(3).save(d)), ("v1", lambda d: shutil.copytree(V1, d))):
        d = tmp_path / name
        make(d)
        want = EditMemory.load(d, HashKeyEncoder())
        with EditMemory.open(d, HashKeyEncoder()) as m:
            assert [e.to_dict() for e in m.list()] == [e.to_dict() for e in want.list()]
        left = sorted(p.name for p in d.iterdir())
        assert left == ["journal", "snapshot", "writer.lock"], left
        assert sorted(p.name for p in (d / "snapshot").iterdir()) == ENTRIES


def _repack(d: Path, name: str, fn) -> None:
    """Rewrite pack ``name`` with ``fn`` applied; its recorded size and sha256 updated to pass."""
    tensors = load_file(d / name)
    fn(tensors)
    data = save(tensors)
    (d / name).write_bytes(data)
    doc = json.loads((d / "memory.json").read_text())
    doc.pop("checksum")  # a hand edit fails the self-checksum: test the checks behind it
    doc["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "memory.json").write_text(json.dumps(doc))


def _state(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["bytes", "truncated", "missing", "dtype"])
def test_damaged_blob_in_the_pack_is_refused_by_name(tmp_path, damage):
    d = tmp_path / "m"
    filled(4).save(d)
    sha = hashlib.sha256(png_bytes(shape_image("red"))).hexdigest()
    # the pack holds the bytes the memory was given (PNG here), by their sha256
    assert f"blob.{sha}" in load_file(d / "blobs.safetensors")

    def hurt(t: dict) -> None:
        raw = t[f"blob.{sha}"].tobytes()
        if damage == "bytes":
            t[f"blob.{sha}"] = np.frombuffer(png_bytes(shape_image("black")), dtype=np.uint8)
        elif damage == "truncated":
            t[f"blob.{sha}"] = np.frombuffer(raw[:-5], dtype=np.uint8)
        elif damage == "missing":
            del t[f"blob.{sha}"]
        else:
            t[f"blob.{sha}"] = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.float32)

    _repack(d, "blobs.safetensors", hurt)
    damaged = _state(d)
    with pytest.raises(FormatError, match=f"blobs.safetensors: image blob {sha}"):
        EditMemory.load(d, HashKeyEncoder())
    assert _state(d) == damaged  # loading changed nothing on disk


def test_damaged_attachment_in_the_pack_is_refused(tmp_path):
    d = tmp_path / "m"
    filled(2).save(d)
    sha = hashlib.sha256(b"second version").hexdigest()
    tampered = np.frombuffer(b"tampered", np.uint8)
    _repack(d, "attachments.safetensors", lambda t: t.update({f"attachment.{sha}": tampered}))
    with pytest.raises(FormatError, match=f"attachment {sha} fails its checksum"):
        EditMemory.load(d, HashKeyEncoder())


def test_attachment_record_size_is_checked(tmp_path):
    d = tmp_path / "m"
    filled(2).save(d)
    doc = json.loads((d / "memory.json").read_text())
    doc.pop("checksum")
    doc["attachments"][0]["bytes"] += 1
    (d / "memory.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="bytes, expected"):
        EditMemory.load(d, HashKeyEncoder())


@pytest.mark.parametrize("pack", ["blobs.safetensors", "attachments.safetensors"])
def test_damaged_pack_file_is_refused(tmp_path, pack):
    d = tmp_path / "m"
    filled(2).save(d)
    data = (d / pack).read_bytes()
    for bad in (data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):
        (d / pack).write_bytes(bad)
        with pytest.raises(FormatError, match=pack):
            EditMemory.load(d, HashKeyEncoder())
    (d / pack).unlink()
    (d / pack).symlink_to("/dev/zero")
    with pytest.raises(FormatError, match=pack):
        EditMemory.load(d, HashKeyEncoder())


def test_newer_format_is_refused(tmp_path):
    d = tmp_path / "m"
    filled(1).save(d)
    doc = json.loads((d / "memory.json").read_text())
    doc.pop("checksum")
    doc["format_version"] = FORMAT_VERSION + 1
    (d / "memory.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="newer than this library's"):
        EditMemory.load(d, HashKeyEncoder())
