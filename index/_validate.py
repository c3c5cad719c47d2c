"""Input coercion for `ScopedIndex`'s ids, thresholds and ``k``: checked values or a typed error.

Keys and queries have their own module (`index.rows`).

Everything here is pure (never touches index state), so a call can validate all of its
arguments before it mutates anything.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .errors import DimensionError, InvalidArgumentError, InvalidIdError, ThresholdError

__all__ = ["as_edit_id", "as_edit_ids", "as_k", "as_thresholds"]

_INT64_MAX = np.iinfo(np.int64).max


def as_edit_id(value: Any) -> int:
    """One edit id as a Python int (non-negative, fits int64)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InvalidIdError(f"edit id must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < 0 or v > _INT64_MAX:
        raise InvalidIdError(f"edit id must be in [0, 2**63-1] (-1 is reserved for padding), got {v}")
    return v


def as_edit_ids(values: Any, name: str = "edit_ids") -> np.ndarray:
    """A 1-D int64 array of non-negative ids. Accepts a scalar, a sequence or an integer array."""
    if isinstance(values, (numbers.Integral, np.integer)) and not isinstance(values, (bool, np.bool_)):
        return np.array([as_edit_id(values)], dtype=np.int64)
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise InvalidIdError(f"{name} cannot be read as an integer array: {e}") from None
    if arr.dtype == object and arr.size > 0:
        # Python ints beyond int64 or mixed types land here; check element-wise.
        return np.array([as_edit_id(v) for v in arr.reshape(-1)], dtype=np.int64).reshape(arr.shape)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidIdError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.ndim != 1:
        raise DimensionError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "u":
        if arr.size and int(arr.max()) > _INT64_MAX:
            raise InvalidIdError(f"{name} holds a value above int64 range")
        return arr.astype(np.int64)
    arr = arr.astype(np.int64, copy=True)
    if arr.size and int(arr.min()) < 0:
        raise InvalidIdError(f"{name} must be >= 0 (-1 is reserved for padding), got {int(arr.min())}")
    return arr


def as_thresholds(values: Any, n: int, name: str = "thresholds") -> np.ndarray:
    """A float32 (n,) array of finite thresholds in [-1, 1]; a scalar is broadcast to n."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise ThresholdError(f"{name} cannot be read as numbers: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise ThresholdError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ThresholdError(f"{name} must have shape ({n},), got {arr.shape}")
    f = arr.astype(np.float64)
    if not np.isfinite(f).all():
        raise ThresholdError(f"{name} must be finite")
    if f.size and (f.min() < -1.0 or f.max() > 1.0):
        raise ThresholdError(f"{name} must lie in [-1, 1], got range [{f.min():.4g}, {f.max():.4g}]")
    return f.astype(np.float32)


def as_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (numbers.Integral, np.integer)) or int(k) < 1:
        raise InvalidArgumentError(f"k must be an integer >= 1, got {k!r}")
    return int(k)
