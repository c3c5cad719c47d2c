"""User negatives given with an add: inputs the new edit must not hold, stored with its first version
(as feedback negatives are) and honoured by its learned scope, across journal replay and snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image

from esg_memory.config import MemoryConfig
from esg_memory.errors import ImageError, InvalidInputError
from esg_memory.memory import EditMemory
from esg_memory.memory.ops import NewEdit, op_from_dict

FAST = {"n_text_positives": 2, "n_image_positives": 1, "n_generic_questions": 4}
Q = "What color is the circle?"
NEAR = "What color is the circle in this picture?"  # routes to the edit unless it is a negative


def make() -> EditMemory:
    return EditMemory(HashKeyEncoder(), MemoryConfig(**FAST))


def routed(m: EditMemory, image, text) -> int:
    return int(m.route(images=[image], texts=[text]).edit_ids[0])


def test_a_negative_text_is_refused_while_the_edit_and_its_positives_still_route():
    img = shape_image("red")
    plain = make()
    a = plain.add(image=img, question=Q, answer="crimson")
    assert routed(plain, img, NEAR) == a  # the case the negative is there to change

    m = make()
    b = m.add(image=img, question=Q, answer="crimson", positives=["Which colour does the circle have?"],
              negatives=[NEAR])
    assert routed(m, img, NEAR) == -1
    assert routed(m, img, Q) == b
    assert routed(m, img, "Which colour does the circle have?") == b
    fb = m.history(b)[-1].feedback
    assert [(f.kind, f.text, f.image) for f in fb] == [("negative", NEAR, m.get(b).image)]


def test_a_negative_picture_keeps_the_question_and_a_pair_is_taken_as_given():
    img, other = shape_image("red"), shape_image("red", shift=2)
    m = make()
    assert routed(m, img, Q) == -1
    e = m.add(image=img, question=Q, answer="crimson",
              negatives=[(png_bytes(other), None), (None, "Name the colour of the circle")])
    got = [(f.text, f.image) for f in m.history(e)[-1].feedback]
    import hashlib

    assert got == [(Q, hashlib.sha256(png_bytes(other)).hexdigest()), ("Name the colour of the circle", None)]
    assert routed(m, other, Q) == -1 and routed(m, img, Q) == e


def test_negatives_survive_replay_and_snapshots_bit_for_bit(tmp_path):
    img = shape_image("red")
    d = tmp_path / "mem"
    m = EditMemory.open(d, HashKeyEncoder())
    e = m.add(image=img, question=Q, answer="crimson", negatives=[NEAR, (shape_image("red", shift=2), None)])
    keys, thr = m.keys_of(e)
    m.close()
    again = EditMemory.open(d, HashKeyEncoder())  # replays the journal
    k2, t2 = again.keys_of(e)
    assert np.array_equal(k2, keys) and np.array_equal(t2, thr)
    assert again.history(e)[-1].feedback == m.history(e)[-1].feedback and routed(again, img, NEAR) == -1
    again.save(tmp_path / "snap")
    loaded = EditMemory.load(tmp_path / "snap", HashKeyEncoder())
    assert loaded.history(e)[-1].feedback == m.history(e)[-1].feedback
    assert np.array_equal(loaded.keys_of(e)[1], thr)
    again.close()


def test_a_revision_keeps_the_negatives_only_while_the_input_is_the_same():
    img = shape_image("red")
    m = make()
    e = m.add(image=img, question=Q, answer="crimson", negatives=[NEAR])
    m.revise(e, answer="scarlet")
    assert [f.text for f in m.history(e)[-1].feedback] == [NEAR] and routed(m, img, NEAR) == -1
    m.revise(e, question="Which colour is the round shape?")
    assert m.history(e)[-1].feedback == []


def test_the_add_record_carries_negatives_and_old_records_read_unchanged():
    ne = NewEdit(3, Q, "crimson", None, (), {})
    d = ne.to_dict()
    assert "negatives" not in d  # a record without negatives is as it always was
    op = op_from_dict({"op": "add_many", "time": 1.0, "edits": [d]})
    assert op.edits[0].negatives == ()
    neg = {"kind": "negative", "text": NEAR, "image": None, "created_at": 1.0}
    d2 = NewEdit(3, Q, "crimson", None, (), {}, negatives=(neg,)).to_dict()
    assert op_from_dict({"op": "add_many", "time": 1.0, "edits": [d2]}).edits[0].negatives == (neg,)


@pytest.mark.parametrize(
    "negatives, err, says",
    [
        ("not a list", InvalidInputError, "list"),
        ([42], InvalidInputError, r"negatives\[0\]"),
        ([(None, None)], InvalidInputError, "neither image nor text"),
        ([("a", "b", "c")], InvalidInputError, r"negatives\[0\]"),
        ([Q], InvalidInputError, "own input"),
        ([(b"not an image", None)], ImageError, "image"),
        ([""], InvalidInputError, r"negatives\[0\]"),
    ],
)
def test_bad_negatives_are_typed_errors_and_change_nothing(negatives, err, says):
    m = make()
    m.add(image=shape_image("blue"), question="How many?", answer="two")
    before = (len(m), m.snapshot(settle=False).next_id)
    with pytest.raises(err, match=says):
        m.add(image=shape_image("red"), question=Q, answer="crimson", negatives=negatives)
    assert (len(m), m.snapshot(settle=False).next_id) == before


def test_the_model_wrapper_passes_negatives_through():
    """`EditedModel.add_edit(..., negatives=)`: the negative is stored and refused by routing, and it
    gets the base model's answer bit for bit while the edit's own input gets the edit's."""
    import torch
    from _model_fixtures import bare_answers, one_thread, tiny
    from _model_fixtures import shape_image as model_image

    from esg_memory.model import EditedModel

    threads = one_thread()
    next(threads)
    try:
        model, proc = tiny("llava")
        em = EditedModel.wrap(model, proc, EditMemory(HashKeyEncoder(32), MemoryConfig(**FAST)))
        img = model_image((220, 30, 30))
        eid = em.add_edit(img, Q, "purple", tune="never", negatives=[NEAR])
        assert [f.text for f in em.memory.history(eid)[-1].feedback] == [NEAR]
        got = [r.edit_id for r in em.retrieve(images=[img, img], prompts=[Q, NEAR])]
        assert got == [eid, None] or got == [eid, -1]
        with torch.no_grad():
            out = em.answer(images=[img], prompts=[NEAR], max_new_tokens=4)
        assert out == bare_answers(model, proc, [img], [NEAR], max_new_tokens=4)
        with pytest.raises(InvalidInputError):
            em.add_edit(img, Q, "green", tune="never", negatives="not a list")
        assert len(em.memory) == 1
    finally:
        threads.close()
