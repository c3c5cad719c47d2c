"""On-disk format of a `ScopedIndex` (a directory, no pickle), written from and read into an `IndexState`.

This module knows the files, not the index: `ScopedIndex.save`/`load` (and `index.write_index` /
`index.read_index`) hand it the index's parts as an `IndexState`, so it never imports
``scoped`` nor touches an index's private attributes.

```
<dir>/index.json          format tag + version, dim, backend, metric, counts, config, structure,
                          and {"sha256", "bytes"} of every other file
<dir>/keys.npy            float32 (slots, dim)  unit keys (rows of removed keys stay until compaction)
<dir>/key_edit_ids.npy    int64   (slots,)      owning edit id per slot, -1 = removed
<dir>/key_thresholds.npy  float32 (slots,)      threshold per slot
<dir>/structure.faiss     the FAISS structure (faiss.serialize_index), ids = slots
```

The directory is written with `index.fs.atomic_directory` (temp dir, fsync, rename), so a crash
leaves the previous save intact. `read_state` checks every checksum *before* handing bytes to FAISS or
numpy and cross-checks the arrays against each other and against the structure.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ._table import KeyTable
from .backends import BACKENDS, FlatStructure, HNSWStructure, IndexConfig, IVFStructure, Structure
from .errors import IndexFormatError, InvalidArgumentError, ScopedIndexError
from .fs import NotReplaceableError, atomic_directory, check_replaceable, read_regular_file, recover_dir

__all__ = ["FORMAT", "FORMAT_VERSION", "IndexState", "read_state", "write_state"]

FORMAT = "esg-memory.scoped-index"
FORMAT_VERSION = 1
_FILES = ("keys.npy", "key_edit_ids.npy", "key_thresholds.npy", "structure.faiss")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class IndexState:
    """Everything a saved index holds: its settings, its key table and the FAISS structure over it."""

    dim: int
    backend: str
    config: IndexConfig
    table: KeyTable
    structure: Structure


def write_state(state: IndexState, path: str | os.PathLike) -> None:
    """Serialise ``state`` into directory ``path``, atomically (the caller keeps it from changing)."""
    t, s = state.table, state.structure
    blobs = {
        "keys.npy": _npy_bytes(t.vecs[: t.n]),
        "key_edit_ids.npy": _npy_bytes(t.edit[: t.n]),
        "key_thresholds.npy": _npy_bytes(t.thr[: t.n]),
        "structure.faiss": faiss.serialize_index(s.index).tobytes(),
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dim": state.dim,
        "backend": state.backend,
        "metric": "cosine",
        "counts": {"edits": t.n_edits, "keys": t.n_alive, "slots": t.n, "removed_slots": t.n_dead},
        "structure": s.describe(),
        "config": state.config.to_dict(),
        "faiss_version": faiss.__version__,
        "files": {name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                  for name, b in blobs.items()},
    }
    meta["checksum"] = _meta_checksum(meta)
    try:
        check_replaceable(path, "index.json")
    except NotReplaceableError as e:
        raise InvalidArgumentError(f"cannot save the index there: {e}") from None
    with atomic_directory(path, "index.json") as tmp:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def _meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta``'s canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fail(path: Path, why: str) -> IndexFormatError:
    return IndexFormatError(f"cannot load scoped index from {path}: {why}")


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise _fail(path, "not a directory")
    meta_path = path / "index.json"
    if not meta_path.is_file():
        raise _fail(path, "no index.json (not a ScopedIndex directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"index.json is unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"index.json is not a {FORMAT} file (foreign directory?)")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(path, f"unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(path, f"format_version {version} is newer than this library supports ({FORMAT_VERSION}); "
                          "upgrade esg-memory")
    if "checksum" in meta and meta.pop("checksum") != _meta_checksum(meta):
        # the data files are checksummed in index.json; this catches damage to index.json itself
        raise _fail(path, "index.json checksum mismatch (corrupt or modified)")
    return meta


def _read_files(path: Path, meta: dict[str, Any]) -> dict[str, bytes]:
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise _fail(path, f"index.json must list exactly {sorted(_FILES)}")
    out = {}
    for name in _FILES:
        entry = files[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise _fail(path, f"bad checksum entry for {name}")
        try:
            data = read_regular_file(path / name)
        except OSError as e:
            raise _fail(path, f"{name} is missing or unreadable ({e.strerror or e})") from None
        if len(data) != entry.get("bytes"):
            raise _fail(path, f"{name} has {len(data)} bytes, expected {entry.get('bytes')} (truncated?)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _fail(path, f"checksum mismatch for {name} (corrupt or modified)")
        out[name] = data
    return out


def _load_npy(path: Path, name: str, data: bytes, dtype: type, ndim: int) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _fail(path, f"{name} is not a valid .npy file: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
        raise _fail(path, f"{name} must be a {ndim}-D {np.dtype(dtype)} array")
    return arr


def _load_structure(path: Path, data: bytes, kind: str, dim: int, table: KeyTable,
                    cfg: IndexConfig, desc: dict) -> Structure:
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise _fail(path, f"structure.faiss is not a FAISS index: {str(e).splitlines()[0]}") from None
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _fail(path, "structure.faiss has the wrong dimension or metric")
    s: Structure
    if kind == "flat" and isinstance(index, faiss.IndexIDMap2):
        s = FlatStructure(dim, index)
        if not np.array_equal(faiss.vector_to_array(index.id_map), np.arange(index.ntotal)):
            raise _fail(path, "flat structure ids do not match the key table")
    elif kind == "hnsw" and isinstance(index, faiss.IndexHNSWFlat):
        s = HNSWStructure(dim, cfg, index)
    elif kind == "ivf" and isinstance(index, faiss.IndexIVFFlat):
        nprobe, trained_n = desc.get("nprobe"), desc.get("trained_n")
        if not all(isinstance(v, int) and v >= 1 for v in (nprobe, trained_n)):
            raise _fail(path, "ivf structure description lacks nprobe/trained_n")
        if index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        s = IVFStructure(index, nprobe, trained_n)
    else:
        raise _fail(path, f"structure.faiss holds a {type(index).__name__}, expected a {kind} structure")
    expected = table.n if s.keeps_dead else table.n_alive
    if s.ntotal != expected:
        raise _fail(path, f"structure holds {s.ntotal} vectors, key table implies {expected}")
    return s


def read_state(path: str | os.PathLike) -> IndexState:
    """Read and cross-check the directory ``path``; `IndexFormatError` on anything unexpected."""
    path = Path(path)
    recover_dir(path)
    meta = _read_meta(path)
    dim, backend = meta.get("dim"), meta.get("backend")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or backend not in BACKENDS:
        raise _fail(path, "index.json has a bad dim or backend")
    desc = meta.get("structure")
    if not isinstance(desc, dict) or desc.get("kind") not in ("flat", "ivf", "hnsw"):
        raise _fail(path, "index.json has a bad structure description")
    try:
        cfg = IndexConfig.from_dict(meta.get("config") or {})
    except (ScopedIndexError, TypeError) as e:
        raise _fail(path, f"bad config: {e}") from None
    blobs = _read_files(path, meta)
    vecs = _load_npy(path, "keys.npy", blobs["keys.npy"], np.float32, 2)
    edit = _load_npy(path, "key_edit_ids.npy", blobs["key_edit_ids.npy"], np.int64, 1)
    thr = _load_npy(path, "key_thresholds.npy", blobs["key_thresholds.npy"], np.float32, 1)
    n = edit.shape[0]
    if vecs.shape != (n, dim) or thr.shape != (n,):
        raise _fail(path, f"array shapes disagree: keys {vecs.shape}, ids {edit.shape}, "
                          f"thresholds {thr.shape}")
    if (edit < -1).any() or not np.isfinite(vecs).all() or not np.isfinite(thr).all():
        raise _fail(path, "arrays hold invalid values (ids < -1 or non-finite numbers)")
    norm_err = np.abs(np.linalg.norm(vecs, axis=1) - 1).max() if n else 0.0
    if n and (np.abs(thr).max() > 1 or norm_err > 1e-3):
        raise _fail(path, "thresholds outside [-1, 1] or keys not unit length")
    table = KeyTable.from_arrays(vecs, edit, thr)
    counts = meta.get("counts") or {}
    if counts.get("edits") != table.n_edits or counts.get("keys") != table.n_alive:
        raise _fail(path, "counts in index.json do not match the arrays")
    struct = _load_structure(path, blobs["structure.faiss"], desc["kind"], dim, table, cfg, desc)
    return IndexState(dim, backend, cfg, table, struct)
