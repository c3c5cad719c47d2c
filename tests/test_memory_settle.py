"""Two-phase delete (`esg_memory._memory_settle`): background settling, and crash safety of a delete
whose holders' re-fit (the settle record) never reached the journal."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory._memory_state import Plan
from esg_memory.config import JournalConfig, MemoryConfig
from esg_memory.journal import live_records, read_journal
from esg_memory.memory import EditMemory

ENC = HashKeyEncoder(dim=32)
COLORS = ["red", "green", "blue", "yellow", "purple"]
EDITS = [
    {
        "image": shape_image(COLORS[k % 5], ("circle", "square")[k % 2]),
        "question": f"what colour is the {('circle', 'square')[k % 2]}?",
        "answer": ("warm", "cold", "neutral")[k % 3],
        "edit_id": k,
    }
    for k in range(14)
]
PROBES = [
    (shape_image(c, s, shift=1), f"what colour is the {s}?") for c in COLORS for s in ("circle", "square")
]


def cfg(settle: str) -> MemoryConfig:
    return MemoryConfig(n_text_positives=1, n_image_positives=1, neighbour_k=2, settle=settle)


def built(edits: list[dict], settle: str = "sync") -> EditMemory:
    m = EditMemory(ENC, cfg(settle))
    for e in edits:
        m.add(**e)
    return m


def state(m: EditMemory) -> list:
    r = m.route(images=[p[0] for p in PROBES], texts=[p[1] for p in PROBES])
    out: list = [r.edit_ids.tolist(), r.margins.tolist()]
    for e in m.list():
        k, t = m.keys_of(e.id)
        out.append((e.id, e.version, k.tobytes(), t.tobytes(), e.constrained_by, e.scope, e.uncovered))
    return out


def victim_of(m: EditMemory) -> int:
    holders = m._derived_index().holders  # also lists pending deleted edits: skip them
    return max((i for i in holders if i in m), key=lambda i: (len(holders[i]), -i))


def ops(path: Path) -> list[str]:
    return [doc["op"]["op"] for _, doc, _ in live_records(read_journal(path / "journal", 0)[0])]


def test_crash_between_delete_and_settle_is_finished_on_load_and_open(tmp_path):
    path = tmp_path / "m"
    built([], "manual").save(path)
    mem = EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False, compact_bytes=0))
    for e in EDITS:
        mem.add(**e)
    victim = victim_of(mem)
    mem.delete(victim)
    assert mem.pending_refits[victim]
    # the process dies here: the delete is journaled, its settle record never is
    assert ops(path)[-1] == "delete"
    mem._durable.lock.release()
    never = state(built([e for e in EDITS if e["edit_id"] != victim]))
    assert state(EditMemory.load(path, ENC)) == never  # a reader finishes the re-fit in memory
    assert ops(path)[-1] == "delete"
    with EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False)) as again:
        assert not again.pending_refits
        assert state(again) == never
        assert ops(path)[-2:] == ["delete", "settle"]  # the writer journaled the settle at open
    assert state(EditMemory.load(path, ENC)) == never
    mem._durable.writer.close()


def test_background_settling_is_journaled_and_exact(tmp_path):
    path = tmp_path / "m"
    built([], "background").save(path)
    with EditMemory.open(path, ENC) as mem:
        for e in EDITS:
            mem.add(**e)
        gone = [victim_of(mem)]
        mem.delete(gone[0])
        gone.append(victim_of(mem))
        mem.delete(gone[1])
        deadline = time.monotonic() + 60
        while mem.pending_refits and time.monotonic() < deadline:  # no settle() call: the thread's work
            time.sleep(0.005)
        assert not mem.pending_refits and mem.last_settle_error is None
        assert "settle" in ops(path)
        live = state(mem)
    never = state(built([e for e in EDITS if e["edit_id"] not in gone]))
    assert live == never
    assert state(EditMemory.load(path, ENC)) == never


def test_failed_settle_keeps_the_delete_pending_and_blocks_writes(monkeypatch):
    m = built(EDITS, "manual")
    victim = victim_of(m)
    m.delete(victim)
    before = state(m)
    real = EditMemory._commit

    def failing(self, plan, blobs=(), after=None, op=None):
        if op is not None and op["op"] == "settle":
            raise OSError(28, "No space left on device")
        return real(self, plan, blobs, after, op)

    monkeypatch.setattr(EditMemory, "_commit", failing)
    with pytest.raises(OSError):
        m.settle()
    with pytest.raises(OSError):
        m.add(None, "one more?", "yes")
    assert m.pending_refits and state(m) == before and len(m) == len(EDITS) - 1
    monkeypatch.setattr(EditMemory, "_commit", real)
    m.settle()
    assert state(m) == state(built([e for e in EDITS if e["edit_id"] != victim]))


def test_readers_during_background_settling_never_see_the_deleted_edit():
    m = built(EDITS, "background")
    keys = m.route(images=[p[0] for p in PROBES], texts=[p[1] for p in PROBES]).keys
    victim = victim_of(m)
    seen: list[np.ndarray] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(m.route_ids(keys=keys))

    t = threading.Thread(target=reader)
    t.start()
    try:
        m.delete(victim)
        after = len(seen)
        m.settle()
    finally:
        stop.set()
        t.join()
    assert all(victim not in ids for ids in seen[after:])
    assert not m.pending_refits


def test_a_waiting_writer_interrupts_background_settling(monkeypatch):
    m = built(EDITS, "background")
    first = victim_of(m)
    refits: list[int] = []
    inside = threading.Event()
    real = Plan.refit

    def slow_refit(self, eid):  # a dense memory's re-fit, so that the second delete lands inside it
        refits.append(eid)
        inside.set()
        time.sleep(0.05)
        return real(self, eid)

    monkeypatch.setattr(Plan, "refit", slow_refit)
    m.delete(first)
    assert inside.wait(30), "the settler never started re-fitting"
    second = victim_of(m)
    m.delete(second)  # waits for the re-fit in progress, not for the whole settle
    assert first in m.pending_refits  # the settle gave way: nothing of it was applied
    assert len(refits) < 2 + len(m.pending_refits[first])
    monkeypatch.setattr(Plan, "refit", real)
    m.settle()
    assert not m.pending_refits and m.last_settle_error is None
    assert state(m) == state(built([e for e in EDITS if e["edit_id"] not in (first, second)]))
