"""Directories written by the code before the layout change (issue #14) load and route exactly as then.

`tests/fixtures/formats/v1/` was written by `make_fixtures.py` at commit a958fdb: a plain snapshot
(memory format 1) and a durable directory whose every write is in the journal (journal format 1), its
last record a deferred delete left unsettled. `expected.json` holds what that code read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory import EditMemory

V1 = Path(__file__).parent / "fixtures" / "formats" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())


def _probes():
    texts = EXPECTED["probes"]["texts"]
    # the same pictures make_fixtures.py drew (shape_image is deterministic)
    images = [
        shape_image("red"),
        shape_image("blue", shift=1),
        None,
        shape_image("green"),
        shape_image("red", shift=3),
        None,
    ]
    return images, texts


def _check(m: EditMemory, want: dict) -> None:
    assert [e.id for e in m.list()] == want["edits"]
    assert {str(e.id): e.answer for e in m.list()} == want["answers"]
    assert {str(e.id): e.version for e in m.list()} == want["versions"]
    for eid, hist in want["history"].items():
        assert [v.to_dict() for v in m.history(int(eid))] == hist
    images, texts = _probes()
    r = m.route(images=images, texts=texts)
    got = want["route"]
    assert r.edit_ids.tolist() == got["edit_ids"]
    assert r.versions.tolist() == got["versions"]
    assert r.nearest.tolist() == got["nearest"]
    assert list(r.origins) == got["origins"]
    for name in ("scores", "thresholds", "margins"):
        np.testing.assert_array_equal(getattr(r, name), np.asarray(got[name], dtype=np.float32))
    for eid, thr in want["keys"].items():
        np.testing.assert_array_equal(m.keys_of(int(eid))[1], np.asarray(thr, dtype=np.float32))
    assert m.attachment(0, "adapter", version=1).hex() == want["attachments"]["0"]
    assert m.attachment(2, "adapter").hex() == want["attachments"]["2"]


def test_v1_snapshot_loads_and_routes_identically():
    _check(EditMemory.load(V1 / "memory", encoder=HashKeyEncoder()), EXPECTED["memory"])


def test_v1_durable_directory_replays_and_routes_identically(tmp_path):
    _check(EditMemory.load(V1 / "durable", encoder=HashKeyEncoder()), EXPECTED["durable"])
    # opened for writing: the journal is replayed, the pending delete settled and journaled, and a
    # write on top survives a reopen
    d = tmp_path / "durable"
    shutil.copytree(V1 / "durable", d)
    with EditMemory.open(d, encoder=HashKeyEncoder()) as m:
        _check(m, EXPECTED["durable"])
        new = m.add(question="What is the tallest mountain?", answer="K2")
    with EditMemory.open(d, encoder=HashKeyEncoder()) as m:
        assert m.get(new).answer == "K2"
        assert [e.id for e in m.list()] == [*EXPECTED["durable"]["edits"], new]


@pytest.mark.parametrize("which", ["memory", "durable"])
def test_v1_plain_and_durable_agree(which):
    # both directories hold the same writes: whatever differs is timestamps, never routing
    assert EXPECTED[which]["route"] == EXPECTED["memory"]["route"]
