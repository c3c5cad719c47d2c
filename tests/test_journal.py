"""Write-ahead journal of a durable EditMemory: exact replay, torn and corrupt records, versions, locks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image
from safetensors.numpy import load_file

from esg_memory.config import JournalConfig, MemoryConfig
from esg_memory.errors import ConfigError, FormatError, InvalidInputError, LockError
from esg_memory.memory import EditMemory
from esg_memory.memory.committed import Committed
from esg_memory.persist import frames
from esg_memory.persist.frames import BLOCK, frame, header, read_segment
from esg_memory.persist.journal import list_segments, read_journal

ENC = HashKeyEncoder(dim=32)
CFG = MemoryConfig(n_text_positives=1, n_image_positives=1)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
PROBES = [(shape_image(c, s), f"what {w} is the {s}?") for c in COLORS for s in ("circle", "square")
          for w in ("colour", "shape")]


def new_durable(path: Path, **journal) -> EditMemory:
    EditMemory(ENC, CFG).save(path)  # a plain directory, converted by open
    # no snapshot on close: the tests below look at (and damage) the journal the writes left
    return EditMemory.open(path, ENC, journal=JournalConfig(**{"compact_on_close": False, **journal}))


def stream(mem: EditMemory, n: int = 10, seed: int = 0) -> None:
    """Every kind of write: add, add_many, revise, rollback, feedback, attach, delete."""
    rng = np.random.default_rng(seed)
    ids = []
    for k in range(n):
        c, s = COLORS[k % 6], ("circle", "square")[k % 2]
        img = None if k % 4 == 3 else shape_image(c, s, shift=k % 3)
        pos = [f"which colour has this {s}?"] if k % 2 else [(shape_image(c, s, shift=1), None)]
        ids.append(mem.add(img, f"what colour is the {s} {k}?", f"{c} {k}", positives=pos, metadata={"k": k}))
    ids += mem.add_many([{"question": f"who wrote book {j}?", "answer": f"author {j}"} for j in range(3)])
    mem.attach(ids[0], "adapter", b"\x00adapter-v1" * 10)
    mem.revise(ids[0], answer="changed")
    mem.attach(ids[0], "adapter", b"adapter-v2")
    mem.rollback(ids[0], 1)
    mem.revise(ids[1], question="what is drawn here?", image=shape_image("blue", "triangle"))
    mem.feedback(shape_image("red", "circle"), "what colour is the circle now?", ids[0])
    mem.feedback(None, "who wrote book 1 really?", None)
    for eid in rng.choice(ids[2:], size=3, replace=False):
        mem.delete(int(eid))


def fingerprint(mem: EditMemory, tmp: Path) -> tuple:
    """Everything saved (memory.json, keys bytes, blobs, attachments) + routing of fixed probes."""
    d = tmp / f"fp{time.perf_counter_ns()}"
    mem.save(d)
    doc = json.loads((d / "memory.json").read_text())
    # the file checksums differ between any two saves (safetensors orders its metadata at random)
    doc.pop("files"), doc.pop("checksum", None)
    tensors = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in load_file(d / "keys.safetensors").items()}
    blobs = sorted((k, v.tobytes()) for k, v in load_file(d / "blobs.safetensors").items())
    atts = sorted((k, v.tobytes()) for k, v in load_file(d / "attachments.safetensors").items())
    r = mem.route(images=[p[0] for p in PROBES], texts=[p[1] for p in PROBES])
    shutil.rmtree(d)
    return (doc, tensors, blobs, atts, r.edit_ids.tolist(), r.scores.tolist(),
            r.thresholds.tolist(), _keys(mem))


def _keys(mem: EditMemory) -> list:
    return [(e.id, *(x.tobytes() for x in mem.keys_of(e.id))) for e in mem.list()]


def last_segment(path: Path) -> Path:
    return list_segments(path / "journal")[-1][1]


def record_offsets(seg: Path) -> list[int]:
    """Where each record of a version-2 segment starts (re-derived here from the documented layout)."""
    data = seg.read_bytes()
    out, pos = [], 24
    while pos < len(data):
        out.append(pos)
        (n,) = struct.unpack_from("<I", data, pos + 12)
        body_end = pos + 20 + n  # head + payload, then one crc per 512-byte sector of them + 20 bytes
        pos = body_end + 4 * ((body_end - 1) // BLOCK - pos // BLOCK + 1) + 20
    return out


def v1_segment(records: list[tuple[int, bytes]], first_lsn: int) -> bytes:
    """A version-1 segment (the layout before commit trailers) holding ``records``."""
    head = struct.pack("<8sIQ", b"ESGJOURN", 1, first_lsn)
    out = head + struct.pack("<I", zlib.crc32(head))
    for lsn, payload in records:
        lh = struct.pack("<QI", lsn, len(payload))
        out += b"ESGR" + lh + struct.pack("<I", zlib.crc32(payload, zlib.crc32(lh))) + payload
    return out


def flipped(data: bytes, where: int, mask: int) -> bytes:
    bad = bytearray(data)
    bad[where] ^= mask
    return bytes(bad)


# ------------------------------------------------------------------------------------ replay
def test_replay_equals_the_live_memory_exactly(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path, compact_bytes=0)
    stream(mem)
    live = fingerprint(mem, tmp_path)
    n_records = len(read_journal(path / "journal", 0)[0])
    assert n_records >= 20  # nothing compacted: the snapshot is the empty memory, all of it is replayed
    replayed = EditMemory.load(path, ENC)
    assert fingerprint(replayed, tmp_path) == live
    # a compaction + reopen gives the same memory again, and keeps journaling
    lsn = mem.compact()
    assert lsn == n_records and [f for f, _ in list_segments(path / "journal")] == [lsn + 1]
    assert fingerprint(EditMemory.load(path, ENC), tmp_path) == live
    mem.close()
    with EditMemory.open(path, ENC) as again:
        assert fingerprint(again, tmp_path) == live
        again.add(None, "one more question?", "yes")
    assert len(EditMemory.load(path, ENC)) == len(live[0]["edits"]) + 1


def test_auto_compaction_in_background_and_inline(tmp_path):
    for background in (True, False):
        path = tmp_path / f"m{background}"
        mem = new_durable(path, compact_bytes=20_000, background=background)
        stream(mem, n=8, seed=1)
        mem.journal.wait()
        assert mem.journal.compactions >= 1 and mem.journal.last_compact_error is None
        assert fingerprint(EditMemory.load(path, ENC), tmp_path) == fingerprint(mem, tmp_path)
        mem.close()
        assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []


def test_readers_racing_compactions_see_whole_prefixes(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path, compact_bytes=6000, background=True)
    done = threading.Event()

    def writer() -> None:
        try:
            for k in range(20):
                mem.add(None, f"question number {k}?", f"answer {k}")
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while True:
        finished = done.is_set()
        ids = sorted(e.id for e in EditMemory.load(path, ENC).list())
        assert ids == list(range(len(ids)))  # every load: exactly the writes acknowledged so far, in order
        seen.append(len(ids))
        if finished:
            break
        time.sleep(0.02)  # leave the writer most of the GIL
    t.join()
    mem.journal.wait()
    # How many compactions overlap (a crossing while one runs is coalesced) depends on the machine's load;
    # 20 records past a 6000-byte budget guarantee at least one.
    assert mem.journal.compactions >= 1 and seen[-1] == 20
    mem.close()
    assert len(EditMemory.load(path, ENC)) == 20


# ------------------------------------------------------------------------------------ damaged journals
def test_torn_last_record_at_every_byte_offset_is_dropped(tmp_path, caplog):
    path = tmp_path / "m"
    mem = new_durable(path, compact_bytes=0)
    a = mem.add(shape_image("red"), "what colour is it?", "red")
    mem.add(None, "who wrote hamlet?", "shakespeare")
    before = fingerprint(mem, tmp_path)
    mem.attach(a, "adapter", b"small adapter bytes")  # the last record: small, so every offset is cheap
    mem.close()
    seg = last_segment(path)
    good = seg.read_bytes()
    start = record_offsets(seg)[-1]
    # journal level: every truncation point of the last record
    for cut in range(start, len(good)):
        seg.write_bytes(good[:cut])
        records, _ = read_journal(path / "journal", 0)
        assert [lsn for lsn, _ in records] == [1, 2]
    assert "torn last record" in caplog.text
    # memory level (a full load + replay each): a spread of offsets, header and payload
    for cut in sorted({start, start + 1, start + 19, start + 20, start + 21, len(good) - 1,
                       *range(start, len(good), 37)}):
        seg.write_bytes(good[:cut])
        loaded = EditMemory.load(path, ENC)
        assert loaded.attachment(a, "adapter") is None
        assert fingerprint(loaded, tmp_path) == before
    # a writer truncates the torn tail, then appends after it
    seg.write_bytes(good[: len(good) - 3])
    with EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False)) as w:
        w.attach(a, "adapter", b"again")
    assert EditMemory.load(path, ENC).attachment(a, "adapter") == b"again"


DAMAGED = r"journal record 3 is damaged \(complete, checksum fails\).*refusing to drop an acknowledged write"


def _two_writes(path: Path) -> tuple[EditMemory, int, tuple]:
    """A journaling memory after two writes, the id of its first edit and its fingerprint."""
    mem = new_durable(path, compact_bytes=0)
    a = mem.add(shape_image("red"), "what colour is it?", "red")
    mem.add(None, "who wrote hamlet?", "shakespeare")
    return mem, a, fingerprint(mem, Path(path).parent)


def test_damaged_complete_last_record_is_refused_not_dropped(tmp_path):
    path = tmp_path / "m"
    mem, a, _ = _two_writes(path)
    mem.attach(a, "adapter", b"small adapter bytes")  # acknowledged: its fsync returned
    mem.close()
    seg = last_segment(path)
    good = seg.read_bytes()
    start = record_offsets(seg)[-1]
    assert len(good) - start < BLOCK  # small: every bit of it below
    # every bit of the last record (head, length field, payload, trailer), and every byte inverted
    fd = os.open(seg, os.O_RDWR)
    try:
        for where in range(start, len(good)):
            for mask in (*(1 << k for k in range(8)), 0xFF):
                os.pwrite(fd, bytes([good[where] ^ mask]), where)
                with pytest.raises(FormatError, match=DAMAGED):
                    read_journal(path / "journal", 0)
            os.pwrite(fd, good[where : where + 1], where)
    finally:
        os.close(fd)
    # the length field above all: a length pointing past the end, or short of it, is not a torn write
    for n in (0, 1, len(good) - start - 41, len(good) - start - 39, 1 << 20, 2**32 - 1):
        bad = bytearray(good)
        struct.pack_into("<I", bad, start + 12, n)
        seg.write_bytes(bytes(bad))
        with pytest.raises(FormatError, match=DAMAGED):
            read_journal(path / "journal", 0)
    # memory level: refused by load and by open, and the open leaves the segment as it was
    for where in (start, start + 13, start + 30, (start + len(good)) // 2, len(good) - 30, len(good) - 1):
        damaged = flipped(good, where, 0x10)
        seg.write_bytes(damaged)
        with pytest.raises(FormatError, match=DAMAGED):
            EditMemory.load(path, ENC)
        with pytest.raises(FormatError, match=DAMAGED):
            EditMemory.open(path, ENC)
        assert seg.read_bytes() == damaged
    # an acknowledged write damaged, then a crash during the next append: still refused
    seg.write_bytes(flipped(good, len(good) - 30, 0x01) + good[start : start + 25])
    with pytest.raises(FormatError, match=DAMAGED):
        read_journal(path / "journal", 0)
    seg.write_bytes(good)
    assert EditMemory.load(path, ENC).attachment(a, "adapter") == b"small adapter bytes"


def test_sectors_that_never_landed_are_a_torn_write(tmp_path):
    """A filesystem may grow a file before its data lands: sectors of an unfinished append read as zeros."""
    path = tmp_path / "m"
    mem, a, before = _two_writes(path)
    big = np.random.default_rng(0).integers(1, 256, 6 * BLOCK, dtype=np.uint8).tobytes()
    mem.attach(a, "adapter", big)
    mem.close()
    seg = last_segment(path)
    good = seg.read_bytes()
    start = record_offsets(seg)[-1]
    # the record's share of each sector of the file
    shares = [(max(b, start), min(b + BLOCK, len(good)))
              for b in range(start // BLOCK * BLOCK, len(good), BLOCK)]
    assert len(shares) >= 4

    def zeroed(data: bytes, *spans: tuple[int, int]) -> bytes:
        out = bytearray(data)
        for lo, hi in spans:
            out[lo:hi] = bytes(hi - lo)
        return bytes(out)

    cases = [zeroed(good, s) for s in shares]  # any one sector (the head's, the trailer's, one between)
    cases += [zeroed(good, shares[0], shares[2]), zeroed(good, (start, len(good)))]  # several; all of it
    cases += [zeroed(good, (shares[1][0], len(good)))[:cut] for cut in (shares[2][0] + 7, len(good) - 3)]
    for data in cases:
        seg.write_bytes(data)
        assert [lsn for lsn, _ in read_journal(path / "journal", 0)[0]] == [1, 2]
    seg.write_bytes(cases[1])
    assert fingerprint(EditMemory.load(path, ENC), tmp_path) == before
    # but a bit flip anywhere in the same record is damage, and so is a zeroed sector of a record that
    # is followed by more bytes (the next append began only after this one's fsync returned)
    for where in range(start, len(good), 97):
        seg.write_bytes(flipped(good, where, 1 << (where % 8)))
        with pytest.raises(FormatError, match=DAMAGED):
            read_journal(path / "journal", 0)
    seg.write_bytes(zeroed(good, shares[1]) + good[start : start + 30])
    with pytest.raises(FormatError, match=DAMAGED):
        read_journal(path / "journal", 0)
    # a writer drops the torn record (zeros and all) and appends after it
    seg.write_bytes(cases[-1])
    with EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False)) as w:
        w.attach(a, "adapter", b"again")
    assert EditMemory.load(path, ENC).attachment(a, "adapter") == b"again"


_PAYLOAD = np.random.default_rng(1).integers(1, 256, 2 * BLOCK, dtype=np.uint8).tobytes()  # no zero byte


def _segment_ending_with(start: int, payload: bytes) -> bytes:
    """A version-2 segment of three records, the last (lsn 3, ``payload``) starting at byte ``start``."""
    for n2 in range(8):  # two fillers reach every offset (a frame grows 4 bytes per sector it meets)
        for n1 in range(max(0, start - 24 - 88 - 16), start):
            f1 = frame(1, _PAYLOAD[:n1], 24)
            f2 = frame(2, _PAYLOAD[:n2], 24 + len(f1))
            if 24 + len(f1) + len(f2) == start:
                return header(1) + f1 + f2 + frame(3, payload, start)
            if 24 + len(f1) + len(f2) > start:
                break
    raise AssertionError(f"no fillers put a record at {start}")


def test_every_alignment_of_head_and_trailer_on_sector_edges(tmp_path):
    """A complete last record's flips are refused and its cuts dropped wherever it meets a sector edge."""
    seg = tmp_path / "00000000000000000001.wal"
    configs = [(BLOCK - k, _PAYLOAD[:40]) for k in range(27)] + [(BLOCK + 1, _PAYLOAD[:40])]
    start = 2 * BLOCK - 100  # then records ending from 30 bytes before to 5 bytes after the sector edge
    ends = {start + len(frame(3, _PAYLOAD[:n], start)) - 2 * BLOCK: n for n in range(10, 80)}
    configs += [(start, _PAYLOAD[:n]) for d, n in ends.items() if -30 <= d <= 5]
    assert len(configs) > 28 + 30
    for start, payload in configs:
        good = _segment_ending_with(start, payload)
        seg.write_bytes(good)
        assert [lsn for lsn, _ in read_segment(seg, last=True).records] == [1, 2, 3]
        fd = os.open(seg, os.O_RDWR)  # damage in place: rewriting the file each time is slow
        try:
            for where in range(start, len(good)):  # every bit flip, and every byte inverted
                for mask in (*(1 << k for k in range(8)), 0xFF):
                    os.pwrite(fd, bytes([good[where] ^ mask]), where)
                    with pytest.raises(FormatError, match=r"journal record 3 is damaged \(complete"):
                        read_segment(seg, last=True)
                os.pwrite(fd, good[where : where + 1], where)
            for cut in range(len(good) - 1, start - 1, -1):
                os.ftruncate(fd, cut)
                got = read_segment(seg, last=True)
                assert [lsn for lsn, _ in got.records] == [1, 2] and got.good_end == start
        finally:
            os.close(fd)


def test_version_1_segments_read_as_before(tmp_path, caplog):
    path = tmp_path / "m"
    mem, a, _ = _two_writes(path)
    mem.attach(a, "adapter", b"small adapter bytes")
    live = fingerprint(mem, tmp_path)
    mem.close()
    seg = last_segment(path)
    records, _ = read_journal(path / "journal", 0)
    v1 = v1_segment(records, 1)
    seg.write_bytes(v1)
    assert fingerprint(EditMemory.load(path, ENC), tmp_path) == live
    # no trailer to tell by: anything bad in the last version-1 record is dropped as torn, as it always was
    start = len(v1) - 20 - len(records[-1][1])
    for data in (v1[: start + 1], v1[: start + 25], v1[:-1], flipped(v1, start + 13, 0x40),
                 flipped(v1, len(v1) - 2, 1)):
        seg.write_bytes(data)
        assert [lsn for lsn, _ in read_journal(path / "journal", 0)[0]] == [1, 2]
    assert "torn last record" in caplog.text
    seg.write_bytes(flipped(v1, 24 + 40, 0x08))  # damage in the first of three records
    with pytest.raises(FormatError, match="followed by a valid record"):
        read_journal(path / "journal", 0)
    # a writer cuts a torn version-1 tail off, then writes version 2 only: into a segment of its own
    seg.write_bytes(v1 + v1[start : start + 30])
    with EditMemory.open(path, ENC, journal=JournalConfig(compact_on_close=False)) as w:
        w.add(None, "who painted the mona lisa?", "leonardo")
    segs = list_segments(path / "journal")
    assert [first for first, _ in segs] == [1, 4]
    assert segs[0][1].read_bytes() == v1
    assert struct.unpack_from("<I", segs[1][1].read_bytes(), 8) == (2,)
    again = EditMemory.load(path, ENC)
    assert again.attachment(a, "adapter") == b"small adapter bytes"
    assert sorted(e.answer for e in again.list()) == ["leonardo", "red", "shakespeare"]
    with EditMemory.open(path, ENC):  # compacted on close: one segment, version 2
        pass
    assert [first for first, _ in list_segments(path / "journal")] == [5]
    assert len(EditMemory.load(path, ENC)) == 3


def test_corrupt_middle_record_is_a_format_error(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path, compact_bytes=0)
    for k in range(4):
        mem.add(None, f"question number {k}?", f"answer {k}")
    mem.close()
    seg = last_segment(path)
    data = bytearray(seg.read_bytes())
    offs = record_offsets(seg)
    for where in (offs[1] + 2, offs[1] + 30, offs[2] + 14):  # magic, payload, length field
        bad = bytearray(data)
        bad[where] ^= 0x5A
        seg.write_bytes(bytes(bad))
        with pytest.raises(FormatError, match="followed by a valid record"):
            EditMemory.load(path, ENC)
        with pytest.raises(FormatError):
            EditMemory.open(path, ENC)
    seg.write_bytes(bytes(data))
    assert len(EditMemory.load(path, ENC)) == 4


def test_newer_or_foreign_journal_is_refused(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path)
    mem.add(None, "a question?", "an answer")
    mem.close()
    seg = last_segment(path)
    data = seg.read_bytes()
    from esg_memory.persist import JOURNAL_VERSION

    head = struct.pack("<8sIQ", b"ESGJOURN", JOURNAL_VERSION + 1, 1)
    seg.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[24:])
    with pytest.raises(FormatError, match="newer"):
        EditMemory.load(path, ENC)
    seg.write_bytes(b"NOTAJOURNAL" + data[11:])
    with pytest.raises(FormatError, match="not an esg-memory journal"):
        EditMemory.load(path, ENC)
    seg.write_bytes(data)
    # a snapshot newer than this library is refused too
    doc = json.loads((path / "snapshot" / "memory.json").read_text())
    doc["format_version"] = 99
    (path / "snapshot" / "memory.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="newer"):
        EditMemory.load(path, ENC)


def test_missing_records_between_snapshot_and_journal_are_an_error(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path, compact_bytes=0)
    mem.add(None, "first question?", "one")
    mem.journal.writer.rotate()
    mem.add(None, "second question?", "two")
    mem.close()
    list_segments(path / "journal")[0][1].unlink()
    with pytest.raises(FormatError, match="missing"):
        EditMemory.load(path, ENC)


# ------------------------------------------------------------------------------------ failures
def test_failed_journal_write_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m"
    mem = new_durable(path)
    a = mem.add(shape_image("red"), "what colour is it?", "red")
    before = fingerprint(mem, tmp_path)
    real = os.fdatasync

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(OSError):
        mem.add(shape_image("blue"), "what colour is that?", "blue")
    with pytest.raises(OSError):
        mem.attach(a, "adapter", b"x")
    with pytest.raises(OSError):
        mem.delete(a)
    monkeypatch.setattr(os, "fdatasync", real)
    assert fingerprint(mem, tmp_path) == before
    assert fingerprint(EditMemory.load(path, ENC), tmp_path) == before
    mem.revise(a, answer="crimson")  # the journal is usable again: the partial record was cut off
    assert EditMemory.load(path, ENC).get(a).answer == "crimson"


def test_a_record_over_the_size_limit_is_refused_before_writing(tmp_path, monkeypatch):
    path = tmp_path / "m"
    mem = new_durable(path)
    a = mem.add(None, "what is the capital of france?", "paris")
    before, seg = fingerprint(mem, tmp_path), last_segment(path).read_bytes()
    monkeypatch.setattr(frames, "_MAX_RECORD", 4000)  # the real limit is 2 GiB
    with pytest.raises(InvalidInputError, match="over the 4000-byte limit"):
        mem.attach(a, "adapter", bytes(5000))
    assert fingerprint(mem, tmp_path) == before and last_segment(path).read_bytes() == seg
    mem.attach(a, "adapter", bytes(100))
    assert EditMemory.load(path, ENC).attachment(a, "adapter") == bytes(100)


def test_apply_failure_after_journaling_is_voided(tmp_path, monkeypatch):
    path = tmp_path / "m"
    mem = new_durable(path)
    a = mem.add(None, "what is the capital of france?", "paris")
    before = fingerprint(mem, tmp_path)
    real = Committed.install  # where every journaled write is installed
    monkeypatch.setattr(Committed, "install", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        mem.revise(a, answer="lyon")
    monkeypatch.setattr(Committed, "install", real)
    assert fingerprint(EditMemory.load(path, ENC), tmp_path) == before  # journaled, then voided
    mem.revise(a, answer="paris, france")
    assert EditMemory.load(path, ENC).get(a).version == 2


def test_closed_and_readonly_memories_refuse_writes(tmp_path):
    path = tmp_path / "m"
    mem = new_durable(path)
    a = mem.add(None, "what is two plus two?", "four")
    ro = EditMemory.open(path, readonly=True, encoder=ENC)
    assert ro.get(a).answer == "four"
    with pytest.raises(ConfigError, match="read-only"):
        ro.revise(a, answer="five")
    mem.close()
    with pytest.raises(ConfigError, match="closed"):
        mem.add(None, "another?", "no")
    assert len(EditMemory.load(path, ENC)) == 1
    with pytest.raises(ConfigError, match="encoder"):
        EditMemory.open(tmp_path / "empty")
    with pytest.raises(ConfigError):
        JournalConfig(compact_bytes=-1)
    with pytest.raises(ConfigError, match="JournalConfig"):
        EditMemory.open(tmp_path / "new", ENC, journal={"compact_bytes": 1})
    with pytest.raises(ConfigError, match="compact"):
        EditMemory(ENC, CFG).compact()
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not an esg-memory directory"):
        EditMemory.open(tmp_path / "thesis", ENC)
    assert [p.name for p in (tmp_path / "thesis").iterdir()] == ["chapter1.txt"]
    # a save never swaps away a file (or a device: atomic_directory renames what is there)
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ConfigError, match="not a directory"):
        EditMemory(ENC, CFG).save(tmp_path / "a-file")
    with pytest.raises(ConfigError, match="not a directory"):
        EditMemory.open(tmp_path / "a-file", ENC)
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_make_durable_resumes_or_replaces(tmp_path):
    path = tmp_path / "m"
    with new_durable(path) as mem:
        mem.add(None, "what is the tallest mountain?", "everest")
    loaded = EditMemory.load(path, ENC)
    lineage = json.loads((path / "snapshot" / "memory.json").read_text())["journal"]["lineage"]
    loaded.make_durable(path)  # unchanged since loaded: the journal is resumed, no new snapshot
    assert json.loads((path / "snapshot" / "memory.json").read_text())["journal"]["lineage"] == lineage
    loaded.add(None, "what is the longest river?", "nile")
    loaded.close()
    other = EditMemory(ENC, CFG)
    other.add(None, "what is the largest ocean?", "pacific")
    other.make_durable(path)  # a different memory: replaces the directory's content
    other.add(None, "what is the smallest planet?", "mercury")
    assert sorted(e.answer for e in EditMemory.load(path, ENC).list()) == ["mercury", "pacific"]
    with pytest.raises(LockError):
        EditMemory(ENC, CFG).save(path)  # another durable directory in use: refused, not clobbered
    other.close()


def test_saving_a_loaded_copy_back_over_its_directory(tmp_path):
    path = tmp_path / "m"
    with new_durable(path) as mem:
        for k in range(3):
            mem.add(None, f"what is fact number {k}?", f"fact {k}")
    copy = EditMemory.load(path, ENC)
    copy.delete(0)
    copy.save(path)  # unchanged on disk since loaded: replaced (journal positions continue)
    assert sorted(e.id for e in EditMemory.load(path, ENC).list()) == [1, 2]
    with EditMemory.open(path, ENC) as w:
        w.add(None, "what is fact number 9?", "fact 9")
    copy.add(None, "what is fact number 5?", "fact 5")
    with pytest.raises(LockError, match="changed by another writer"):
        copy.save(path)  # would silently drop fact 9
    with pytest.raises(LockError, match="changed by another writer"):
        copy.make_durable(path)
    assert sorted(e.answer for e in EditMemory.load(path, ENC).list()) == ["fact 1", "fact 2", "fact 9"]


# ------------------------------------------------------------------------------------ locks
_HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from _memory_fixtures import HashKeyEncoder
from esg_memory.memory import EditMemory
mem = EditMemory.open({path!r}, HashKeyEncoder(dim=32))
mem.add(None, "written by the holder?", "yes")
print("ready", flush=True)
time.sleep(60)
"""


def test_second_writer_in_another_process_gets_lock_error_readers_work(tmp_path, caplog):
    path = tmp_path / "m"
    new_durable(path).close()
    code = _HOLDER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(LockError, match=f"pid {proc.pid}"):
            EditMemory.open(path, ENC)
        with pytest.raises(LockError):
            EditMemory(ENC, CFG).make_durable(path)
        # readers see the holder's acknowledged write while it holds the lock
        assert [e.answer for e in EditMemory.load(path, ENC).list()] == ["yes"]
        assert len(EditMemory.open(path, ENC, readonly=True)) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel released the dead holder's flock: the next writer takes over (with a warning)
    with EditMemory.open(path, ENC) as mem:
        assert len(mem) == 1
    assert "taking over the writer lock" in caplog.text


def test_two_writers_in_one_process(tmp_path):
    path = tmp_path / "m"
    with new_durable(path), pytest.raises(LockError, match="this process"):
        EditMemory.open(path, ENC)
    EditMemory.open(path, ENC).close()  # released on close
