"""Saving and loading an `EditMemory` as a versioned directory of plain data.

Layout (format version 2)::

    memory.json              format, format_version, encoder name/dim, config, next_id, retired ids,
                             edits (with every version and its scope), attachment records (edit,
                             version, kind, sha256, bytes), each file's sha256 and size; in a durable
                             directory's snapshot also ``journal: {lsn, lineage}`` (the last journal
                             record it holds; see `esg_memory.durable`)
    keys.safetensors         per edit: candidates, own negatives, question embedding, thresholds; the pool
    blobs.safetensors        every stored image once, a uint8 tensor ``blob.<sha256 of its bytes>``
    attachments.safetensors  the attachments' bytes, one uint8 tensor ``attachment.<sha256>`` per content
    index/                   the `ScopedIndex`, written by its own `save`

Images and attachments are packed (as in journal records, `bytes_tensors` / `checked_bytes`) so a
snapshot is a constant handful of files whatever it holds: one file and one fsync per image made a
100k-edit save take minutes (issue #20). A pack with nothing in it is a safetensors file of zero
tensors. Format version 1 (still read) kept them one file each: ``blobs/<sha256>`` and
``attachments/<file>``, the file named in its attachment record.

The directory is written with `index.atomic_directory` (a crash leaves the old one). `read_snapshot`
checks everything it reads — format and version, encoder identity, checksums of every file and of
every image and attachment, shapes — and refuses with `FormatError` / `EncoderMismatchError` rather
than guess; no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from index import (
    NotReplaceableError,
    ScopedIndex,
    atomic_directory,
    check_replaceable,
    read_regular_file,
    recover_dir,
)
from index.errors import ScopedIndexError

from ..config import MemoryConfig
from ..errors import ConfigError, EncoderMismatchError, FormatError, InvalidInputError
from ..memory.state import EditState, EditVectors, LocalityPool, MemorySnapshot
from ..scope import ScopeFit, pairwise_sims
from ..types import EditVersion
from ..validate import check_encoder

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "bytes_tensors",
    "checked_bytes",
    "edit_doc",
    "edit_from_doc",
    "read_snapshot",
    "save_snapshot",
    "tensor_reader",
]

logger = logging.getLogger("esg_memory.store")

FORMAT_NAME = "esg-memory"
FORMAT_VERSION = 2
_SHA = re.compile(r"^[0-9a-f]{64}$")
_BLOBS = "blobs.safetensors"
_ATTACHMENTS = "attachments.safetensors"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bytes_tensors(items: Mapping[str, bytes], prefix: str, tensors: dict[str, np.ndarray]) -> list[str]:
    """Add ``items`` (bytes by their sha256) to ``tensors`` as uint8 ``{prefix}.{sha}``; the shas, sorted.

    Content-addressed raw bytes inside a safetensors file: the images and attachments of snapshot
    packs and of journal records. `checked_bytes` reads them back.
    """
    for sha, data in items.items():
        tensors[f"{prefix}.{sha}"] = np.frombuffer(bytes(data), dtype=np.uint8)
    return sorted(items)


def checked_bytes(
    shas: Iterable[Any], tensors: dict[str, np.ndarray], prefix: str, what: str, where: str
) -> dict[str, bytes]:
    """The bytes of each ``{prefix}.{sha}`` tensor, by sha; `FormatError` naming any that is bad.

    Each must be there, be raw bytes and hash to its own name: a pack's checksum only says that the
    file is the one written, not that what was written was right.
    """
    out = {}
    for sha in shas:
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise FormatError(f"{where}: bad {what} reference {sha!r}")
        t = tensors.get(f"{prefix}.{sha}")
        if t is None:
            raise FormatError(f"{where}: {what} {sha} missing")
        if t.dtype != np.uint8 or t.ndim != 1:
            raise FormatError(f"{where}: {what} {sha} has dtype {t.dtype} / shape {t.shape}, not bytes")
        data = t.tobytes()
        if _sha(data) != sha:
            raise FormatError(f"{where}: {what} {sha} fails its checksum (corrupted)")
        out[sha] = data
    return out


def edit_doc(st: EditState, tensors: dict[str, np.ndarray], vectors: bool = True) -> dict[str, Any]:
    """One edit as JSON (returned) plus its arrays (added to ``tensors`` as ``e<id>.*``).

    Shared by snapshots and journal records. ``vectors=False`` leaves out the encoded candidates
    (a re-fit changes only the fit; the journal then records the fit alone).
    """
    eid = st.id
    v = st.vec
    tensors[f"e{eid}.thr"] = np.ascontiguousarray(st.fit.thresholds, dtype=np.float32)
    doc: dict[str, Any] = {
        "id": eid,
        "created_at": st.created_at,
        "updated_at": st.updated_at,
        "metadata": st.metadata,
        "versions": [x.to_dict() for x in st.versions],
        "key_index": list(st.fit.key_index),
        "nbrs": [[n, s] for n, s in sorted(st.nbrs.items())],
    }
    if vectors:
        tensors[f"e{eid}.cand"] = np.ascontiguousarray(v.cand, dtype=np.float32)
        tensors[f"e{eid}.own_neg"] = np.ascontiguousarray(v.own_neg, dtype=np.float32).reshape(
            -1, v.cand.shape[1]
        )
        tensors[f"e{eid}.qtext"] = np.ascontiguousarray(v.qtext, dtype=np.float32)
        tensors[f"e{eid}.ivec"] = np.ascontiguousarray(v.ivec, dtype=np.float32)
        doc["cand_labels"] = list(v.cand_labels)
        doc["own_neg_labels"] = list(v.own_neg_labels)
    return doc


def tensor_reader(tensors: dict[str, np.ndarray], dim: int, where: str):
    """``get(name, ndim)``: a checked float32 array from ``tensors`` (FormatError otherwise)."""

    def get(name: str, ndim: int) -> np.ndarray:
        if name not in tensors:
            raise FormatError(f"{where}: missing tensor {name!r}")
        t = tensors[name]
        if (
            t.dtype != np.float32
            or t.ndim != ndim
            or (ndim == 2 and t.shape[1] != dim)
            or (ndim == 1 and name.endswith(("qtext", "ivec")) and t.shape[0] != dim)
            or not np.all(np.isfinite(t))
        ):
            raise FormatError(f"{where}: tensor {name!r} has dtype {t.dtype} / shape {t.shape}")
        return t

    return get


def edit_from_doc(e: dict[str, Any], tensor, vec: EditVectors | None = None) -> EditState:
    """Inverse of `edit_doc`; ``vec`` supplies the vectors when the doc has none (journal re-fits)."""
    eid = int(e["id"])
    versions = tuple(EditVersion.from_dict(v) for v in e["versions"])
    if not versions or [v.version for v in versions] != list(range(1, len(versions) + 1)):
        raise FormatError(f"edit {eid}: versions must be 1..n")
    if "cand_labels" in e:
        vec = EditVectors(
            cand=tensor(f"e{eid}.cand", 2),
            cand_labels=tuple(str(x) for x in e["cand_labels"]),
            own_neg=tensor(f"e{eid}.own_neg", 2),
            own_neg_labels=tuple(str(x) for x in e["own_neg_labels"]),
            qtext=tensor(f"e{eid}.qtext", 1),
            ivec=tensor(f"e{eid}.ivec", 1),
        )
    elif vec is None:
        raise FormatError(f"edit {eid}: no vectors recorded and no earlier state to take them from")
    ki = tuple(int(i) for i in e["key_index"])
    thr = tensor(f"e{eid}.thr", 1)
    cur = versions[-1]
    if (
        not ki
        or len(ki) != thr.shape[0]
        or min(ki) < 0
        or max(ki) >= vec.cand.shape[0]
        or len(cur.scope) != len(ki)
        or len(vec.cand_labels) != vec.cand.shape[0]
        or len(vec.own_neg_labels) != vec.own_neg.shape[0]
    ):
        raise FormatError(f"edit {eid}: keys, thresholds and labels disagree")
    fit = ScopeFit(key_index=ki, thresholds=thr, records=tuple(cur.scope), uncovered=tuple(cur.uncovered))
    meta = e["metadata"]
    if not isinstance(meta, dict):
        raise FormatError(f"edit {eid}: metadata must be an object")
    return EditState(
        id=eid,
        created_at=float(e["created_at"]),
        updated_at=float(e["updated_at"]),
        metadata=meta,
        versions=versions,
        vec=vec,
        fit=fit,
        nbrs={int(n): float(s) for n, s in e["nbrs"]},
    )


def save_snapshot(snap: MemorySnapshot, path: Path, journal: dict[str, Any] | None = None) -> None:
    """Write ``snap`` (see `EditMemory.snapshot`) to ``path`` atomically.

    ``journal`` (``{"lsn", "lineage"}``) marks a durable snapshot: the journal records it already
    holds (see `esg_memory.journal`); a plain export has none.
    """
    if path.exists() and not path.is_dir():
        # atomic_directory renames whatever is at ``path`` away: never a file or a device (/dev/null!)
        raise ConfigError(f"{str(path)!r} exists and is not a directory; refusing to replace it")
    tensors: dict[str, np.ndarray] = {
        "pool": np.ascontiguousarray(snap.pool.keys, dtype=np.float32),
        "pool_images": np.ascontiguousarray(snap.pool.image_vecs, dtype=np.float32),
    }
    edits = [edit_doc(snap.edits[eid], tensors) for eid in sorted(snap.edits)]
    keys_bytes = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    attachments = []
    by_sha: dict[str, bytes] = {}
    for (eid, ver, kind), data in sorted(snap.attachments.items()):
        sha = _sha(data)
        by_sha[sha] = data  # equal bytes attached twice are stored once
        attachments.append({"edit": eid, "version": ver, "kind": kind, "sha256": sha, "bytes": len(data)})
    blob_tensors: dict[str, np.ndarray] = {}
    att_tensors: dict[str, np.ndarray] = {}
    bytes_tensors(snap.blobs, "blob", blob_tensors)
    bytes_tensors(by_sha, "attachment", att_tensors)
    # no __metadata__ (the format is memory.json's): safetensors writes it in hash-map order, and
    # without it two saves of the same memory write the same pack bytes
    files = {
        "keys.safetensors": keys_bytes,
        _BLOBS: st_save(blob_tensors),
        _ATTACHMENTS: st_save(att_tensors),
    }
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "encoder": {
            "name": snap.encoder.name,
            "dim": int(snap.encoder.dim),
            "spec": getattr(snap.encoder, "spec", None),
        },
        "config": snap.config.to_dict(),
        "backend": snap.backend,
        "next_id": snap.next_id,
        "retired": sorted(snap.retired),
        "pool": {"n": int(snap.pool.keys.shape[0]), "images": list(snap.pool.images)},
        "edits": edits,
        "attachments": attachments,
        "files": {name: {"sha256": _sha(data), "bytes": len(data)} for name, data in files.items()},
    }
    if journal is not None:
        doc["journal"] = dict(journal)
    doc["checksum"] = doc_checksum(doc)
    try:
        check_replaceable(path, "memory.json")
    except NotReplaceableError as e:
        raise InvalidInputError(f"cannot save the memory there: {e}") from None
    with atomic_directory(path, "memory.json") as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        snap.index.save(tmp / "index")
        (tmp / "memory.json").write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    logger.info("saved %d edits to %s", len(edits), path)


def doc_checksum(doc: dict[str, Any]) -> str:
    """SHA-256 of ``doc``'s canonical JSON (sorted keys, no spaces); floats round-trip exactly."""
    return _sha(json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def _read(path: Path, what: str) -> bytes:
    try:
        return read_regular_file(path)  # never a FIFO or /dev/zero planted in a hostile directory
    except FileNotFoundError:
        raise FormatError(f"{what}: missing file {path.name!r}") from None
    except OSError as e:
        raise FormatError(f"{what}: unreadable ({e.strerror or e})") from None


def _checked(path: Path, sha: str, size: int, what: str) -> bytes:
    data = _read(path, what)
    if len(data) != size:
        raise FormatError(f"{what}: {len(data)} bytes, expected {size} (truncated or replaced)")
    if _sha(data) != sha:
        raise FormatError(f"{what}: checksum mismatch (corrupted)")
    return data


def _pack(path: Path, doc: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    """The tensors of safetensors file ``name``, checked against its size and sha256 in memory.json."""
    f = doc["files"][name]
    try:
        return st_load(_checked(path / name, f["sha256"], f["bytes"], name))
    except SafetensorError as e:
        raise FormatError(f"{name}: {e}") from None


def _resolve_encoder(enc_doc: dict[str, Any], encoder: Any) -> Any:
    if encoder is None:
        spec = enc_doc.get("spec")
        if not spec:
            raise ConfigError(f"this memory was made with encoder {enc_doc.get('name')!r}; pass encoder=")
        from ..encoders import create_encoder

        encoder = create_encoder(spec)
    check_encoder(encoder)
    diffs = []
    if encoder.name != enc_doc.get("name"):
        diffs.append(f"name {enc_doc.get('name')!r} (saved) vs {encoder.name!r} (given)")
    if int(encoder.dim) != enc_doc.get("dim"):
        diffs.append(f"dim {enc_doc.get('dim')} (saved) vs {int(encoder.dim)} (given)")
    if diffs:
        raise EncoderMismatchError("memory was saved with another encoder: " + "; ".join(diffs))
    return encoder


def read_snapshot(path: Path, encoder: Any, backend: str | None) -> MemorySnapshot:
    """The memory saved at ``path``, every file checked (`FormatError`, `EncoderMismatchError`)."""
    if not isinstance(path, Path) or not path.exists():
        recover_dir(path)
    if not path.is_dir():
        raise FormatError(f"{str(path)!r} is not a memory directory")
    raw = _read(path / "memory.json", "memory.json")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"memory.json is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FormatError("memory.json is not an esg-memory file")
    fv = doc.get("format_version")
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise FormatError("memory.json has no integer format_version")
    if fv > FORMAT_VERSION:
        raise FormatError(
            f"memory format version {fv} is newer than this library's ({FORMAT_VERSION}); upgrade"
        )
    if fv < 1:
        raise FormatError(f"unknown memory format version {fv}")
    if "checksum" in doc and doc.pop("checksum") != doc_checksum(doc):
        # the other files are checksummed in here; this catches damage to memory.json itself
        raise FormatError("memory.json: checksum mismatch (corrupted or edited by hand)")
    try:
        return _build(path, doc, encoder, backend)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, (FormatError, EncoderMismatchError, ConfigError)):
            raise
        raise FormatError(f"memory.json is inconsistent: {type(e).__name__}: {e}") from None


def _build(path: Path, doc: dict[str, Any], encoder: Any, backend: str | None) -> MemorySnapshot:
    encoder = _resolve_encoder(doc["encoder"], encoder)
    config = MemoryConfig.from_dict(doc["config"])
    backend = backend or doc["backend"]
    tensors = _pack(path, doc, "keys.safetensors")
    dim = int(encoder.dim)
    tensor = tensor_reader(tensors, dim, "keys.safetensors")
    pool_keys = tensor("pool", 2)
    if pool_keys.shape[0] != doc["pool"]["n"]:
        raise FormatError("locality pool size differs from memory.json")
    images = tuple(str(s) for s in doc["pool"]["images"])
    pool = LocalityPool(keys=pool_keys, images=images, image_vecs=tensor("pool_images", 2))
    if pool.image_vecs.shape[0] != len(pool.images):
        raise FormatError("locality pool images differ from memory.json")
    next_id = int(doc["next_id"])
    retired = frozenset(int(i) for i in doc["retired"])
    edits: dict[int, EditState] = {}
    for e in doc["edits"]:
        st = edit_from_doc(e, tensor)
        edits[st.id] = st
    cap = config.max_neighbours
    for eid, st in edits.items():
        if any(n not in edits or n == eid for n in st.nbrs) or (cap and len(st.nbrs) > cap):
            raise FormatError(f"edit {eid}: neighbour links name unknown edits or exceed max_neighbours")
        for n, s in st.nbrs.items():
            lo, hi = (st, edits[n]) if eid < n else (edits[n], st)
            if float(pairwise_sims(lo.vec.cand, hi.vec.cand).max()) != s:
                raise FormatError(f"edit {eid}: stored link to edit {n} does not match its keys")
        if eid in retired or eid >= next_id:
            raise FormatError(f"edit {eid}: id conflicts with next_id / retired ids")
    wanted = set(pool.images)
    for st in edits.values():
        for v in st.versions:
            wanted.add(v.image)
            wanted.update(p.image for p in v.positives)
            wanted.update(fb.image for fb in v.feedback)
    wanted.discard(None)
    packed = doc["format_version"] >= 2
    if packed:
        blobs = checked_bytes(sorted(wanted), _pack(path, doc, _BLOBS), "blob", "image blob", _BLOBS)
        att_pack = _pack(path, doc, _ATTACHMENTS)
    else:
        blobs = _v1_blobs(path, sorted(wanted))
    attachments: dict[tuple[int, int, str], bytes] = {}
    for a in doc["attachments"]:
        eid, ver, kind = int(a["edit"]), int(a["version"]), str(a["kind"])
        if eid not in edits or not 1 <= ver <= edits[eid].current.version:
            raise FormatError(f"attachment for unknown edit/version {eid}/{ver}")
        if not packed:
            attachments[(eid, ver, kind)] = _v1_attachment(path, a)
            continue
        sha = a["sha256"]
        data = checked_bytes([sha], att_pack, "attachment", "attachment", _ATTACHMENTS)[sha]
        if len(data) != a["bytes"]:
            raise FormatError(f"{_ATTACHMENTS}: attachment {sha}: {len(data)} bytes, expected {a['bytes']}")
        attachments[(eid, ver, kind)] = data
    try:
        ix = ScopedIndex.load(path / "index")
    except ScopedIndexError as e:
        raise FormatError(f"index: {e}") from None
    if ix.dim != dim or sorted(int(i) for i in ix.edit_ids()) != sorted(edits):
        raise FormatError("index does not hold the same edits as memory.json")
    for eid, st in edits.items():
        k, t = ix.keys_of(eid)
        if (
            k.shape != st.keys.shape
            or not np.array_equal(t, st.fit.thresholds)
            or not np.allclose(k, st.keys, atol=1e-6)
        ):
            raise FormatError(f"index keys of edit {eid} differ from memory.json")
    journal = doc.get("journal")
    if journal is not None and (
        not isinstance(journal, dict)
        or not isinstance(journal.get("lsn"), int)
        or journal["lsn"] < 0
        or not isinstance(journal.get("lineage"), str)
    ):
        raise FormatError("memory.json: bad journal position")
    logger.info("loaded %d edits from %s", len(edits), path)
    snap = MemorySnapshot(
        encoder=encoder,
        config=config,
        backend=backend,
        next_id=next_id,
        retired=retired,
        pool=pool,
        edits=edits,
        blobs=blobs,
        attachments=attachments,
        index=ix,
        journal=journal,
    )
    return snap if backend == ix.backend else _with_backend(snap, backend)


def _v1_blobs(path: Path, shas: list[Any]) -> dict[str, bytes]:
    """Format 1's images: one file ``blobs/<sha256>`` each."""
    blobs = {}
    for sha in shas:
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise FormatError(f"bad image reference {sha!r}")
        data = _read(path / "blobs" / sha, "blobs")
        if _sha(data) != sha:
            raise FormatError(f"blobs/{sha}: checksum mismatch (corrupted)")
        blobs[sha] = data
    return blobs


def _v1_attachment(path: Path, a: dict[str, Any]) -> bytes:
    """Format 1's attachment record ``a``: its bytes in ``attachments/<a["file"]>``."""
    name = str(a["file"])
    if "/" in name or "\\" in name or name.startswith("."):
        raise FormatError(f"attachment file name {name!r} is not allowed")
    return _checked(path / "attachments" / name, a["sha256"], a["bytes"], f"attachments/{name}")


def _with_backend(snap: MemorySnapshot, backend: str) -> MemorySnapshot:
    """The loaded keys in an index of another backend (the caller asked for one)."""
    try:
        ix = ScopedIndex(int(snap.encoder.dim), backend=backend)
    except ScopedIndexError as e:
        raise InvalidInputError(f"index: {e}") from None
    for eid in sorted(snap.edits):
        st = snap.edits[eid]
        ix.add(np.full(len(st.fit.key_index), eid, dtype=np.int64), st.keys, st.fit.thresholds)
    ix.prepare_rule_out()  # not in the first routed call
    return replace(snap, index=ix)
