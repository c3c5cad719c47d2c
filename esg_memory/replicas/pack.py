"""A snapshot directory packed into one blob (and back), for the store's ``esg_snapshot`` rows.

The blob is a safetensors file: one ``uint8`` tensor per file of the `esg_memory.persist.snapshot`
directory (named by its relative path) and ``__metadata__`` ``{"format": "esg-packed-dir", "version"}``.
No pickle; the snapshot inside keeps its own format version and checksums.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..errors import FormatError
from ..memory.state import MemorySnapshot
from ..persist import read_snapshot, save_snapshot
from ..persist.journal import header_metadata

__all__ = ["PACK_VERSION", "pack_snapshot", "unpack_snapshot"]

PACK_VERSION = 1
_FORMAT = "esg-packed-dir"


def pack_snapshot(snapshot: MemorySnapshot, position: dict[str, Any]) -> bytes:
    """``snapshot`` saved as a directory (recording the log ``position``) and packed into bytes."""
    with tempfile.TemporaryDirectory(prefix="esg-pack-") as tmp:
        root = Path(tmp) / "snapshot"
        save_snapshot(snapshot, root, journal=position)
        tensors = {
            p.relative_to(root).as_posix(): np.frombuffer(p.read_bytes(), dtype=np.uint8)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
    return st_save(tensors, metadata={"format": _FORMAT, "version": str(PACK_VERSION)})


def unpack_snapshot(packed: bytes, encoder: Any, backend: str | None, where: str) -> MemorySnapshot:
    """The snapshot a `pack_snapshot` blob holds (`FormatError` for a damaged or newer one)."""
    try:
        tensors = st_load(packed)
        meta = header_metadata(packed)
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise FormatError(f"{where}: undecodable packed snapshot ({type(e).__name__})") from None
    if meta.get("format") != _FORMAT:
        raise FormatError(f"{where}: not a packed esg-memory snapshot")
    if not meta.get("version", "").isdigit() or int(meta["version"]) > PACK_VERSION:
        raise FormatError(f"{where}: packed snapshot version {meta.get('version')!r} is too new")
    with tempfile.TemporaryDirectory(prefix="esg-unpack-") as tmp:
        root = Path(tmp) / "snapshot"
        for name, arr in tensors.items():
            path = (root / name).resolve()
            if root.resolve() not in path.parents or arr.dtype != np.uint8:
                raise FormatError(f"{where}: packed snapshot holds a bad entry {name!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(arr.tobytes())
        return read_snapshot(root, encoder, backend)

