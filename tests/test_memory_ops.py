"""The vocabulary of writes (`esg_memory.memory.ops`): ops round-trip through the journal's JSON, bad ones are
refused, and the bookkeeping an op implies composes in order."""

from __future__ import annotations

import json

import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory.config import MemoryConfig
from esg_memory.errors import FormatError
from esg_memory.memory import EditMemory
from esg_memory.memory.ops import (
    AddEdits,
    Attach,
    CopyAttachments,
    Delete,
    DropAttachments,
    Effects,
    Feedback,
    NewEdit,
    NewVersion,
    SetAttachment,
    Settle,
    effects_of,
    op_from_dict,
)

OPS = [
    AddEdits(
        time=1.5, edits=(NewEdit(3, "q?", "a", "ab" * 32, ({"text": "p", "image": None},), {"k": [1]}),)
    ),
    NewVersion(edit_id=3, version={"version": 2, "question": "q?", "answer": "b"}, attachments_from=1),
    NewVersion(edit_id=3, version={"version": 3}),
    Delete(edit_id=3),
    Delete(edit_id=4, deferred=True, answer="x"),
    Settle(deleted=(4, 7)),
    Feedback(time=2.0, image=None, text="hello?", expected_edit_id=None),
    Attach(edit_id=3, kind="adapter", version=2, sha256="cd" * 32),
]


@pytest.mark.parametrize("op", OPS, ids=lambda o: type(o).__name__)
def test_ops_round_trip_through_json(op):
    back = op_from_dict(json.loads(json.dumps(op.to_dict())))
    assert back == op and back.to_dict() == op.to_dict()


def test_the_dicts_are_journal_format_1():
    # the exact keys journal version 1 records (readers of old journals depend on them)
    assert Delete(3).to_dict() == {"op": "delete", "edit_id": 3}
    assert Delete(3, deferred=True, answer="x").to_dict() == {
        "op": "delete",
        "edit_id": 3,
        "deferred": True,
        "answer": "x",
    }
    assert Settle((1, 2)).to_dict() == {"op": "settle", "deleted": [1, 2]}
    assert set(OPS[0].to_dict()) == {"op", "time", "edits"}
    assert set(OPS[0].to_dict()["edits"][0]) == {
        "edit_id",
        "question",
        "answer",
        "image",
        "positives",
        "metadata",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"op": "rename"},
        {"op": "delete"},
        {"op": "delete", "edit_id": "3"},
        {"op": "delete", "edit_id": True},
        {"op": "settle", "deleted": "1"},
        {"op": "new_version", "edit_id": 1, "version": []},
        [],
        "delete",
        {"op": "attach", "edit_id": 1, "version": 1},
        {"op": "add_many", "edits": {}},
    ],
)
def test_malformed_ops_are_refused(bad):
    with pytest.raises(FormatError):
        op_from_dict(bad)


def test_effects_of_each_op():
    assert effects_of(OPS[0]).next_id == 4
    assert effects_of(OPS[1]).attachments == (CopyAttachments(3, 1, 2),)
    assert effects_of(OPS[2]) == Effects()
    fx = effects_of(OPS[4])
    assert fx.retired == {4} and fx.attachments == (DropAttachments(4),) and dict(fx.pending) == {4: "x"}
    assert effects_of(OPS[5]).settled == {4, 7}
    assert effects_of(OPS[7], b"data").attachments == (SetAttachment(3, 2, "adapter", b"data"),)
    with pytest.raises(FormatError):
        effects_of(OPS[7])  # an attach without its bytes


def test_effects_compose_in_order():
    fx = effects_of(Delete(4, deferred=True, answer="x")).then(effects_of(Settle((4,))))
    assert dict(fx.pending) == {} and fx.settled == {4} and fx.retired == {4}
    fx = effects_of(OPS[0]).then(effects_of(AddEdits(0.0, (NewEdit(9, "q", "a", None, (), {}),))))
    assert fx.next_id == 10
    a, b = effects_of(OPS[7], b"1"), effects_of(Attach(3, "adapter", 2, "ef" * 32), b"2")
    assert a.then(b).attachments[-1].data == b"2"  # the later attach of the same version wins


def test_a_live_write_and_its_change_agree():
    # the commit hook sees exactly the op dict the journal would record
    seen = []
    m = EditMemory(HashKeyEncoder(), MemoryConfig(n_text_positives=1, n_image_positives=1, settle="manual"))
    m.set_commit_hook(lambda op, blobs: seen.append(op_from_dict(op)))
    a = m.add(image=shape_image("red"), question="What color is it?", answer="red")
    m.add(image=shape_image("blue"), question="What color is it?", answer="blue")
    m.revise(a, answer="crimson")
    m.rollback(a, 1)
    m.delete(a)
    m.settle()
    assert [type(o).__name__ for o in seen] == [
        "AddEdits",
        "AddEdits",
        "NewVersion",
        "NewVersion",
        "Delete",
        "Settle",
    ]
    assert seen[3].attachments_from == 1 and seen[4].deferred and seen[5].deleted == (a,)
    m.verify()
