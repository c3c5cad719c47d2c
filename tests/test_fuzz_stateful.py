"""Random interleavings of valid and invalid writes against a plain-dict model of an EditMemory.

Invalid calls must raise a typed error and change nothing; valid ones must do exactly what the model
says (ids never reused, versions append-only, rollback copies an old answer); a save/load round trip
at any point gives the same memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.strategies as st
from _fuzz_fixtures import CFG, memory_state
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from esg_memory.errors import EsgMemoryError
from esg_memory.memory import EditMemory

WORDS = ["lamp", "fence", "river", "tower", "anchor", "cloud", "stone"]
ANSWERS = ["glass", "copper", "north", "winter", "seven"]
IMAGES = [png_bytes(shape_image(c)) for c in ("red", "blue", "green")]
BAD = st.sampled_from(["", "  ", "a\x00b", "x\ud800", None, 5, b"bytes", "q" * 9000])


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = EditMemory(HashKeyEncoder(32), CFG, locality_pool=["who wrote hamlet?"])
        self.model: dict[int, list[str]] = {}  # id -> answers of versions 1..n
        self.retired: set[int] = set()
        self.next_id = 0

    def _refused(self, call) -> None:
        before = memory_state(self.mem)
        try:
            call()
        except EsgMemoryError:
            pass
        else:
            raise AssertionError("an invalid call was accepted")
        assert memory_state(self.mem) == before, "a refused call changed the memory"

    @rule(word=st.sampled_from(WORDS), ans=st.sampled_from(ANSWERS), img=st.sampled_from([None, 0, 1, 2]))
    def add(self, word, ans, img):
        eid = self.mem.add(None if img is None else IMAGES[img], f"what is the {word} made of?", ans)
        assert eid == self.next_id and eid not in self.retired
        self.model[eid] = [ans]
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data(), ans=st.sampled_from(ANSWERS))
    def revise(self, data, ans):
        eid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.mem.revise(eid, answer=ans) == len(self.model[eid]) + 1
        self.model[eid].append(ans)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rollback(self, data):
        eid = data.draw(st.sampled_from(sorted(self.model)))
        v = data.draw(st.integers(1, len(self.model[eid])))
        self.mem.rollback(eid, version=v)
        self.model[eid].append(self.model[eid][v - 1])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        eid = data.draw(st.sampled_from(sorted(self.model)))
        self.mem.delete(eid)
        del self.model[eid]
        self.retired.add(eid)

    @rule(text=BAD, where=st.sampled_from(["question", "answer", "revise"]))
    def invalid_text(self, text, where):
        eid = min(self.model) if self.model else 0
        call = {
            "question": lambda: self.mem.add(None, text, "x"),
            "answer": lambda: self.mem.add(None, "what is new?", text),
            "revise": lambda: self.mem.revise(eid, answer=text),
        }[where]
        self._refused(call)

    @rule(data=st.data())
    def invalid_id(self, data):
        choices = [-1, 10**9, None, 1.5, True]
        if self.retired:
            choices.append(min(self.retired))
        eid = data.draw(st.sampled_from(choices))
        op = data.draw(st.sampled_from(["delete", "revise", "rollback", "get", "add-with-id"]))
        if op == "add-with-id" and (eid is None or eid == 10**9):
            eid = min(self.model) if self.model else -1  # an existing id (or a negative one)
        call = {
            "delete": lambda: self.mem.delete(eid),
            "revise": lambda: self.mem.revise(eid, answer="x"),
            "rollback": lambda: self.mem.rollback(eid, version=1),
            "get": lambda: self.mem.get(eid),
            "add-with-id": lambda: self.mem.add(None, "what is new?", "x", edit_id=eid),
        }[op]
        self._refused(call)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def invalid_version(self, data):
        eid = data.draw(st.sampled_from(sorted(self.model)))
        v = data.draw(st.sampled_from([0, -1, len(self.model[eid]) + 1, 1.0, "1"]))
        self._refused(lambda: self.mem.rollback(eid, version=v))

    @rule()
    def round_trip(self):
        with tempfile.TemporaryDirectory() as d:
            self.mem.save(Path(d) / "m")
            back = EditMemory.load(Path(d) / "m", encoder=HashKeyEncoder(32))
        assert memory_state(back) == memory_state(self.mem)

    @invariant()
    def matches_model(self):
        assert sorted(e.id for e in self.mem.list()) == sorted(self.model)
        for eid, answers in self.model.items():
            hist = self.mem.history(eid)
            assert [v.answer for v in hist] == answers and self.mem.get(eid).version == len(answers)


MemoryMachine.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryMachine = MemoryMachine.TestCase
