"""The key table: the one source of truth for which edit owns which key, and its threshold.

Each key lives in a *slot*; the slot number is also the key's id inside the FAISS structure.
Slots are append-only: removing an edit marks its slots dead (``edit == -1``) and the FAISS
structure either drops them natively (IVF) or filters them at search (flat, HNSW) through the
``bits`` alive-bitmap. `compacted` renumbers live slots densely; the owner then rebuilds the
FAISS structure from the new table. ``_slots`` (edit -> slots) and ``bits`` are indexes derived
from ``edit`` and are only ever changed by the methods below, together with it.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["KeyTable"]


class KeyTable:
    def __init__(self, dim: int, capacity: int = 0) -> None:
        self.dim = dim
        cap = max(int(capacity), 16)
        self.vecs = np.zeros((cap, dim), dtype=np.float32)
        self.edit = np.full(cap, -1, dtype=np.int64)
        self.thr = np.zeros(cap, dtype=np.float32)
        self.bits = np.zeros((cap + 7) // 8, dtype=np.uint8)
        self.n = 0
        self.n_dead = 0
        self._slots: dict[int, np.ndarray] = {}
        self._min_thr: float | None = None  # cache for match's stopping rule; None = recompute
        self.version = 0  # bumped by every mutation: derived caches (the cone filter) compare it

    # ---- read side -------------------------------------------------------------------------
    @property
    def n_alive(self) -> int:
        return self.n - self.n_dead

    @property
    def n_edits(self) -> int:
        return len(self._slots)

    def __contains__(self, edit_id: int) -> bool:
        return edit_id in self._slots

    def slots_of(self, edit_id: int) -> np.ndarray:
        return self._slots[edit_id]

    def edit_ids(self) -> np.ndarray:
        out = np.fromiter(self._slots.keys(), dtype=np.int64, count=len(self._slots))
        out.sort()
        return out

    def alive_slots(self) -> np.ndarray:
        return np.flatnonzero(self.edit[: self.n] >= 0)

    def alive_slots_with_threshold_at_most(self, x: float) -> np.ndarray:
        return np.flatnonzero((self.thr[: self.n] <= x) & (self.edit[: self.n] >= 0))

    def min_threshold(self) -> float:
        """Smallest live threshold (1.0 when empty); cached between mutations."""
        if self._min_thr is None:
            alive = self.edit[: self.n] >= 0
            self._min_thr = float(self.thr[: self.n][alive].min()) if alive.any() else 1.0
        return self._min_thr

    def selector(self) -> faiss.IDSelector | None:
        """An IDSelector passing live slots only, or None when nothing is dead.

        The selector points into ``self.bits``; callers use it under the read lock, during
        which the table is neither mutated nor reallocated.
        """
        if self.n_dead == 0:
            return None
        return faiss.IDSelectorBitmap((self.n + 7) // 8, faiss.swig_ptr(self.bits))  # n is in bytes

    # ---- write side (caller holds the write lock and has validated the arguments) ----------
    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more slots (may reallocate: call before changing anything)."""
        need = self.n + extra
        cap = self.vecs.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        vecs = np.zeros((new_cap, self.dim), dtype=np.float32)
        vecs[: self.n] = self.vecs[: self.n]
        edit = np.full(new_cap, -1, dtype=np.int64)
        edit[: self.n] = self.edit[: self.n]
        thr = np.zeros(new_cap, dtype=np.float32)
        thr[: self.n] = self.thr[: self.n]
        bits = np.zeros((new_cap + 7) // 8, dtype=np.uint8)
        bits[: self.bits.shape[0]] = self.bits
        self.vecs, self.edit, self.thr, self.bits = vecs, edit, thr, bits

    def append(self, edit_ids: np.ndarray, vecs: np.ndarray, thr: np.ndarray) -> np.ndarray:
        """Store rows; returns their slots. Ids may be new edits or existing ones (more keys)."""
        r = edit_ids.shape[0]
        self.reserve(r)
        slots = np.arange(self.n, self.n + r, dtype=np.int64)
        self.vecs[self.n : self.n + r] = vecs
        self.edit[self.n : self.n + r] = edit_ids
        self.thr[self.n : self.n + r] = thr
        self._set_bits(slots, True)
        self.n += r
        self.version += 1
        if self._min_thr is not None:
            self._min_thr = min(self._min_thr, float(thr.min()))
        if r == 1 or (edit_ids == edit_ids[0]).all():
            self._extend(int(edit_ids[0]), slots)
        else:
            order = np.argsort(edit_ids, kind="stable")
            uniq, starts = np.unique(edit_ids[order], return_index=True)
            for e, group in zip(uniq.tolist(), np.split(slots[order], starts[1:]), strict=True):
                self._extend(e, group)
        return slots

    def _extend(self, edit_id: int, slots: np.ndarray) -> None:
        old = self._slots.get(edit_id)
        self._slots[edit_id] = slots.copy() if old is None else np.concatenate([old, slots])

    def kill(self, edit_ids: np.ndarray) -> np.ndarray:
        """Mark every key of these (present) edits dead; returns the dead slots."""
        parts = [self._slots.pop(int(e)) for e in edit_ids.tolist()]
        slots = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.edit[slots] = -1
        self._set_bits(slots, False)
        self.n_dead += int(slots.shape[0])
        self._min_thr = None
        self.version += 1
        return slots

    def set_thresholds(self, slots: np.ndarray, values: np.ndarray) -> None:
        self.thr[slots] = values
        self._min_thr = None
        self.version += 1

    def _set_bits(self, slots: np.ndarray, on: bool) -> None:
        byte = slots >> 3
        mask = (np.uint8(1) << (slots & 7).astype(np.uint8)).astype(np.uint8)
        if on:
            np.bitwise_or.at(self.bits, byte, mask)
        else:
            np.bitwise_and.at(self.bits, byte, ~mask)

    def compacted(self) -> tuple[KeyTable, np.ndarray]:
        """A new table holding only live keys (same order); returns it and old->new slot map."""
        live = self.alive_slots()
        new = KeyTable(self.dim, capacity=max(16, live.shape[0] + live.shape[0] // 4))
        if live.shape[0]:
            new.append(self.edit[live], self.vecs[live], self.thr[live])
        remap = np.full(self.n, -1, dtype=np.int64)
        remap[live] = np.arange(live.shape[0], dtype=np.int64)
        return new, remap

    @classmethod
    def from_arrays(cls, vecs: np.ndarray, edit: np.ndarray, thr: np.ndarray) -> KeyTable:
        """Rebuild a table with the same slot numbering (dead slots have ``edit == -1``)."""
        n = edit.shape[0]
        t = cls(vecs.shape[1], capacity=max(16, n + n // 4))
        t.vecs[:n] = vecs
        t.edit[:n] = edit
        t.thr[:n] = thr
        t.n = n
        live = np.flatnonzero(edit >= 0)
        t.n_dead = n - live.shape[0]
        if live.shape[0]:
            t._set_bits(live, True)
            e = edit[live]
            order = np.argsort(e, kind="stable")
            uniq, starts = np.unique(e[order], return_index=True)
            for eid, group in zip(uniq.tolist(), np.split(live[order], starts[1:]), strict=True):
                t._slots[eid] = group
        return t
