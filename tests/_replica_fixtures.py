"""Helpers for the shared-store tests (`test_replicas.py`, `test_store_contract.py`).

`saved_state` is the bit-for-bit fingerprint of a memory: everything `EditMemory.save` writes, with
what two saves of the same state legitimately differ in taken out. Safetensors writes its
``__metadata__`` in hash-map order, so ``keys.safetensors`` (and the sha256 / checksum memory.json
records for it) differ between saves: its header is compared parsed and its data section as bytes.
The index directory is the physical layout of the `ScopedIndex`, which depends on the history of
installs (a live memory keeps tombstoned slots of re-fitted keys; one replayed from a log installs
each edit once): its live rows are compared as a set of (edit id, threshold, key) bytes.
`routing` is every array `route` returns for a fixed probe set, as raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image

from esg_memory.errors import StaleStateError
from esg_memory.memory import EditMemory
from esg_memory.replicas import store as store_mod

__all__ = [
    "ENC",
    "PROBES",
    "StaleCounter",
    "close_all",
    "edit_spec",
    "keys_state",
    "log_ops",
    "open_all",
    "routing",
    "saved_state",
    "wait_until",
]

ENC = HashKeyEncoder(dim=32)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ("circle", "square")
PROBES = [
    (shape_image(c, s, shift=1), f"what colour is the {s}?") for c in COLORS for s in SHAPES
] + [(None, "who wrote book 1?"), (None, "who is the author of book 2?"), (None, "is it sunny today?")]
_dirs = count()


def edit_spec(k: int, tag: str = "") -> dict[str, Any]:
    """A small edit; neighbouring ``k`` share a question, so adds re-fit each other's scopes."""
    c, s = COLORS[k % len(COLORS)], SHAPES[k % 2]
    if k % 4 == 3:
        return {"question": f"who wrote book {k}{tag}?", "answer": f"author {k}{tag}"}
    return {"image": png_bytes(shape_image(c, s, shift=k % 3)), "question": f"what colour is the {s}?",
            "answer": f"{c} {k}{tag}", "metadata": {"k": k, "tag": tag}}


def _keys_file(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _index_state(d: Path) -> dict[str, Any]:
    meta = json.loads((d / "index.json").read_text())
    for k in ("checksum", "files"):
        meta.pop(k)
    meta["counts"] = {k: v for k, v in meta["counts"].items() if k not in ("slots", "removed_slots")}
    ids, thr, keys = (np.load(d / f, allow_pickle=False) for f in ("key_edit_ids.npy", "key_thresholds.npy",
                                                                    "keys.npy"))
    live = ids >= 0
    rows = sorted(zip(ids[live].tolist(), (t.tobytes() for t in thr[live]), (k.tobytes() for k in keys[live]),
                      strict=True))
    return {"index.json": meta, "rows": rows, "dtypes": (ids.dtype.str, thr.dtype.str, keys.dtype.str)}


def saved_state(mem: EditMemory, tmp: Path) -> dict[str, Any]:
    """Everything ``mem.save`` writes, byte for byte (see the module docstring for the one exception)."""
    d = Path(tmp) / f"saved{next(_dirs)}"
    mem.save(d)
    try:
        doc = json.loads((d / "memory.json").read_text())
        doc.pop("checksum")
        files = doc.pop("files")
        # a new file: compare it here too (the image and attachment packs are written without
        # safetensors metadata, so byte for byte: the loop below)
        assert set(files) == {"keys.safetensors", "blobs.safetensors", "attachments.safetensors"}, files
        out: dict[str, Any] = {"memory.json": doc, "keys.safetensors": _keys_file(d / "keys.safetensors"),
                               "index": _index_state(d / "index")}
        assert sorted(p.name for p in (d / "index").iterdir()) == [
            "index.json", "key_edit_ids.npy", "key_thresholds.npy", "keys.npy", "structure.faiss"]
        for p in sorted(d.rglob("*")):
            rel = p.relative_to(d).as_posix()
            if p.is_file() and rel not in ("memory.json", "keys.safetensors") and p.parent.name != "index":
                out[rel] = p.read_bytes()
        return out
    finally:
        shutil.rmtree(d)


def routing(mem: EditMemory) -> list:
    """Every array route returns on `PROBES`, as raw bytes (bit for bit, NaN included)."""
    r = mem.route(images=[p[0] for p in PROBES], texts=[p[1] for p in PROBES])
    fields = ("edit_ids", "versions", "scores", "thresholds", "margins", "runner_up", "runner_up_margins",
              "nearest")
    return [(f, np.asarray(getattr(r, f)).dtype.str, np.asarray(getattr(r, f)).tobytes()) for f in fields] + [
        r.origins
    ]


def keys_state(mem: EditMemory) -> list:
    """Per edit: id, current version, answer, fitted keys and thresholds (bytes), scope provenance."""
    out = []
    for e in mem.list():
        k, t = mem.keys_of(e.id)
        out.append((e.id, e.version, e.answer, k.tobytes(), t.tobytes(), e.constrained_by, e.scope,
                    e.uncovered))
    return out


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy (returns its value); fail after ``timeout`` s (a bound, not a timing)."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class StaleCounter:
    """Wraps `Store.append` (via monkeypatch): counts compare-and-append refusals, and can hold the first
    append of ``hold`` threads named ``writer-*`` at a barrier, so that they all append at the same log
    position (a conflict every time, not by luck of scheduling)."""

    def __init__(self, monkeypatch: Any, hold: int = 0) -> None:
        self.stale = 0
        self.appended: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(hold, timeout=20) if hold else None
        self._held: set[int] = set()
        orig = store_mod.Store.append
        counter = self

        def append(store: Any, seq: int, op: str, record: bytes) -> None:
            me = threading.get_ident()
            held = threading.current_thread().name.startswith("writer-")
            if counter._barrier is not None and held and me not in counter._held:
                counter._held.add(me)
                counter._barrier.wait()  # every held thread planned on the same position
            try:
                orig(store, seq, op, record)
            except StaleStateError:
                with counter._lock:
                    counter.stale += 1
                raise
            with counter._lock:
                counter.appended.append((seq, op))

        monkeypatch.setattr(store_mod.Store, "append", append)


def log_ops(url: str) -> list[dict[str, Any]]:
    """The ops of a store's log, in order (the JSON each record's `Op` was written as; aborts removed)."""
    from esg_memory.persist.journal import live_records

    s = store_mod.Store(url)
    try:
        rows = s.records_after(0)
    finally:
        s.close()
    return [doc["op"] for _, doc, _ in live_records(rows)]


def open_all(url: str, n: int, **kw: Any) -> list[EditMemory]:
    return [EditMemory.open(url, ENC, **kw) for _ in range(n)]


def close_all(mems: list[EditMemory]) -> None:
    for m in mems:
        with contextlib.suppress(Exception):  # teardown: the test's own assertions already ran
            m.close()
