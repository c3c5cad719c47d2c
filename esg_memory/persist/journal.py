"""The write-ahead journal of a durable `EditMemory` (see `esg_memory.durable` for the directory).

Every write of a durable memory is appended here and fsynced *before* it is applied to the live
memory, so a write whose call returned survives any crash. Records are *physical redo* records:
the result of the write (the new `EditState` of every edit it created or re-fitted, ids deleted,
new image bytes, attachment bytes), serialised like a snapshot (`store.edit_doc`), so replay
re-encodes nothing and reproduces the live memory bit for bit.

Segment files ``journal/<first lsn, 20 digits>.wal``: a header, then one framed record per write
(layout, checksums and what counts as a torn write: `esg_memory.persist.frames`).

A payload is a safetensors blob: the record's JSON in its metadata (``"record"``), arrays and raw
bytes (images as ``blob.<sha256>`` uint8 tensors, an attachment as ``attachment``) as tensors.
Images are inline rather than separate content-addressed files: one file and one fsync per
write instead of three (blob, its directory, the journal), no orphan files after a crash, and a
record is self-contained; the cost (the journal grows by the image bytes, a few KB to a few hundred
KB each) is bounded by compaction. Records carry consecutive lsns (log sequence numbers); a
snapshot records the last lsn it holds, so replay skips what the snapshot already has.

A record cut short at the end of the last segment is a torn write of a call that never returned:
dropped with a warning (and cut off by the next writer). A complete record that fails its checksums
(an acknowledged write damaged since), anything bad followed by a good record, or lsns out of
sequence, is corruption: `FormatError`. A writer resuming a segment of an older format version
starts a new segment; only the current version is written.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from index import fsync_dir

from ..errors import EsgMemoryError, FormatError
from ..memory.ops import Attach, Change, Op
from .frames import HEAD, JOURNAL_VERSION, SEGMENT, Segment, frame, header, read_segment
from .snapshot import bytes_tensors, edit_doc

__all__ = [
    "JOURNAL_VERSION",
    "JournalBrokenError",
    "JournalGapError",
    "JournalWriter",
    "decode",
    "encode_abort",
    "encode_record",
    "header_metadata",
    "list_segments",
    "live_records",
    "read_journal",
    "read_segment",
]

logger = logging.getLogger("esg_memory.journal")



class JournalBrokenError(EsgMemoryError, OSError):
    """The journal could not be written and could not be restored to its last good record.

    Further writes are refused (nothing unjournaled is ever applied); reopen the memory, which
    replays every complete record.
    """


# ------------------------------------------------------------------------------------ segments
def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


def list_segments(jdir: Path) -> list[tuple[int, Path]]:
    """(first lsn, path) of every segment file, in lsn order; foreign files are ignored."""
    try:
        names = os.listdir(jdir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = SEGMENT.match(name)
        if m:
            out.append((int(m.group(1)), jdir / name))
    return sorted(out)


class JournalGapError(FormatError):
    """The journal does not continue the snapshot (a concurrent compaction, or lost segments)."""


def read_journal(jdir: Path, after: int) -> tuple[list[tuple[int, bytes]], list[Segment]]:
    """Records with lsn > ``after`` (consecutive from ``after + 1``) and the parsed segments."""
    segs = list_segments(jdir)
    if not segs:
        # a durable directory always has a segment from its snapshot's lsn + 1 on (opening and
        # compaction create it before anything else, even mid-compaction): none means it was lost
        raise FormatError(f"journal: no segment in {jdir} (records after lsn {after} are missing)")
    # segments wholly at or below the snapshot are leftovers of a compaction that was cut short
    start = 0
    for i, (first, _) in enumerate(segs):
        if first <= after + 1:
            start = i
    parsed = [read_segment(p, last=i == len(segs) - 1) for i, (_, p) in enumerate(segs) if i >= start]
    out: list[tuple[int, bytes]] = []
    expected = after + 1
    for seg in parsed:
        if seg.first_lsn > expected:
            raise JournalGapError(
                f"journal: segment {seg.path.name} starts at lsn {seg.first_lsn}, but the snapshot ends "
                f"at {after} and records {expected}..{seg.first_lsn - 1} are missing"
            )
        for lsn, payload in seg.records:
            if lsn < expected:
                continue
            if lsn != expected:
                raise JournalGapError(f"journal: lsn {lsn} where {expected} was expected")
            out.append((lsn, payload))
            expected += 1
    return out, parsed


# ------------------------------------------------------------------------------------ writer
class JournalWriter:
    """Appends records to the last segment; every append is fsynced before it returns.

    Not thread-safe on its own: the memory calls it under its writer lock.
    """

    def __init__(self, jdir: Path, segment: Segment | None, next_lsn: int) -> None:
        self.dir = jdir
        self.next_lsn = next_lsn
        self.broken: str | None = None
        self.fsync_seconds = 0.0
        self.appends = 0
        self._fd = -1
        self.bytes_since_rotate = 0
        if segment is None:
            self.rotate()
        else:
            self._open(segment.path, segment.good_end, segment.size)
            if segment.version != JOURNAL_VERSION:  # records are framed as their segment says: start one
                self.rotate()

    def _open(self, path: Path, good_end: int, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        if size != good_end:  # drop a torn tail before appending after it
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self.path, self.offset = fd, path, good_end
        self.bytes_since_rotate = good_end - HEAD.size

    def rotate(self) -> Path:
        """Start a new segment at ``next_lsn`` (atomically: temp file, fsync, rename, fsync dir)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / segment_name(self.next_lsn)
        tmp = self.dir / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            f.write(header(self.next_lsn))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        self._open(path, HEAD.size, HEAD.size)
        return path

    def append(self, payload: bytes) -> int:
        """Write one record and fsync it; returns its lsn. On failure nothing is left half-written."""
        if self.broken is not None:
            raise JournalBrokenError(f"the journal is unusable ({self.broken}); reopen the memory")
        lsn = self.next_lsn
        rec = frame(lsn, payload, self.offset)
        t0 = time.perf_counter()
        try:
            view = memoryview(rec)
            done = 0
            while done < len(rec):
                done += os.pwrite(self._fd, view[done:], self.offset + done)
            os.fdatasync(self._fd) if hasattr(os, "fdatasync") else os.fsync(self._fd)
        except BaseException as exc:
            try:
                os.ftruncate(self._fd, self.offset)
                os.fsync(self._fd)
            except OSError as e2:
                self.broken = f"{type(exc).__name__}: {exc}; then truncating failed: {e2}"
            raise
        self.fsync_seconds += time.perf_counter() - t0
        self.appends += 1
        self.offset += len(rec)
        self.bytes_since_rotate += len(rec)
        self.next_lsn = lsn + 1
        return lsn

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ------------------------------------------------------------------------------------ records
def _payload(doc: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    return st_save(tensors, metadata={"record": json.dumps(doc, allow_nan=False, separators=(",", ":"))})


def encode_record(
    op: Op, change: Change, attachment: bytes | Mapping[str, bytes] | None, new_blobs: Mapping[str, bytes]
) -> bytes:
    """The redo record of one write: its logical ``op`` plus every state it installs.

    An `Attach` is an ``attach`` record carrying the bytes; anything else a ``commit`` record with the
    states (vectors only for the edits whose vectors changed), deleted ids and ``new_blobs`` (the
    images the memory did not hold yet). An add's attachments (``attachment``: bytes by sha256) ride
    in the same commit record as ``attachment.<sha256>`` tensors (listed under ``"attachments"``).
    """
    if isinstance(op, Attach):
        tensors = {"attachment": np.frombuffer(bytes(attachment or b""), dtype=np.uint8)}
        return _payload({"kind": "attach", "op": op.to_dict()}, tensors)
    tensors: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    if isinstance(attachment, Mapping) and attachment:
        extra["attachments"] = bytes_tensors(attachment, "attachment", tensors)
    over = change.states
    states = [
        edit_doc(st, tensors, vectors=eid in change.changed_vec)
        for eid in sorted(over)
        if (st := over[eid]) is not None
    ]
    doc = {
        "kind": "commit",
        "op": op.to_dict(),
        "states": states,
        "deleted": change.deleted,
        "blobs": bytes_tensors(new_blobs, "blob", tensors),
        **extra,
    }
    return _payload(doc, tensors)


def encode_abort(lsn: int) -> bytes:
    """Voids record ``lsn``: written when applying a journaled write failed (the caller saw an error)."""
    return _payload({"kind": "abort", "lsn": int(lsn)}, {})


def decode(lsn: int, payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        tensors = st_load(payload)
        meta = header_metadata(payload)
        doc = json.loads(meta["record"])
    except (SafetensorError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"journal record {lsn}: undecodable ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("kind") not in ("commit", "attach", "abort"):
        raise FormatError(f"journal record {lsn}: unknown kind")
    return doc, tensors


def header_metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (safetensors.numpy.load drops it)."""
    (n,) = struct.unpack_from("<Q", payload, 0)
    header = json.loads(payload[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise KeyError("__metadata__")
    return meta


def live_records(records: list[tuple[int, bytes]]) -> list[tuple[int, dict, dict]]:
    """Decoded records minus aborted ones (an abort voids the record just before it)."""
    out: list[tuple[int, dict, dict]] = []
    for lsn, payload in records:
        doc, tensors = decode(lsn, payload)
        if doc["kind"] == "abort":
            if not out or out[-1][0] != doc.get("lsn"):
                raise FormatError(f"journal record {lsn}: abort of lsn {doc.get('lsn')}, not the last record")
            out.pop()
            continue
        out.append((lsn, doc, tensors))
    return out
