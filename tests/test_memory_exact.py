"""Exact deletion and order independence: a memory's scopes are a function of its current set of edits."""

from __future__ import annotations

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory.config import MemoryConfig
from esg_memory.memory import EditMemory
from index import ScopedIndex

CFG = {"n_text_positives": 2, "n_image_positives": 1, "n_generic_questions": 3, "neighbour_k": 3}
COLORS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "rectangle", "triangle"]
QUESTIONS = [
    "What color is the shape?",
    "What shape is shown?",
    "How many shapes are there?",
    "What color is the shape in the picture?",
    "Is the shape large?",
]
ANSWERS = ["alpha", "beta", "gamma"]


def stream(seed: int, n: int) -> list[dict]:
    """Random edits on a small palette so many of them are neighbours or outright conflicts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = None if rng.random() < 0.15 else shape_image(COLORS[rng.integers(5)], SHAPES[rng.integers(3)])
        pos = [QUESTIONS[rng.integers(5)]] if rng.random() < 0.3 else None
        out.append(
            {
                "image": img,
                "question": QUESTIONS[rng.integers(5)],
                "answer": ANSWERS[rng.integers(3)],
                "positives": pos,
                "edit_id": 100 + i,
            }
        )
    return out


def probes(seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed + 1)
    ims, txs = [], []
    for _ in range(40):
        ims.append(shape_image(COLORS[rng.integers(5)], SHAPES[rng.integers(3)], shift=int(rng.integers(2))))
        txs.append(QUESTIONS[rng.integers(5)])
    return ims, txs


def build(edits: list[dict], one_by_one: bool = True, settle: str = "background") -> EditMemory:
    m = EditMemory(
        HashKeyEncoder(),
        MemoryConfig(**CFG, settle=settle),
        locality_pool=["Who wrote Hamlet?", (shape_image("black"), "What is this?")],
    )
    if one_by_one:
        for e in edits:
            m.add(**e)
    else:
        m.add_many(edits)
    return m


def assert_same_scopes(a: EditMemory, b: EditMemory, ims, txs) -> None:
    a.settle()
    b.settle()
    assert sorted(x.id for x in a.list()) == sorted(x.id for x in b.list())
    for e in a.list():
        ka, ta = a.keys_of(e.id)
        kb, tb = b.keys_of(e.id)
        assert np.array_equal(ka, kb), f"keys of edit {e.id} differ"
        assert np.array_equal(ta, tb), f"thresholds of edit {e.id} differ: {ta} vs {tb}"
        eb = b.get(e.id)
        assert e.constrained_by == eb.constrained_by
        assert e.scope == eb.scope and e.uncovered == eb.uncovered
    ra, rb = a.route(images=ims, texts=txs), b.route(images=ims, texts=txs)
    for f in ("edit_ids", "scores", "thresholds", "margins", "runner_up", "nearest"):
        assert np.array_equal(getattr(ra, f), getattr(rb, f), equal_nan=True), f


@pytest.mark.parametrize(
    ("seed", "settle"), [(0, "background"), (1, "background"), (0, "sync"), (1, "manual")]
)
def test_delete_routes_exactly_as_if_never_added(seed, settle):
    edits = stream(seed, 22)
    full = build(edits, settle=settle)
    # Delete the edit with the most neighbours: the hardest case for exactness.
    victim = max(full.list(), key=lambda e: (len(e.constrained_by), -e.id))
    assert victim.constrained_by, "the stream should produce neighbours"
    touched = set(victim.constrained_by)
    before = {i: full.keys_of(i)[1].copy() for i in touched}
    full.delete(victim.id)
    never = build([e for e in edits if e["edit_id"] != victim.id])
    ims, txs = probes(seed)
    assert_same_scopes(full, never, ims, txs)
    # and the deletion really changed something for at least one neighbour
    assert any(not np.array_equal(before[i], full.keys_of(i)[1]) for i in touched)


@pytest.mark.parametrize("seed", [0, 1])
def test_unsettled_delete_only_removes_the_edit(seed):
    """Between a delete and its settling: the edit never routes, its holders keep their scopes,
    every input it did not win routes as before; settling then gives the never-added memory."""
    edits = stream(seed, 22)
    full = build(edits, settle="manual")
    victim = max(full.list(), key=lambda e: (len(e.constrained_by), -e.id))
    holders = [e.id for e in full.list() if victim.id in e.constrained_by]
    assert holders
    ims, txs = probes(seed)
    r0 = full.route(images=ims, texts=txs)
    assert (r0.edit_ids == victim.id).any(), "some probe should route to the victim"
    kept = {i: (full.keys_of(i), full.get(i)) for i in holders}
    kept_all = {e.id: full.keys_of(e.id) for e in full.list() if e.id != victim.id}
    full.delete(victim.id)
    assert dict(full.pending_refits) == {victim.id: tuple(sorted(holders))}
    assert victim.id not in full and victim.id not in [e.id for e in full.list()]
    r1 = full.route(images=ims, texts=txs)
    assert not (r1.edit_ids == victim.id).any()
    # every input routes as the pre-delete scopes, less the victim's keys, route it
    ref = ScopedIndex(full.encoder.dim)
    for i in kept_all:
        k, t = kept_all[i]
        ref.add(np.full(len(t), i, dtype=np.int64), k, t)
    res = ref.search(r0.keys, k=full.config.route_k)
    expect = np.where(res.margins[:, 0] >= 0, res.edit_ids[:, 0], -1)
    assert np.array_equal(r1.edit_ids, expect)
    assert np.array_equal(r1.margins, res.margins[:, 0])
    for i, ((k, t), e) in kept.items():
        k1, t1 = full.keys_of(i)
        assert np.array_equal(k, k1) and np.array_equal(t, t1), i
        assert full.get(i) == e, i
    full.settle()
    assert not full.pending_refits
    assert_same_scopes(full, build([e for e in edits if e["edit_id"] != victim.id]), ims, txs)


def test_a_write_settles_pending_deletes_first():
    edits = stream(2, 16)
    m = build(edits, settle="manual")
    victim = max(m.list(), key=lambda e: (len(e.constrained_by), -e.id))
    m.delete(victim.id)
    assert m.pending_refits
    extra = {"image": shape_image("red"), "question": "Is it round?", "answer": "yes", "edit_id": 999}
    m.add(**extra)
    assert not m.pending_refits
    ims, txs = probes(2)
    assert_same_scopes(m, build([*(e for e in edits if e["edit_id"] != victim.id), extra]), ims, txs)


def test_settle_mode_is_validated():
    from esg_memory.errors import ConfigError

    with pytest.raises(ConfigError, match="settle"):
        MemoryConfig(settle="later")


def test_scopes_do_not_depend_on_arrival_order():
    edits = stream(7, 18)
    a = build(edits)
    rng = np.random.default_rng(3)
    shuffled = [edits[i] for i in rng.permutation(len(edits))]
    b = build(shuffled)
    c = build(edits, one_by_one=False)  # one atomic add_many
    ims, txs = probes(7)
    assert_same_scopes(a, b, ims, txs)
    assert_same_scopes(a, c, ims, txs)


def test_revise_and_rollback_are_exact_too():
    edits = stream(4, 14)
    a = build(edits)
    target = max(a.list(), key=lambda e: (len(e.constrained_by), -e.id))
    ims, txs = probes(4)
    reference = build(edits)
    a.revise(target.id, answer="something else entirely", question="Which shade does it have?")
    a.rollback(target.id, 1)
    assert_same_scopes(a, reference, ims, txs)
    # a revision equals adding the revised edit from the start
    b = build(edits)
    b.revise(target.id, answer="omega")
    changed = [dict(e, answer="omega") if e["edit_id"] == target.id else e for e in edits]
    assert_same_scopes(b, build(changed), ims, txs)


def test_interleaved_stream_with_deletes_matches_replay_of_survivors():
    edits = stream(11, 20)
    m = build([])
    rng = np.random.default_rng(5)
    alive = []
    for e in edits:
        m.add(**e)
        alive.append(e)
        if len(alive) > 3 and rng.random() < 0.3:
            gone = alive.pop(int(rng.integers(len(alive))))
            m.delete(gone["edit_id"])
    ims, txs = probes(11)
    assert_same_scopes(m, build(alive), ims, txs)
