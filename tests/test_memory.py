"""EditMemory: adding, routing, neighbour-only re-fits, versions, feedback, conflicts, typed errors."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image

from esg_memory.config import MemoryConfig
from esg_memory.errors import (
    ConfigError,
    DuplicateEditError,
    EsgMemoryError,
    ImageError,
    InvalidInputError,
    UnknownEditError,
    VersionError,
)
from esg_memory.memory import EditMemory
from esg_memory.types import Positive

FAST = {"n_text_positives": 2, "n_image_positives": 1, "n_generic_questions": 4}


def make(**kw) -> EditMemory:
    pool = kw.pop("pool", None)
    return EditMemory(HashKeyEncoder(), MemoryConfig(**{**FAST, **kw}), locality_pool=pool)


def fingerprint(mem: EditMemory):
    out = {}
    for e in mem.list():
        k, t = mem.keys_of(e.id)
        out[e.id] = (
            e.version,
            e.answer,
            e.question,
            e.image,
            tuple(e.constrained_by),
            k.tobytes(),
            t.tobytes(),
            len(mem.history(e.id)),
            tuple(e.metadata.items()),
        )
    snap = mem.snapshot(settle=False)
    return (
        out,
        sorted(snap.blobs),
        snap.next_id,
        sorted(snap.retired),
        sorted(snap.attachments),
        len(snap.index),
    )


@pytest.fixture
def mem() -> EditMemory:
    m = make()
    m.add(
        image=shape_image("red"),
        question="What color is the circle?",
        answer="crimson",
        positives=["Which colour does the circle have?"],
    )
    m.add(image=shape_image("blue", "rectangle"), question="What shape is shown?", answer="a box")
    m.add(question="Who wrote the play Hamlet?", answer="Marlowe", metadata={"source": "test"})
    return m


def test_add_get_list_and_ids(mem):
    assert len(mem) == 3 and 0 in mem and 2 in mem and 3 not in mem and "0" not in mem and True not in mem
    e = mem.get(0)
    assert (e.id, e.version, e.answer, e.question) == (0, 1, "crimson", "What color is the circle?")
    assert isinstance(e.image, str) and len(e.image) == 64
    assert e.positives == [Positive(text="Which colour does the circle have?")]
    assert mem.get(2).image is None and mem.get(2).metadata == {"source": "test"}
    assert [x.id for x in mem.list()] == [0, 1, 2]
    assert mem.open_image(e.image).size == (32, 32)
    assert e.scope[0].origin == "anchor" and e.scope[0].reason
    assert mem.add(question="Q?", answer="A", edit_id=10) == 10
    assert mem.add(question="Another question entirely?", answer="B") == 11  # never below a used id
    assert mem.get(0).to_dict()["id"] == 0


def test_route_basics_and_explain(mem):
    r = mem.route(
        images=[shape_image("red", shift=1), None, shape_image("green")],
        texts=["What is the color of the circle?", "Who wrote Hamlet, the play?", "Is it raining?"],
    )
    assert r.edit_ids.tolist() == [0, 2, -1]
    assert r.versions.tolist() == [1, 1, -1]
    assert r.edit_ids.dtype == np.int64 and r.scores.dtype == np.float32 and r.keys.shape == (3, 64)
    assert r.margins[0] >= 0 and r.margins[2] < 0
    assert "routed to edit 0" in r.explain(0) and "no edit in scope" in r.explain(2)
    with pytest.raises(IndexError):
        r.explain(3)
    again = mem.route(keys=r.keys)
    assert np.array_equal(again.edit_ids, r.edit_ids) and np.array_equal(again.scores, r.scores)


def test_batch_routing_equals_row_by_row(mem):
    rng = np.random.default_rng(0)
    colors = ["red", "blue", "green", "yellow"]
    texts = [
        "What color is the circle?",
        "What shape is shown?",
        "Who wrote the play Hamlet?",
        "Is it sunny?",
        None,
        "What is the colour of this circle?",
    ]
    ims, txs = [], []
    for _ in range(24):
        im = (
            None
            if rng.random() < 0.3
            else shape_image(colors[rng.integers(4)], "circle", shift=int(rng.integers(3)))
        )
        t = texts[rng.integers(len(texts))]
        if im is None and t is None:
            t = "What shape is shown?"
        ims.append(im)
        txs.append(t)
    batch = mem.route(images=ims, texts=txs)
    for i in range(len(txs)):
        one = mem.route(images=[ims[i]], texts=[txs[i]])
        for f in ("edit_ids", "versions", "scores", "thresholds", "margins", "runner_up", "nearest"):
            assert np.array_equal(getattr(one, f)[0], getattr(batch, f)[i], equal_nan=True), (f, i)


def test_add_and_delete_are_visible_to_the_next_route():
    m = make()
    q = "What animal is on the sign?"
    assert m.route(images=[shape_image("yellow")], texts=[q]).edit_ids[0] == -1
    eid = m.add(image=shape_image("yellow"), question=q, answer="a lynx")
    assert m.route(images=[shape_image("yellow")], texts=[q]).edit_ids[0] == eid
    m.delete(eid)
    assert m.route(images=[shape_image("yellow")], texts=[q]).edit_ids[0] == -1
    assert len(m) == 0
    with pytest.raises(DuplicateEditError):
        m.add(question=q, answer="x", edit_id=eid)  # ids are never reused
    assert m.add(question=q, answer="x") == eid + 1


def test_new_edit_refits_only_its_neighbours(caplog):
    m = make()
    far = m.add(question="Who composed the Moonlight Sonata?", answer="Mozart")
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    far_thr = m.keys_of(far)[1].copy()
    a_thr = m.keys_of(a)[1].copy()
    caplog.set_level(logging.INFO, logger="esg_memory.memory")
    caplog.clear()
    b = m.add(image=shape_image("blue"), question="What color is the circle?", answer="navy")
    refits = [r.getMessage() for r in caplog.records if "re-fitted" in r.getMessage()]
    assert refits and str(far) not in refits[0].split("re-fitted")[-1]
    assert np.array_equal(m.keys_of(far)[1], far_thr)  # untouched edit keeps its thresholds
    assert not np.array_equal(m.keys_of(a)[1], a_thr)  # the colliding neighbour was tightened
    assert (
        m.get(a).constrained_by == [b] and m.get(b).constrained_by == [a] and m.get(far).constrained_by == []
    )
    assert any(f"edit {b}" in (s.hardest_negative_source or "") for s in m.get(a).scope)
    assert m.route(images=[shape_image("blue")], texts=["What color is the circle?"]).edit_ids[0] == b
    assert m.route(images=[shape_image("red")], texts=["What color is the circle?"]).edit_ids[0] == a


def test_revise_history_rollback_and_attachments(mem):
    mem.attach(0, "adapter", b"v1-bytes")
    assert mem.revise(0, answer="scarlet") == 2
    assert mem.get(0).answer == "scarlet" and mem.get(0).version == 2
    assert mem.attachment(0, "adapter") is None and mem.attachment(0, "adapter", version=1) == b"v1-bytes"
    r = mem.route(images=[shape_image("red")], texts=["What color is the circle?"])
    assert (r.edit_ids[0], r.versions[0]) == (0, 2)
    assert mem.revise(0, question="Which color does the round shape have?") == 3
    hist = mem.history(0)
    assert [h.version for h in hist] == [1, 2, 3]
    assert [h.answer for h in hist] == ["crimson", "scarlet", "scarlet"]
    assert all(h.scope for h in hist) and hist[0].reason == "add" and hist[1].reason == "revise"
    assert mem.rollback(0, 1) == 4
    cur = mem.get(0)
    assert (cur.answer, cur.question, cur.version) == ("crimson", "What color is the circle?", 4)
    assert mem.history(0)[-1].reason == "rollback to v1" and len(mem.history(0)) == 4
    assert mem.attachment(0, "adapter") == b"v1-bytes"  # the restored version's artefacts come back
    assert np.array_equal(mem.keys_of(0)[1], mem.keys_of(0)[1])
    hist[0].answer = "mutated"  # history returns copies
    assert mem.history(0)[0].answer == "crimson"
    with pytest.raises(VersionError):
        mem.rollback(0, 9)
    with pytest.raises(VersionError):
        mem.rollback(0, 0)
    with pytest.raises(VersionError):
        mem.attach(0, "adapter", b"x", version=7)
    with pytest.raises(InvalidInputError):
        mem.revise(0)


def test_rollback_restores_the_old_scope():
    m = make()
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    m.add(question="Who wrote Hamlet?", answer="Marlowe")
    keys1, thr1 = m.keys_of(a)
    m.revise(a, image=shape_image("green", "triangle"), question="What is drawn here?")
    assert not np.array_equal(m.keys_of(a)[0][0], keys1[0])
    m.rollback(a, 1)
    k, t = m.keys_of(a)
    assert np.array_equal(k, keys1) and np.array_equal(t, thr1)


def test_feedback_false_activation_tightens(mem):
    probe_img, probe_q = shape_image("red", shift=2), "What color is the circle in this picture?"
    assert mem.route(images=[probe_img], texts=[probe_q]).edit_ids[0] == 0
    out = mem.feedback(probe_img, probe_q, None)
    assert out.routed_before == 0 and out.routed_after == -1 and out.resolved
    assert 0 in out.refit and any("false activation" in a for a in out.actions)
    assert mem.route(images=[probe_img], texts=[probe_q]).edit_ids[0] == -1
    assert mem.route(images=[shape_image("red")], texts=["What color is the circle?"]).edit_ids[0] == 0
    assert mem.history(0)[-1].feedback[0].kind == "negative"


def test_feedback_miss_adds_a_key_when_safe(mem):
    q = "Tell me the hue of that round thing"
    img = shape_image("red")
    assert mem.route(images=[img], texts=[q]).edit_ids[0] == -1
    n_keys = len(mem.keys_of(0)[1])
    out = mem.feedback(img, q, 0)
    assert out.resolved and out.routed_after == 0 and any("missed" in a for a in out.actions)
    assert mem.route(images=[img], texts=[q]).edit_ids[0] == 0
    assert len(mem.keys_of(0)[1]) == n_keys + 1
    assert mem.get(0).scope[-1].origin.startswith("feedback")
    again = mem.feedback(img, q, 0)
    assert again.resolved and again.actions == ["already routed as expected"]


def test_feedback_miss_is_refused_when_unsafe():
    m = make()
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    b = m.add(image=shape_image("blue"), question="How many circles are there?", answer="seven")
    # Asking for b's own input to go to a cannot be done safely: it is b's anchor (another answer).
    out = m.feedback(shape_image("blue"), "How many circles are there?", a)
    assert not out.resolved and out.routed_after == b
    assert any("within the margin" in u.reason for u in m.get(a).uncovered)
    with pytest.raises(UnknownEditError):
        m.feedback(None, "x?", 99)
    with pytest.raises(InvalidInputError):
        m.feedback(None, None, None)


def test_conflicts_lists_overlaps_with_probes():
    m = make()
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    assert m.conflicts() == []
    b = m.add(image=shape_image("red"), question="What color is the circle?", answer="scarlet")
    c = m.conflicts()
    assert len(c) == 1 and (c[0].edit_a, c[0].edit_b) == (a, b)
    assert {p.owner for p in c[0].probes} == {a, b}
    assert all(p.score_a >= p.threshold_a and p.score_b >= p.threshold_b for p in c[0].probes)
    assert "unseparable" in m.get(a).scope[0].reason
    assert c[0].to_dict()["answer_b"] == "scarlet"
    m.delete(b)
    assert m.conflicts() == []


def test_same_answer_edits_may_overlap_unless_configured():
    for separate in (False, True):
        m = make(separate_same_answer=separate)
        a = m.add(question="How many wheels does a tricycle have?", answer="3")
        m.add(question="How many wheels does a trike have?", answer="3")
        neg = m.get(a).scope[0].hardest_negative_source or ""
        assert ("edit 1" in neg) == separate


def _assert_raises_unchanged(m, exc, fn, *args, **kwargs):
    before = fingerprint(m)
    with pytest.raises(exc):
        fn(*args, **kwargs)
    assert fingerprint(m) == before


def test_typed_errors_leave_memory_unchanged(mem, tmp_path):
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"not an image")
    cases = [
        (InvalidInputError, mem.add, dict(question="", answer="a")),
        (InvalidInputError, mem.add, dict(question="   ", answer="a")),
        (InvalidInputError, mem.add, dict(question="q?", answer=None)),
        (InvalidInputError, mem.add, dict(question=3, answer="a")),
        (InvalidInputError, mem.add, dict(question="x" * 10000, answer="a")),
        (ImageError, mem.add, dict(image=str(tmp_path / "missing.png"), question="q?", answer="a")),
        (ImageError, mem.add, dict(image=str(bad_png), question="q?", answer="a")),
        (ImageError, mem.add, dict(image=b"\x89PNG garbage", question="q?", answer="a")),
        (ImageError, mem.add, dict(image=12, question="q?", answer="a")),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", metadata={"x": object()})),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", metadata=[1])),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", positives="just a string")),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", positives=[""])),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", positives=[(None, None)])),
        (ImageError, mem.add, dict(question="q?", answer="a", positives=[(b"junk", "t")])),
        (DuplicateEditError, mem.add, dict(question="q?", answer="a", edit_id=1)),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", edit_id=-5)),
        (InvalidInputError, mem.add, dict(question="q?", answer="a", edit_id="7")),
        (UnknownEditError, mem.delete, dict(edit_id=42)),
        (InvalidInputError, mem.delete, dict(edit_id="0")),
        (UnknownEditError, mem.revise, dict(edit_id=42, answer="x")),
        (InvalidInputError, mem.revise, dict(edit_id=0, answer="")),
        (ImageError, mem.revise, dict(edit_id=0, image=b"nope")),
        (VersionError, mem.rollback, dict(edit_id=0, version=5)),
        (VersionError, mem.rollback, dict(edit_id=0, version="1")),
        (UnknownEditError, mem.rollback, dict(edit_id=9, version=1)),
        (InvalidInputError, mem.attach, dict(edit_id=0, kind="bad/kind", data=b"x")),
        (InvalidInputError, mem.attach, dict(edit_id=0, kind="ok", data="text")),
        (UnknownEditError, mem.attach, dict(edit_id=9, kind="ok", data=b"x")),
        (InvalidInputError, mem.add_many, dict(edits=[{"question": "q?", "answer": "a", "colour": 1}])),
        (
            InvalidInputError,
            mem.add_many,
            dict(edits=[{"question": "fine?", "answer": "a"}, {"question": ""}]),
        ),
        (InvalidInputError, mem.add_many, dict(edits="nope")),
    ]
    for exc, fn, kw in cases:
        _assert_raises_unchanged(mem, exc, fn, **kw)
    with pytest.raises(UnknownEditError):
        mem.get(42)
    with pytest.raises(UnknownEditError):
        mem.history(42)
    with pytest.raises(ImageError):
        mem.open_image("0" * 64)
    for kw in [
        dict(),
        dict(texts=["a", "b"], images=[None]),
        dict(texts=[None], images=[None]),
        dict(keys=np.zeros((1, 64))),
        dict(keys=np.full((1, 64), np.nan)),
        dict(keys=np.ones((2, 5))),
        dict(keys=np.ones((1, 64)), texts=["x"]),
        dict(texts=[""]),
    ]:
        with pytest.raises(InvalidInputError):
            mem.route(**kw)
    with pytest.raises(ImageError):
        mem.route(images=[3.5], texts=["q"])
    assert isinstance(UnknownEditError("x"), KeyError) and issubclass(InvalidInputError, EsgMemoryError)


class _FailingEncoder(HashKeyEncoder):
    def __init__(self):
        super().__init__()
        self.fail = False

    def encode(self, images, texts):
        if self.fail:
            raise InvalidInputError("encoder refused")
        return super().encode(images, texts)


def test_failure_midway_leaves_memory_as_it_was(monkeypatch):
    enc = _FailingEncoder()
    m = EditMemory(enc, MemoryConfig(**FAST))
    m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    before = fingerprint(m)
    enc.fail = True
    with pytest.raises(InvalidInputError):
        m.add(image=shape_image("blue"), question="What color is the circle?", answer="navy")
    with pytest.raises(InvalidInputError):
        m.revise(0, answer="scarlet")
    assert fingerprint(m) == before
    enc.fail = False

    # An index failure at commit time is translated, and the index is restored.
    def boom(*a, **k):
        from index.errors import InvalidVectorError

        raise InvalidVectorError("simulated")

    live_index = m.snapshot(settle=False).index  # a snapshot shares the live index (read-only by contract)
    monkeypatch.setattr(live_index, "add", boom)
    with pytest.raises(InvalidInputError, match="simulated"):
        m.add(image=shape_image("blue"), question="What color is the circle?", answer="navy")
    monkeypatch.undo()
    assert fingerprint(m)[0] == before[0] and len(m.snapshot(settle=False).index) == 1
    assert m.route(images=[shape_image("red")], texts=["What color is the circle?"]).edit_ids[0] == 0


def test_constructor_validation():
    with pytest.raises(ConfigError):
        EditMemory(object())
    with pytest.raises(ConfigError):
        EditMemory(HashKeyEncoder(), config={"margin": 0.1})
    with pytest.raises(InvalidInputError):
        EditMemory(HashKeyEncoder(), locality_pool=np.ones((3, 7)))
    with pytest.raises(InvalidInputError):
        EditMemory(HashKeyEncoder(), locality_pool=[42])
    m = EditMemory(
        HashKeyEncoder(), locality_pool=["Who wrote Hamlet?", (shape_image("green"), "What is this?")]
    )
    pool = m.snapshot(settle=False).pool
    assert pool.keys.shape == (2, 64) and len(pool.images) == 1


def test_pool_images_give_same_question_other_image_negatives():
    pool = [(shape_image(c), "Is this a photo?") for c in ("blue", "green", "yellow")]
    m = make(pool=pool)
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    labels = [s.hardest_negative_source for s in m.get(a).scope]
    assert any("locality image" in (x or "") or "generic" in (x or "") for x in labels)
    assert m.route(images=[shape_image("blue")], texts=["What color is the circle?"]).edit_ids[0] == -1


def test_images_are_stored_once_and_collected_after_delete():
    m = make()
    img = png_bytes(shape_image("red"))
    a = m.add(image=img, question="What color is the circle?", answer="crimson")
    b = m.add(image=img, question="How big is the circle?", answer="huge")
    assert m.get(a).image == m.get(b).image and len(m.snapshot(settle=False).blobs) == 1
    m.delete(a)
    assert len(m.snapshot(settle=False).blobs) == 1
    m.delete(b)
    assert m.snapshot(settle=False).blobs == {}


def test_concurrent_routes_during_writes():
    m = make()
    q = "What color is the circle?"
    colors = ["red", "blue", "green", "yellow", "black", "purple"]
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                r = m.route(images=[shape_image(c) for c in colors], texts=[q] * len(colors))
                seen.update(int(x) for x in r.edit_ids if x >= 0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    ids = []
    for c in colors:
        ids.append(m.add(image=shape_image(c), question=q, answer=f"{c}!"))
    for eid in ids[::2]:
        m.delete(eid)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen <= set(ids)
    r = m.route(images=[shape_image(c) for c in colors], texts=[q] * len(colors))
    assert set(r.edit_ids.tolist()) - {-1} <= set(ids[1::2])


def test_empty_memory_routes_nowhere():
    m = make()
    r = m.route(texts=["anything?"])
    assert r.edit_ids.tolist() == [-1] and r.nearest.tolist() == [-1] and np.isnan(r.scores[0])
    assert "memory empty" in r.explain(0)
    assert m.conflicts() == [] and m.list() == []


def test_commit_hook_sees_every_write_and_can_veto_it():
    m = make()
    ops = []
    m.set_commit_hook(lambda op, blobs: ops.append((op["op"], sorted(blobs))))
    a = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    m.revise(a, answer="scarlet")
    m.rollback(a, 1)
    m.attach(a, "adapter", b"x")
    m.feedback(None, "Totally unrelated question about trains?", a)
    m.delete(a)
    assert [o for o, _ in ops] == ["add_many", "new_version", "new_version", "attach", "feedback", "delete"]
    assert len(ops[0][1]) == 1  # the new image's bytes travel with the record
    import json as _json

    def veto(op, blobs):
        _json.dumps(op)  # records are JSON-serialisable
        raise OSError("disk full")

    m.set_commit_hook(veto)
    before = fingerprint(m)
    with pytest.raises(OSError):
        m.add(question="Will this be kept?", answer="no")
    assert fingerprint(m) == before
    with pytest.raises(InvalidInputError):
        m.set_commit_hook("not callable")


def test_far_positive_becomes_an_extra_key_with_its_own_threshold():
    m = make()
    m.add(image=shape_image("red"), question="How big is the circle?", answer="tiny")  # a neighbour
    a = m.add(
        image=shape_image("red"),
        question="What color is the circle?",
        answer="crimson",
        positives=[(shape_image("red", "rectangle"), "Which colour has this box?")],
    )
    scope = m.get(a).scope
    origins = [s.origin for s in scope]
    assert origins[0] == "anchor" and "user 0" in origins
    k = origins.index("user 0")
    assert scope[k].threshold != scope[0].threshold and scope[k].reason
    r = m.route(images=[shape_image("red", "rectangle")], texts=["Which colour has this box?"])
    assert r.edit_ids[0] == a and r.origins[0] == "user 0"
    # the anchor's own ball did not widen to reach it: it still excludes the neighbour's question
    assert m.route(images=[shape_image("red")], texts=["How big is the circle?"]).edit_ids[0] != a
