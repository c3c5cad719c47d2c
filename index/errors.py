"""Typed errors raised by `index`.

Every error the index raises on purpose derives from `ScopedIndexError`, and each also derives
from the builtin an ordinary caller would expect (`ValueError`, `KeyError`), so both
``except ScopedIndexError`` and ``except ValueError`` work. `esg_memory` translates these into
its own hierarchy at its boundary; `index` itself stays independent of `esg_memory`.
"""

from __future__ import annotations

__all__ = [
    "DimensionError",
    "DuplicateIdError",
    "IndexFormatError",
    "InvalidArgumentError",
    "InvalidIdError",
    "InvalidVectorError",
    "ScopedIndexError",
    "ThresholdError",
    "UnknownIdError",
]


class ScopedIndexError(Exception):
    """Root of every error `index` raises on purpose."""


class DimensionError(ScopedIndexError, ValueError):
    """An array has the wrong number of columns (dim) or rows (length mismatch between arguments)."""


class InvalidVectorError(ScopedIndexError, ValueError):
    """A key or query is zero, NaN/inf, or of a dtype that cannot be read as float32."""


class InvalidIdError(ScopedIndexError, ValueError):
    """An edit id is not a non-negative integer that fits in int64 (-1 is reserved for padding)."""


class DuplicateIdError(ScopedIndexError, ValueError):
    """`add` of an edit id that is already present, or an id given twice where that is ambiguous."""


class UnknownIdError(ScopedIndexError, KeyError):
    """An edit id that is not in the index."""

    def __str__(self) -> str:  # KeyError repr-quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown edit id"


class ThresholdError(ScopedIndexError, ValueError):
    """A threshold is not a finite number in [-1, 1], or has the wrong shape."""


class InvalidArgumentError(ScopedIndexError, ValueError):
    """Any other bad argument: unknown backend, k < 1, bad dim, bad option value."""


class IndexFormatError(ScopedIndexError, ValueError):
    """A saved index directory is missing, foreign, corrupt, truncated, or of an unknown version."""
