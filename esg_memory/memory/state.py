"""The memory's data: edit states, their indexes, the locality pool and a whole-memory snapshot.

These are the values the rest of the package computes with and the persistence layer
(`esg_memory.persist`) reads and writes: plain frozen records (numpy arrays are never mutated
once built), so a state handed to a reader, a journal writer or a background snapshot stays
whole while writers move on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import MemoryConfig
from ..scope import ScopeFit
from ..types import EditVersion

__all__ = [
    "CrossEncoder",
    "Derived",
    "EditState",
    "EditVectors",
    "LocalityPool",
    "MemorySnapshot",
    "blobs_of",
]

#: (lo_state, hi_state) -> (vectors (r, d), label per row): one edit's image with the other's question.
#: Both rows are negatives for both edits: for one it is "same image, other question", for the other
#: "same question, other image".
CrossEncoder = Callable[["EditState", "EditState", dict[str, bytes]], tuple[np.ndarray, list[str]]]


@dataclass(frozen=True)
class EditVectors:
    """Everything encoded for the current version of one edit (a function of its own content)."""

    cand: np.ndarray  # (c, d) float32 unit rows; row 0 = anchor
    cand_labels: tuple[str, ...]
    own_neg: np.ndarray  # (h, d)
    own_neg_labels: tuple[str, ...]
    qtext: np.ndarray  # (d,) text-only embedding of the question (filters cross hard negatives)
    ivec: np.ndarray  # (d,) image-only embedding (zeros without an image; filters them too)


@dataclass(frozen=True)
class EditState:
    """One edit as the memory holds it. Replaced, never mutated, so readers see whole states."""

    id: int
    created_at: float
    updated_at: float
    metadata: dict[str, Any]
    versions: tuple[EditVersion, ...]
    vec: EditVectors
    fit: ScopeFit | None
    nbrs: dict[int, float] = field(default_factory=dict)  # neighbour set: id -> link cosine

    @property
    def current(self) -> EditVersion:
        return self.versions[-1]

    @property
    def keys(self) -> np.ndarray:
        assert self.fit is not None
        return np.ascontiguousarray(self.vec.cand[list(self.fit.key_index)], dtype=np.float32)


def blobs_of(state: EditState) -> Iterator[str]:
    """Every stored image an edit refers to, over its whole history (repeats possible)."""
    for v in state.versions:
        if v.image is not None:
            yield v.image
        yield from (p.image for p in v.positives if p.image is not None)
        yield from (f.image for f in v.feedback if f.image is not None)


class Derived:
    """Indexes over the committed edit states, kept in step by `Committed.install` (not saved).

    ``holders``: edit -> the edits whose neighbour set holds it (the edits a delete or re-encode
    must revisit); ``bars``: for a full (capped) set, the smallest link in it, below which a new
    edit cannot enter; ``blob_refs``: image sha -> how many edits refer to it. All are functions of
    the states, so rebuilding them from scratch (after a load) gives the same indexes.
    """

    def __init__(self, states: Mapping[int, EditState], cap: int) -> None:
        self.cap = cap
        self.holders: dict[int, set[int]] = {}
        self.bars: dict[int, float] = {}
        self.blob_refs: dict[str, int] = {}
        for st in states.values():
            self._add(st)

    def replace(self, old: EditState | None, new: EditState | None) -> None:
        if old is not None:
            self._drop(old)
        if new is not None:
            self._add(new)

    def _add(self, st: EditState) -> None:
        for n in st.nbrs:
            self.holders.setdefault(n, set()).add(st.id)
        if self.cap and len(st.nbrs) >= self.cap:
            self.bars[st.id] = min(st.nbrs.values())
        for sha in set(blobs_of(st)):
            self.blob_refs[sha] = self.blob_refs.get(sha, 0) + 1

    def _drop(self, st: EditState) -> None:
        for n in st.nbrs:
            held = self.holders.get(n)
            if held is not None:
                held.discard(st.id)
                if not held:
                    del self.holders[n]
        self.bars.pop(st.id, None)
        for sha in set(blobs_of(st)):
            left = self.blob_refs.get(sha, 0) - 1
            if left > 0:
                self.blob_refs[sha] = left
            else:
                self.blob_refs.pop(sha, None)


@dataclass(frozen=True)
class LocalityPool:
    """Unrelated inputs every edit must not answer (negatives of every scope fit).

    ``keys``: (n, d) unit rows; ``images``: sha256 of the pool pictures used as "same question, other
    image" hard negatives (stored in the memory's blobs), ``image_vecs`` their image-only embeddings.
    """

    keys: np.ndarray
    images: tuple[str, ...]
    image_vecs: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> LocalityPool:
        z = np.zeros((0, dim), dtype=np.float32)
        return cls(keys=z, images=(), image_vecs=z)


@dataclass(frozen=True)
class MemorySnapshot:
    """A whole memory at one moment, as persistence reads and writes it.

    Built by `EditMemory.snapshot` (under its locks, the containers copied, the states shared: they are
    immutable) and by `esg_memory.persist.read_snapshot`; turned back into a live memory by
    `EditMemory.from_snapshot`. ``index`` is anything with ``save(path)`` that holds exactly the
    fitted keys of ``edits`` (a `ScopedIndex`, or an index already written elsewhere); ``pending`` the
    deferred deletes whose holders are not re-fitted yet (deleted id -> its answer); ``journal`` the
    position of a durable snapshot in its journal (``{"lsn", "lineage"}``), None for a plain one.
    """

    encoder: Any  # the key encoder (``name``, ``dim``, optional ``spec``): saved vectors match it only
    config: MemoryConfig
    backend: str
    next_id: int
    retired: frozenset[int]
    pool: LocalityPool
    edits: Mapping[int, EditState]
    blobs: Mapping[str, bytes]
    attachments: Mapping[tuple[int, int, str], bytes]
    index: Any
    pending: Mapping[int, str | None] = field(default_factory=dict)
    journal: Mapping[str, Any] | None = None
