"""Two caches of the memory's planning: cross hard-negative blocks per edit pair, candidate vectors per edit.

Neither is saved: both are functions of the edit states, and exactness never rests on them (they
only decide which exact comparisons get computed).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CrossCache", "NeighbourTable"]


class CrossCache:
    """Cross hard-negative blocks per edit pair ``(lower id, higher id)``, also indexed by edit.

    The per-edit index lets a write drop the pairs of the edits it touched in time proportional to
    those pairs, not to every pair cached (a delete must not scan the whole memory).
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[int, int], tuple[np.ndarray, list[str]]] = {}
        self._of: dict[int, set[tuple[int, int]]] = {}

    def get(self, key: tuple[int, int]) -> tuple[np.ndarray, list[str]] | None:
        return self._pairs.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __setitem__(self, key: tuple[int, int], value: tuple[np.ndarray, list[str]]) -> None:
        self._pairs[key] = value
        for e in key:
            self._of.setdefault(e, set()).add(key)

    def __delitem__(self, key: tuple[int, int]) -> None:
        del self._pairs[key]
        for e in key:
            held = self._of.get(e)
            if held is not None:
                held.discard(key)
                if not held:
                    del self._of[e]

    def update(self, pairs: dict[tuple[int, int], tuple[np.ndarray, list[str]]]) -> None:
        for k, v in pairs.items():
            self[k] = v

    def pairs_of(self, ids: set[int]) -> list[tuple[int, int]]:
        """Every cached pair with a side in ``ids`` (sorted, so callers may delete while iterating)."""
        out: set[tuple[int, int]] = set()
        for e in ids:
            out |= self._of.get(e, set())
        return sorted(out)


class NeighbourTable:
    """Every present edit's candidate vectors in one growable matrix: a fast pre-filter for neighbours.

    Exactness never rests on it (links are recomputed per pair); it only narrows which pairs to check.
    """

    def __init__(self, dim: int) -> None:
        self._mat = np.zeros((64, dim), dtype=np.float32)
        self._owner = np.full(64, -1, dtype=np.int64)
        self._n = 0
        self._rows: dict[int, np.ndarray] = {}
        self._dead = 0

    def add(self, eid: int, vecs: np.ndarray) -> None:
        m = vecs.shape[0]
        if self._n + m > self._mat.shape[0]:
            cap = max(2 * self._mat.shape[0], self._n + m)
            mat = np.zeros((cap, self._mat.shape[1]), dtype=np.float32)
            mat[: self._n] = self._mat[: self._n]
            owner = np.full(cap, -1, dtype=np.int64)
            owner[: self._n] = self._owner[: self._n]
            self._mat, self._owner = mat, owner
        self._mat[self._n : self._n + m] = vecs
        self._owner[self._n : self._n + m] = eid
        self._rows[eid] = np.arange(self._n, self._n + m)
        self._n += m

    def remove(self, eid: int) -> None:
        rows = self._rows.pop(eid, None)
        if rows is None:
            return
        self._owner[rows] = -1
        self._dead += len(rows)
        if self._dead > max(1024, self._n // 2):
            live = self._owner[: self._n] >= 0
            mat, owner = self._mat[: self._n][live], self._owner[: self._n][live]
            self._mat = np.zeros_like(self._mat)
            self._owner = np.full_like(self._owner, -1)
            self._n, self._dead, self._rows = 0, 0, {}
            for eid2 in dict.fromkeys(owner.tolist()):
                self.add(eid2, mat[owner == eid2])

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self._mat[: self._n], self._owner[: self._n]
