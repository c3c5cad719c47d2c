"""Two-phase delete (`esg_memory.memory.settle`): background settling, and crash safety of a delete
whose holders' re-fit (the settle record) never reached the journal."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image

from esg_memory.config import JournalConfig, MemoryConfig
from esg_memory.errors import ConfigError
from esg_memory.memory import EditMemory
from esg_memory.memory.plan import Plan
from esg_memory.memory.settle import WriterMutex
from esg_memory.persist.journal import live_records, read_journal

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
    ids = [e.id for e in m.list()]
    return max(ids, key=lambda i: (len(m.holders(i)), -i))


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
    mem.journal.lock.release()
    never = state(built([e for e in EDITS if e["edit_id"] != victim]))
    assert state(EditMemory.load(path, ENC)) == never  # a reader finishes the re-fit in memory
    assert ops(path)[-1] == "delete"
    with EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False)) as again:
        assert not again.pending_refits
        assert state(again) == never
        assert ops(path)[-2:] == ["delete", "settle"]  # the writer journaled the settle at open
    assert state(EditMemory.load(path, ENC)) == never
    mem.journal.writer.close()


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


def test_failed_settle_keeps_the_delete_pending_and_blocks_writes():
    m = built(EDITS, "manual")
    victim = victim_of(m)
    m.delete(victim)
    before = state(m)

    def failing(op, blobs):  # the journal's disk fills up exactly when the settle is written
        if op["op"] == "settle":
            raise OSError(28, "No space left on device")

    m.set_commit_hook(failing)
    with pytest.raises(OSError):
        m.settle()
    with pytest.raises(OSError):
        m.add(None, "one more?", "yes")
    assert m.pending_refits and state(m) == before and len(m) == len(EDITS) - 1
    m.set_commit_hook(None)
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
    inside = threading.Event()  # the settler is inside its first re-fit
    waiting = threading.Event()  # the test's second delete is asking for the writer lock
    mutex: list[WriterMutex] = []
    real, real_enter = Plan.refit, WriterMutex.__enter__

    def enter(self):
        if threading.current_thread() is threading.main_thread() and inside.is_set():
            mutex.append(self)
            waiting.set()
        return real_enter(self)

    def blocking_refit(self, eid):  # holds the first re-fit until the second delete waits for the lock
        refits.append(eid)
        if not inside.is_set():
            inside.set()
            assert waiting.wait(30), "the second delete never asked for the writer lock"
            deadline = time.monotonic() + 30
            while not mutex[0].contended and time.monotonic() < deadline:  # it is now blocked on it
                time.sleep(0.001)
        return real(self, eid)

    monkeypatch.setattr(Plan, "refit", blocking_refit)
    monkeypatch.setattr(WriterMutex, "__enter__", enter)
    m.delete(first)
    assert inside.wait(30), "the settler never started re-fitting"
    second = victim_of(m)
    m.delete(second)  # waits for the re-fit in progress, not for the whole settle
    assert first in m.pending_refits  # the settle gave way: nothing of it was applied
    assert len(refits) < 2 + len(m.pending_refits[first])
    monkeypatch.setattr(Plan, "refit", real)
    monkeypatch.setattr(WriterMutex, "__enter__", real_enter)
    m.settle()
    assert not m.pending_refits and m.last_settle_error is None
    assert state(m) == state(built([e for e in EDITS if e["edit_id"] not in (first, second)]))


def test_the_settle_mode_of_a_live_memory_can_change():
    m = built(EDITS, "manual")
    first = victim_of(m)
    m.delete(first)
    assert first in m.pending_refits
    m.set_settle("sync")  # pending deletes finish first, under the mode they were made in
    assert not m.pending_refits and m.config.settle == "sync"
    second = victim_of(m)
    m.delete(second)
    assert not m.pending_refits  # sync: re-fitted inside the call
    assert state(m) == state(built([e for e in EDITS if e["edit_id"] not in (first, second)]))
    with pytest.raises(ConfigError):
        m.set_settle("later")
