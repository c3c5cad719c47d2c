"""Exact deletion through the incremental re-fit: every branch of `Plan.remove` against a replay.

A deleted edit's holders either recompute a full (capped) neighbour set, or drop it from a set
that held every edit within the radius; they are re-fitted unless the deleted edit gave them no
negative (same answer, not crossed). Each variant must leave the memory exactly as if the edit had
never been added, and the shortcut must actually be taken.
"""

from __future__ import annotations

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory.config import MemoryConfig
from esg_memory.memory import EditMemory
from esg_memory.memory.plan import Plan

COLORS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "rectangle", "triangle"]
QUESTIONS = ["What color is the shape?", "What shape is shown?", "Is the shape large?", "How many shapes?"]


def _stream(seed: int, n: int, answers: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": None
            if rng.random() < 0.1
            else shape_image(COLORS[rng.integers(5)], SHAPES[rng.integers(3)]),
            "question": QUESTIONS[rng.integers(4)],
            "answer": answers[rng.integers(len(answers))],
            "edit_id": 10 + i,
        }
        for i in range(n)
    ]


def _build(edits: list[dict], cfg: MemoryConfig) -> EditMemory:
    m = EditMemory(HashKeyEncoder(), cfg, locality_pool=["Who wrote Hamlet?"])
    if edits:
        m.add_many(edits)
    return m


def _same(a: EditMemory, b: EditMemory) -> None:
    assert sorted(e.id for e in a.list()) == sorted(e.id for e in b.list())
    for e in a.list():
        ka, ta = a.keys_of(e.id)
        kb, tb = b.keys_of(e.id)
        assert np.array_equal(ka, kb) and np.array_equal(ta, tb), e.id
        eb = b.get(e.id)
        assert (e.constrained_by, e.scope, e.uncovered) == (eb.constrained_by, eb.scope, eb.uncovered), e.id
        assert a.snapshot(settle=False).edits[e.id].nbrs == b.snapshot(settle=False).edits[e.id].nbrs, e.id


@pytest.mark.parametrize("settle", ["sync", "manual"])  # manual: five deletes pending, settled at once
@pytest.mark.parametrize(
    ("cap", "answers"),
    [(3, ["alpha", "beta"]), (0, ["alpha"]), (16, ["alpha", "alpha", "beta"])],
    ids=["capped", "uncapped-one-answer", "mixed"],
)
def test_deletes_equal_replay_of_survivors(cap, answers, settle, monkeypatch):
    cfg = MemoryConfig(
        n_text_positives=1, n_image_positives=1, neighbour_k=2, max_neighbours=cap, settle=settle
    )
    edits = _stream(cap + len(answers), 16, answers)
    m = _build(edits, cfg)
    refits = []
    real = Plan.refit
    monkeypatch.setattr(Plan, "refit", lambda self, eid: refits.append(eid) or real(self, eid))
    rng = np.random.default_rng(cap)
    alive = list(edits)
    holders = 0
    for _ in range(5):
        gone = alive.pop(int(rng.integers(len(alive))))
        holders += len(m.holders(gone["edit_id"]))
        m.delete(gone["edit_id"])
    assert holders, "the stream should give deleted edits some holders"
    assert bool(m.pending_refits) == (settle == "manual")
    m.settle()
    assert not m.pending_refits
    deleting = len(refits)
    _same(m, _build(alive, cfg))
    if answers == ["alpha"]:  # one answer, no cap: only the crossed holders are re-fitted
        assert deleting < holders


def test_derived_indexes_stay_equal_to_a_rebuild():
    from esg_memory.memory.state import Derived

    cfg = MemoryConfig(n_text_positives=1, n_image_positives=1, max_neighbours=3)
    edits = _stream(3, 12, ["alpha", "beta"])
    m = _build(edits, cfg)
    m.holders(edits[0]["edit_id"])  # the indexes are built here and tracked through every kind of write
    m.revise(edits[0]["edit_id"], answer="gamma", image=shape_image("purple", "circle"))
    m.delete(edits[1]["edit_id"])
    m.delete(edits[0]["edit_id"])  # its two images go, unless another edit shares them
    m.add(image=shape_image("red", "circle"), question="What color is it?", answer="beta")
    m.rollback(edits[2]["edit_id"], 1)
    m.verify()  # holders, bars and image references as tracked equal a rebuild from the states
    snap = m.snapshot(settle=False)
    fresh = Derived(snap.edits, cfg.max_neighbours)
    assert {e: set(m.holders(e)) for e in snap.edits if m.holders(e)} == fresh.holders
    assert fresh.holders and fresh.bars
    assert set(snap.blobs) == set(fresh.blob_refs) | set(snap.pool.images)
