"""Validation and small helpers shared by `EditMemory` and its store (not public API)."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from index.errors import (
    DuplicateIdError,
    IndexFormatError,
    ScopedIndexError,
    UnknownIdError,
)

from .errors import (
    ConfigError,
    DuplicateEditError,
    EsgMemoryError,
    FormatError,
    ImageError,
    InvalidInputError,
    UnknownEditError,
)
from .images import MAX_IMAGE_PIXELS
from .types import EditVersion

__all__ = [
    "MAX_TEXT_CHARS",
    "CrossCache",
    "NeighbourTable",
    "check_encoder",
    "check_keys",
    "check_text",
    "edit_seed",
    "normalize_image_arg",
    "translate_index_error",
]

#: Longest question / answer / positive text accepted (characters).
MAX_TEXT_CHARS = 8192


def check_text(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise InvalidInputError(f"{what} must be a string, not {type(x).__name__}")
    if not x.strip():
        raise InvalidInputError(f"{what} must not be empty")
    if len(x) > MAX_TEXT_CHARS:
        raise InvalidInputError(f"{what} is {len(x)} characters; the limit is {MAX_TEXT_CHARS}")
    if "\x00" in x:
        raise InvalidInputError(f"{what} contains a NUL character")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: every encoder and file format would choke later
        raise InvalidInputError(f"{what} is not valid Unicode (lone surrogate)") from None
    return x


def check_keys(x: Any, n: int | None, dim: int, what: str) -> np.ndarray:
    """A (n, dim) float32 array of unit rows, or a typed error.

    Every routed call runs this, and right after a model's forward pass each distinct numpy
    operation costs tens of microseconds in cache misses, so the accepting path is a handful of
    them; the detailed diagnosis runs only for input it refuses.
    """
    try:
        raw = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{what}: not a numeric array ({e})") from None
    # strings would be parsed and complex parts silently dropped by a float cast; refuse both
    if raw.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what}: must be real numbers, got dtype {raw.dtype}")
    if raw.ndim == 1 and n is None and raw.shape[0] == dim:
        raw = raw[None, :]
    if raw.ndim != 2 or raw.shape[1] != dim or (n is not None and raw.shape[0] != n):
        raise InvalidInputError(f"{what}: shape {raw.shape}, expected ({'n' if n is None else n}, {dim})")
    with np.errstate(over="ignore", invalid="ignore"):
        # via float32: a value beyond its range is refused (inf) rather than normalised away
        a = raw.astype(np.float32).astype(np.float64)
    sq = np.einsum("ij,ij->i", a, a)
    # NaN/inf anywhere in a row make its squared norm NaN/inf, which fails this test too
    if not all(1e-24 <= v < math.inf for v in sq.tolist()):
        if not np.isfinite(a).all():
            raise InvalidInputError(f"{what}: contains NaN or inf")
        raise InvalidInputError(f"{what}: contains a zero vector")
    return (a / np.sqrt(sq)[:, None]).astype(np.float32)


def check_encoder(encoder: Any) -> None:
    name = getattr(encoder, "name", None)
    dim = getattr(encoder, "dim", None)
    if not isinstance(name, str) or not name:
        raise ConfigError("encoder must have a non-empty string `name`")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
        raise ConfigError("encoder must have a positive integer `dim`")
    for m in ("encode", "encode_texts", "encode_images"):
        if not callable(getattr(encoder, m, None)):
            raise ConfigError(f"encoder must have a callable `{m}`")


def normalize_image_arg(image: Any) -> Any:
    if isinstance(image, Image.Image):
        # Encoders may take PIL images as they are (no load_image): apply its size limits here.
        n = image.width * image.height
        if not 0 < n <= MAX_IMAGE_PIXELS:
            raise ImageError(f"PIL image of {image.width}x{image.height} pixels (limit {MAX_IMAGE_PIXELS})")
        return image
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return image
    raise ImageError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")


def edit_seed(seed: int, v: EditVersion) -> int:
    """Seed of a version's generated positives: from its content, never its id or arrival order."""
    h = hashlib.sha256(f"{seed}\x00{v.image}\x00{v.question}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def translate_index_error(e: ScopedIndexError) -> EsgMemoryError:
    msg = f"index: {e}"
    if isinstance(e, DuplicateIdError):
        return DuplicateEditError(msg)
    if isinstance(e, UnknownIdError):
        return UnknownEditError(msg)
    if isinstance(e, IndexFormatError):
        return FormatError(msg)
    return InvalidInputError(msg)


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
