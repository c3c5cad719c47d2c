"""Saving and loading an EditMemory: equality, atomicity, and refusal of foreign or damaged directories."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image
from safetensors.numpy import load_file, save

from esg_memory.config import MemoryConfig
from esg_memory.errors import ConfigError, EncoderMismatchError, FormatError
from esg_memory.memory import EditMemory
from esg_memory.persist import FORMAT_VERSION

CFG = MemoryConfig(n_text_positives=2, n_image_positives=1, n_generic_questions=3)
Q = "What color is the circle?"


@pytest.fixture
def saved(tmp_path) -> tuple[EditMemory, Path]:
    m = EditMemory(
        HashKeyEncoder(), CFG, locality_pool=["Who wrote Hamlet?", (shape_image("black"), "What?")]
    )
    a = m.add(
        image=shape_image("red"),
        question=Q,
        answer="crimson",
        positives=[(shape_image("red", shift=2), None)],
        metadata={"by": "test", "n": [1, 2]},
    )
    m.add(image=shape_image("blue"), question=Q, answer="navy")
    c = m.add(question="Who wrote the play Hamlet?", answer="Marlowe")
    m.add(question="Temporary?", answer="yes")
    m.delete(3)
    m.revise(a, answer="scarlet")
    m.attach(a, "adapter", b"\x00\x01binary", version=1)
    m.attach(c, "adapter", b"text adapter")
    m.feedback(None, "Who is the author of the Hamlet play?", c)
    path = tmp_path / "mem"
    m.save(path)
    return m, path


def probe_route(m: EditMemory):
    return m.route(
        images=[shape_image("red"), shape_image("blue", shift=1), None, shape_image("green")],
        texts=[Q, Q, "Who is the author of the Hamlet play?", "Is it sunny?"],
    )


def test_save_load_round_trip_is_equal(saved):
    m, path = saved
    assert sorted(os.listdir(path)) == [
        "attachments.safetensors", "blobs.safetensors", "index", "keys.safetensors", "memory.json"
    ]
    doc = json.loads((path / "memory.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION == 2 and doc["encoder"]["dim"] == 64
    blobs = load_file(path / "blobs.safetensors")
    assert blobs and all(n.startswith("blob.") and len(n) == 5 + 64 for n in blobs)
    m2 = EditMemory.load(path, encoder=HashKeyEncoder())
    assert len(m2) == len(m) == 3 and 3 not in m2
    for e in m.list():
        assert m2.get(e.id) == e
        assert [h.to_dict() for h in m2.history(e.id)] == [h.to_dict() for h in m.history(e.id)]
        k1, t1 = m.keys_of(e.id)
        k2, t2 = m2.keys_of(e.id)
        assert np.array_equal(k1, k2) and np.array_equal(t1, t2)
    r1, r2 = probe_route(m), probe_route(m2)
    for f in ("edit_ids", "versions", "scores", "thresholds", "margins", "runner_up"):
        assert np.array_equal(getattr(r1, f), getattr(r2, f), equal_nan=True)
    assert m2.attachment(0, "adapter", version=1) == b"\x00\x01binary" and m2.attachment(0, "adapter") is None
    assert m2.attachment(2, "adapter") == b"text adapter"
    assert m2.open_image(m.get(0).image).tobytes() == m.open_image(m.get(0).image).tobytes()
    assert m2.conflicts() == m.conflicts()
    # a loaded memory keeps working exactly like the original
    for mm in (m, m2):
        mm.add(image=shape_image("yellow"), question=Q, answer="gold")
        mm.delete(1)
    assert [m.keys_of(i)[1].tolist() for i in (0, 2, 4)] == [m2.keys_of(i)[1].tolist() for i in (0, 2, 4)]
    assert m2.add(question="New?", answer="n") == 5  # next_id and retired ids survive


def test_save_overwrites_atomically(saved, tmp_path):
    m, path = saved
    m.add(question="One more?", answer="ok")
    m.save(path)
    assert len(EditMemory.load(path, encoder=HashKeyEncoder())) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_load_refuses_other_encoder(saved):
    _, path = saved
    with pytest.raises(EncoderMismatchError, match="dim 64 \\(saved\\) vs 32"):
        EditMemory.load(path, encoder=HashKeyEncoder(dim=32))
    with pytest.raises(EncoderMismatchError, match="name"):
        EditMemory.load(path, encoder=HashKeyEncoder(name="another-encoder"))
    with pytest.raises(ConfigError):
        EditMemory.load(path)  # the test encoder has no spec to rebuild from


def _edit_json(path: Path, fn) -> None:
    doc = json.loads((path / "memory.json").read_text())
    doc.pop("checksum", None)  # a hand edit would fail the self-checksum; test the field checks behind it
    fn(doc)
    (path / "memory.json").write_text(json.dumps(doc))


def _repack(path: Path, name: str, fn) -> None:
    """Rewrite pack ``name`` with ``fn`` applied to its tensors, its size and sha256 in memory.json to match.

    The pack's own checksum then passes: what is left to catch the damage is the check of each
    image / attachment against its sha256.
    """
    tensors = load_file(path / name)
    fn(tensors)
    data = save(tensors)
    (path / name).write_bytes(data)
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit_json(path, lambda d: d["files"][name].update(entry))


def _first(prefix: str, tensors: dict) -> str:
    return sorted(n for n in tensors if n.startswith(prefix))[0]


def _alter_first(prefix: str, alter):
    def fn(tensors: dict) -> None:
        name = _first(prefix, tensors)
        tensors[name] = np.frombuffer(alter(tensors[name].tobytes()), dtype=np.uint8)

    return fn


@pytest.mark.parametrize(
    "damage",
    [
        "newer",
        "garbage-json",
        "not-ours",
        "truncated-keys",
        "flipped-keys",
        "blob",
        "missing-blob",
        "blob-pack-truncated",
        "blob-pack-flipped",
        "blob-pack-missing",
        "index",
        "no-json",
        "attachment",
        "missing-attachment",
        "attachment-pack-flipped",
        "bad-edit",
        "unknown-neighbour",
        "wrong-link",
        "missing-tensor",
    ],
)
def test_load_refuses_damaged_directories(saved, damage):
    _, path = saved
    if damage == "newer":
        _edit_json(path, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    elif damage == "garbage-json":
        (path / "memory.json").write_bytes(b'{"format": "esg-mem')
    elif damage == "not-ours":
        _edit_json(path, lambda d: d.update(format="something-else"))
    elif damage == "truncated-keys":
        data = (path / "keys.safetensors").read_bytes()
        (path / "keys.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flipped-keys":
        data = bytearray((path / "keys.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (path / "keys.safetensors").write_bytes(bytes(data))
    elif damage == "blob":
        _repack(path, "blobs.safetensors", _alter_first("blob.", lambda b: b[:-5]))
    elif damage == "missing-blob":
        _repack(path, "blobs.safetensors", lambda t: t.pop(_first("blob.", t)))
    elif damage == "blob-pack-truncated":
        data = (path / "blobs.safetensors").read_bytes()
        (path / "blobs.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "blob-pack-flipped":
        data = bytearray((path / "blobs.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (path / "blobs.safetensors").write_bytes(bytes(data))
    elif damage == "blob-pack-missing":
        (path / "blobs.safetensors").unlink()
    elif damage == "index":
        for f in (path / "index").iterdir():
            if f.is_file() and f.suffix != ".json":
                f.write_bytes(f.read_bytes()[:7])
    elif damage == "no-json":
        (path / "memory.json").unlink()
    elif damage == "attachment":
        _repack(path, "attachments.safetensors", _alter_first("attachment.", lambda b: b"tampered"))
    elif damage == "missing-attachment":
        _repack(path, "attachments.safetensors", lambda t: t.pop(_first("attachment.", t)))
    elif damage == "attachment-pack-flipped":
        data = bytearray((path / "attachments.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (path / "attachments.safetensors").write_bytes(bytes(data))
    elif damage == "bad-edit":
        _edit_json(path, lambda d: d["edits"][0].update(key_index=[0, 99]))
    elif damage == "unknown-neighbour":
        _edit_json(path, lambda d: d["edits"][0].update(nbrs=[[12345, 0.9]]))
    elif damage == "wrong-link":
        nudged = lambda d: [[n, s - 0.01] for n, s in d["edits"][0]["nbrs"]]  # noqa: E731
        _edit_json(path, lambda d: d["edits"][0].update(nbrs=nudged(d)))
    elif damage == "missing-tensor":
        _edit_json(path, lambda d: d["edits"][0].update(id=77))
    with pytest.raises(FormatError):
        EditMemory.load(path, encoder=HashKeyEncoder())


def test_load_of_missing_directory(tmp_path):
    with pytest.raises(FormatError):
        EditMemory.load(tmp_path / "nothing-here", encoder=HashKeyEncoder())
