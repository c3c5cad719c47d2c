"""How journal segments are laid out on disk: header, record frames, and reading a segment back.

Segment files ``journal/<first lsn, 20 digits>.wal`` (written by `esg_memory.persist.journal`)::

    header   b"ESGJOURN" | u32 format version | u64 first lsn | u32 crc32(previous 20 bytes)

A version-2 record (the only kind written)::

    head     b"ESGR" | u64 lsn | u32 payload length n | u32 crc32(previous 16 bytes)
    payload  n bytes
    trailer  u32 crc32 of each block of head + payload | u64 lsn | u32 n | u32 crc32(crcs, lsn, n) | b"ESGC"

The blocks are head + payload cut at the multiples of 512 bytes *of the file* (sectors, the unit
a disk writes whole), so a frame depends on the offset it is written at. The trailer is the
record's commit marker: it repeats lsn and length, so a record whose bytes are all there can be
told from one cut short even when its head is damaged. A version-1 record (read only) is
``b"ESGR" | u64 lsn | u32 n | u32 crc32(lsn, n, payload) | payload``; in a version-1 segment
anything bad at the end of the last segment is dropped, as it always was.

What a crash during an append (`pwrite` + `fdatasync` that did not return, so the write was never
acknowledged) can leave after the last good record of the last segment: a prefix of the record,
cut at any byte, in which some sectors may read as zeros (a filesystem that grew the file before
the data landed; a block written in part). Such a *torn* record is dropped with a warning. A
version-2 record that is *complete* (its head's length, or a trailer that closes it, says all its
bytes are there) but fails a check is an acknowledged write damaged since: `FormatError`, never
dropped. Damage reads as torn only if the record is the last thing in the file and the damage
leaves its whole share of some sector reading as zeros (the first share starts with b"ESGR" and
the last ends with b"ESGC", bytes no single bit flip or inverted byte zeroes; a share between is a
whole sector), or if it passes a CRC-32 (no burst of 32 bits or less does). docs/reliability.md
lists these residual cases. A bad record followed by a good one is corruption wherever it is.
"""

from __future__ import annotations

import itertools
import logging
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from index import read_regular_file

from ..errors import FormatError, InvalidInputError

__all__ = ["BLOCK", "HEAD", "JOURNAL_VERSION", "SEGMENT", "Segment", "frame", "header", "read_segment"]

logger = logging.getLogger("esg_memory.journal")

# 2: an add's commit record may carry its edits' attachments (compiled adapters of a bulk import), and
# records end in a commit trailer with per-sector checksums (a damaged complete last record is refused,
# not dropped). A version-1 reader would drop attachments silently, so a version-2 segment is refused
# there; version-1 segments read as before.
JOURNAL_VERSION = 2
HEAD = struct.Struct("<8sIQI")  # magic, version, first lsn, crc
_HEAD_MAGIC = b"ESGJOURN"
_REC = struct.Struct("<4sQII")  # magic, lsn, length, crc
_REC_MAGIC = b"ESGR"
_END = struct.Struct("<QII4s")  # lsn, length, crc, magic: the fixed end of a trailer
_END_MAGIC = b"ESGC"
BLOCK = 512  # a sector: the unit a disk writes whole (a 4 KiB filesystem block is 8 of them)
_MAX_RECORD = 1 << 31
SEGMENT = re.compile(r"^(\d{20})\.wal$")


def header(first_lsn: int) -> bytes:
    body = struct.pack("<8sIQ", _HEAD_MAGIC, JOURNAL_VERSION, first_lsn)
    return body + struct.pack("<I", zlib.crc32(body))


# ------------------------------------------------------------------------------------ version 2
def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut at the multiples of `BLOCK`."""
    edges = [lo, *range((lo // BLOCK + 1) * BLOCK, hi, BLOCK), hi]
    return list(itertools.pairwise(edges))


def _size(pos: int, n: int) -> int:
    """Bytes of the version-2 record with an ``n``-byte payload written at offset ``pos``."""
    body_end = pos + _REC.size + n
    n_blocks = (body_end - 1) // BLOCK - pos // BLOCK + 1
    return _REC.size + n + 4 * n_blocks + _END.size


def frame(lsn: int, payload: bytes, offset: int) -> bytearray:
    """The version-2 record of ``payload`` to be written at byte ``offset`` of its segment."""
    if len(payload) > _MAX_RECORD:  # a reader could not vouch for it
        raise InvalidInputError(
            f"a journal record of {len(payload)} bytes is over the {_MAX_RECORD}-byte limit; "
            f"make the write smaller (a bulk import in several batches)"
        )
    head = struct.pack("<4sQI", _REC_MAGIC, lsn, len(payload))
    rec = bytearray(head + struct.pack("<I", zlib.crc32(head)))
    rec += payload
    with memoryview(rec) as view:
        crcs = [zlib.crc32(view[a - offset : b - offset]) for a, b in _blocks(offset, offset + len(rec))]
    table = struct.pack(f"<{len(crcs)}I", *crcs) + struct.pack("<QI", lsn, len(payload))
    rec += table + struct.pack("<I", zlib.crc32(table)) + _END_MAGIC
    return rec


def _head_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(lsn, length) of an intact record head at ``pos``."""
    if len(data) - pos < _REC.size:
        return None
    magic, lsn, n, crc = _REC.unpack_from(data, pos)
    if magic != _REC_MAGIC or zlib.crc32(data[pos : pos + 16]) != crc:
        return None
    return lsn, n


def _trailer_at(data: bytes, view: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(lsn, length) of an intact trailer ending at ``end`` that closes a record starting at ``pos``."""
    if end - pos < _REC.size + 4 + _END.size or end > len(data):
        return None
    lsn, n, crc, magic = _END.unpack_from(data, end - _END.size)
    if magic != _END_MAGIC or n > _MAX_RECORD or pos + _size(pos, n) != end:
        return None
    if zlib.crc32(view[pos + _REC.size + n : end - 8]) != crc:
        return None
    return lsn, n


def _bad_blocks(data: bytes, view: memoryview, pos: int, n: int) -> list[tuple[int, int]]:
    """The sectors of head + payload that fail their checksum in the (intact) trailer."""
    body = _blocks(pos, pos + _REC.size + n)
    table = struct.unpack_from(f"<{len(body)}I", data, pos + _REC.size + n)
    return [(a, b) for (a, b), crc in zip(body, table, strict=True) if zlib.crc32(view[a:b]) != crc]


def _parse_v2(data: bytes, view: memoryview, pos: int) -> tuple[int, bytes, int] | None:
    head = _head_at(data, pos)
    if head is None or head[1] > _MAX_RECORD:
        return None
    lsn, n = head
    end = pos + _size(pos, n)
    if _trailer_at(data, view, pos, end) != head or _bad_blocks(data, view, pos, n):
        return None
    return lsn, data[pos + _REC.size : pos + _REC.size + n], end


def _zero_block(data: bytes, pos: int, lo: int, hi: int) -> bool:
    """Whether the share from ``pos`` on of some sector meeting ``[lo, hi)`` reads as zeros."""
    for b in range(lo // BLOCK * BLOCK, hi, BLOCK):
        s, e = max(b, pos), min(b + BLOCK, len(data))
        if s < e and data.count(0, s, e) == e - s:
            return True
    return False


def _find_trailer(data: bytes, view: memoryview, pos: int) -> tuple[int, int, int] | None:
    """(lsn, length, end) of an intact trailer closing a record at ``pos`` whose head is damaged."""
    m = data.find(_END_MAGIC, pos + _REC.size)
    while m >= 0:
        got = _trailer_at(data, view, pos, m + len(_END_MAGIC))
        if got is not None:
            return *got, m + len(_END_MAGIC)
        m = data.find(_END_MAGIC, m + 1)
    return None


def _damage(data: bytes, view: memoryview, pos: int) -> str | None:
    """Why the failing version-2 record at ``pos`` (nothing good after it) is not a torn write, or None."""
    head = _head_at(data, pos)
    if head is not None:
        lsn, n = head
        if n > _MAX_RECORD:
            return f"journal record {lsn} at byte {pos} has an impossible length {n}"
        end = pos + _size(pos, n)
        if end > len(data):
            return None  # cut short: the append never finished
        trailer_ok = _trailer_at(data, view, pos, end) == head
    else:
        found = _find_trailer(data, view, pos)
        if found is None:
            if len(data) - pos < _REC.size or _zero_block(data, pos, pos, pos + _REC.size):
                return None  # a head cut short, or one that never landed
            return (f"unrecognisable bytes at byte {pos} (not a record head, not zero-filled, no commit "
                    f"trailer): not a torn write")
        lsn, n, end = found
        trailer_ok = True
    body_end = pos + _REC.size + n
    bad = [] if head is not None else [("head", pos, body_end - n)]
    if trailer_ok:
        bad += [("sector", a, b) for a, b in _bad_blocks(data, view, pos, n)]
    else:
        bad.append(("commit trailer", body_end, end))
    if end == len(data) and all(_zero_block(data, pos, lo, hi) for _, lo, hi in bad):
        return None  # the sectors that fail never landed: a torn write
    where = ", ".join(f"{what} at bytes {lo}..{hi}" for what, lo, hi in bad)
    return (f"journal record {lsn} is damaged (complete, checksum fails): {where} of bytes {pos}..{end}; "
            f"refusing to drop an acknowledged write (restore the segment from a backup, or truncate it to "
            f"{pos} bytes to give that write up)")


# ------------------------------------------------------------------------------------ version 1
def _parse_v1(data: bytes, view: memoryview, pos: int) -> tuple[int, bytes, int] | None:
    if len(data) - pos < _REC.size or data[pos : pos + 4] != _REC_MAGIC:
        return None
    _, lsn, n, crc = _REC.unpack_from(data, pos)
    end = pos + _REC.size + n
    if n > _MAX_RECORD or end > len(data):
        return None
    if zlib.crc32(view[pos + _REC.size : end], zlib.crc32(view[pos + 4 : pos + 16])) != crc:
        return None
    return lsn, data[pos + _REC.size : end], end


# ------------------------------------------------------------------------------------ segments
@dataclass
class Segment:
    """One parsed segment file."""

    path: Path
    first_lsn: int
    records: list[tuple[int, bytes]]
    good_end: int  # byte offset after the last good record
    size: int
    version: int = JOURNAL_VERSION


def read_segment(path: Path, last: bool) -> Segment:
    """Parse one segment; a torn tail is dropped (with a warning) only in the last one."""
    try:
        data = read_regular_file(path)  # a segment name could point at a FIFO or /dev/zero
    except OSError as e:
        raise FormatError(f"journal {path.name}: unreadable ({e.strerror or e})") from None
    if len(data) < HEAD.size:
        raise FormatError(f"journal {path.name}: truncated header ({len(data)} bytes)")
    magic, version, first, crc = HEAD.unpack_from(data, 0)
    if magic != _HEAD_MAGIC or zlib.crc32(data[:20]) != crc:
        raise FormatError(f"journal {path.name}: not an esg-memory journal segment (bad header)")
    if version > JOURNAL_VERSION:
        raise FormatError(
            f"journal {path.name}: format version {version} is newer than this library's "
            f"({JOURNAL_VERSION}); upgrade esg-memory"
        )
    if version < 1:
        raise FormatError(f"journal {path.name}: unknown format version {version}")
    m = SEGMENT.match(path.name)
    if m is None or int(m.group(1)) != first:
        raise FormatError(f"journal {path.name}: header says first lsn {first}")
    parse = _parse_v1 if version == 1 else _parse_v2
    view = memoryview(data)
    records: list[tuple[int, bytes]] = []
    pos, expected = HEAD.size, first
    while pos < len(data):
        got = parse(data, view, pos)
        if got is None:
            _bad_tail(path, data, view, pos, last, version)
            break
        lsn, payload, end = got
        if lsn != expected:
            raise FormatError(f"journal {path.name}: record lsn {lsn} where {expected} was expected")
        records.append((lsn, payload))
        expected += 1
        pos = end
    return Segment(path, first, records, pos, len(data), version)


def _bad_tail(path: Path, data: bytes, view: memoryview, pos: int, last: bool, version: int) -> None:
    """A record at ``pos`` does not check out: raise, unless it is a torn last record (then warn)."""
    parse = _parse_v1 if version == 1 else _parse_v2
    later = data.find(_REC_MAGIC, pos + 1)
    while later >= 0 and parse(data, view, later) is None:
        later = data.find(_REC_MAGIC, later + 1)
    if later >= 0:
        raise FormatError(
            f"journal {path.name}: corrupt record at byte {pos} followed by a valid record "
            f"at byte {later} (not a torn write)"
        )
    if not last:
        raise FormatError(f"journal {path.name}: bad record at byte {pos} in a non-final segment")
    why = _damage(data, view, pos) if version >= 2 else None
    if why is not None:
        raise FormatError(f"journal {path.name}: {why}")
    logger.warning(
        "journal %s: dropping a torn last record at byte %d (%d bytes; a write that never returned)",
        path.name, pos, len(data) - pos,
    )
