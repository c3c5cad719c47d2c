"""One behavioural contract for both stores a memory can be opened on: a directory and PostgreSQL.

Every test runs twice, on ``EditMemory.open(tmp_path / "m")`` and on ``EditMemory.open(pg_url)``:
each kind of write survives close + reopen bit for bit (edits, versions, attachments, keys,
thresholds, routing), a refused write changes nothing (live, on reopen, and in the store's log), and
a delete leaves the memory routing exactly as if the edit had never been added, in both settle modes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from _memory_fixtures import shape_image
from _replica_fixtures import ENC, edit_spec, keys_state, routing, saved_state

from esg_memory.errors import EsgMemoryError, ImageError, InvalidInputError, UnknownEditError
from esg_memory.memory import EditMemory


class Opener:
    """Opens (and at teardown closes) memories on one place: a directory or a PostgreSQL database."""

    def __init__(self, kind: str, where: str | Path) -> None:
        self.kind, self.where = kind, where
        self.opened: list[EditMemory] = []

    def __call__(self) -> EditMemory:
        mem = EditMemory.open(self.where, ENC)
        self.opened.append(mem)
        return mem

    def log_head(self) -> int:
        """How many records the store's log (or the directory's journal) holds: refused writes add none."""
        if self.kind == "postgresql":
            from esg_memory.replicas import Store

            s = Store(str(self.where))
            try:
                return s.head()
            finally:
                s.close()
        from esg_memory.persist.journal import read_journal

        return len(read_journal(Path(self.where) / "journal", 0)[0])


@pytest.fixture(params=["directory", "postgresql"])
def opener(request, tmp_path):
    where = tmp_path / "m" if request.param == "directory" else request.getfixturevalue("pg_url")
    op = Opener(request.param, where)
    yield op
    for mem in op.opened:
        with contextlib.suppress(EsgMemoryError):
            mem.close()


def fingerprint(mem: EditMemory, tmp: Path) -> tuple:
    histories = {e.id: [v.to_dict() for v in mem.history(e.id)] for e in mem.list()}
    return saved_state(mem, tmp), routing(mem), histories, [e for e in mem.list()]


def every_write(mem: EditMemory) -> list[int]:
    """add_many (with attachments), add, revise, attach, rollback, revise of the image, feedback, delete."""
    ids = mem.add_many([edit_spec(k) for k in range(5)],
                       attachments=lambda eid, q, a: {"adapter": f"adapter of {eid}".encode()})
    ids.append(mem.add(**edit_spec(5)))
    assert mem.revise(ids[0], answer="changed") == 2
    mem.attach(ids[0], "adapter", b"\x00adapter v2")
    assert mem.rollback(ids[0], 1) == 3
    mem.revise(ids[1], question="what is drawn here?", image=shape_image("blue", "triangle"))
    mem.feedback(shape_image("red", "circle"), "what colour is the circle now?", ids[0])
    mem.feedback(None, "who wrote book 3 really?", None)
    mem.delete(ids[2])
    mem.settle()
    return ids


def test_every_write_survives_close_and_reopen_bit_for_bit(opener, tmp_path):
    mem = opener()
    ids = every_write(mem)
    assert ids[2] not in mem and len(mem) == 5
    assert mem.attachment(ids[0], "adapter", version=1) == b"adapter of 0"
    assert mem.attachment(ids[0], "adapter", version=2) == b"\x00adapter v2"
    assert mem.attachment(ids[0], "adapter") == b"adapter of 0"  # the rollback copied version 1's
    assert [v.version for v in mem.history(ids[0])] == [1, 2, 3]
    before = fingerprint(mem, tmp_path)
    mem.close()
    again = opener()
    assert fingerprint(again, tmp_path) == before
    # the reopened memory keeps the id counter (the deleted id is not reused) and keeps writing
    assert again.add(None, "one more question?", "yes") == 6
    after = fingerprint(again, tmp_path)
    again.close()
    assert fingerprint(opener(), tmp_path) == after


def _bad_writes(mem: EditMemory, ids: list[int]) -> list:
    return [
        (InvalidInputError, lambda: mem.add(answer="no image, no question")),
        (InvalidInputError, lambda: mem.add_many([edit_spec(7), {"question": 5, "answer": "a"}])),
        (ImageError, lambda: mem.add(image=b"not an image", question="what is it?", answer="x")),
        (EsgMemoryError, lambda: mem.add(edit_id=ids[0], question="taken id?", answer="x")),
        (UnknownEditError, lambda: mem.revise(999, answer="x")),
        (EsgMemoryError, lambda: mem.rollback(ids[0], 7)),
        (InvalidInputError, lambda: mem.attach(ids[0], "", b"bytes")),
        (InvalidInputError, lambda: mem.feedback(None, None, None)),
        (UnknownEditError, lambda: mem.feedback(None, "who wrote book 3?", 999)),
        (UnknownEditError, lambda: mem.delete(999)),
        (InvalidInputError, lambda: mem.add_many([edit_spec(8)], attachments=lambda *a: {"": b"x"})),
    ]


def test_a_refused_write_changes_nothing(opener, tmp_path):
    mem = opener()
    ids = mem.add_many([edit_spec(k) for k in range(4)])
    mem.attach(ids[1], "adapter", b"kept")
    before, head = fingerprint(mem, tmp_path), opener.log_head()
    for i, (error, write) in enumerate(_bad_writes(mem, ids)):
        with pytest.raises(error):
            write()
        assert opener.log_head() == head, f"refused write {i} reached the log"
    assert fingerprint(mem, tmp_path) == before
    mem.close()
    assert fingerprint(opener(), tmp_path) == before


@pytest.mark.parametrize("settle", ["sync", "manual"])
def test_delete_routes_as_if_never_added(opener, tmp_path, settle):
    specs = [edit_spec(k) for k in (0, 2, 4, 6, 1, 3)]  # four on one question: they constrain each other
    mem = opener()
    mem.set_settle(settle)
    ids = mem.add_many(specs)
    victim = max(ids, key=lambda i: (len(mem.holders(i)), -i))
    holders = mem.holders(victim)
    assert holders, "the test needs a victim whose neighbours it constrains"
    mem.delete(victim)
    assert victim not in mem
    if settle == "manual":
        assert dict(mem.pending_refits) == {victim: holders}  # deferred: holders keep their scopes for now
        mem.settle()
    assert not mem.pending_refits
    never = EditMemory(ENC)
    for eid, spec in zip(ids, specs, strict=True):
        if eid != victim:
            never.add(**spec, edit_id=eid)
    expected = (keys_state(never), routing(never))
    assert (keys_state(mem), routing(mem)) == expected
    mem.close()
    again = opener()
    assert (keys_state(again), routing(again)) == expected
    assert again.add(None, "a new edit?", "new") == max(ids) + 1  # the deleted id stays retired


def test_a_write_after_close_is_refused(opener):
    mem = opener()
    mem.add(**edit_spec(0))
    mem.close()
    with pytest.raises(EsgMemoryError):
        mem.add(**edit_spec(1))
    again: Any = opener()
    assert len(again) == 1
