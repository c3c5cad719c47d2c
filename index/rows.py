"""Unit rows, the index's one vector contract: the checker, and `UnitRows`, the proof that rows passed it.

Every key and query the index sees must be a C-contiguous float32 ``(n, dim)`` array of finite,
L2-normalised rows. `as_unit_rows` is the one place that enforces it. A caller that sends the
same rows to several index methods (a routed call asks `maybe_in_scope`, then `search`) would
pay that check once per method; a `UnitRows` carries the proof with the rows, so every
`ScopedIndex` method that takes keys or queries accepts one and skips its own check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import DimensionError, InvalidArgumentError, InvalidVectorError

__all__ = ["UnitRows", "as_unit_rows", "rows_array"]

_F32 = np.dtype(np.float32)


class UnitRows:
    """An immutable ``(n, d)`` float32 array of unit rows, C-contiguous and read-only (`array`).

    Made by `as_unit_rows` (which checks and normalises anything array-like) or, for rows a
    caller has already proved to be unit rows with its own checks, by `UnitRows.trusted`.
    """

    __slots__ = ("_array",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # one way in per guarantee: checked (as_unit_rows) or vouched for (trusted)
        raise TypeError("UnitRows is made by index.as_unit_rows(...) or UnitRows.trusted(...)")

    @staticmethod  # not a classmethod: binding one costs a routed call more than the checks below
    def trusted(array: np.ndarray) -> UnitRows:
        """Wrap rows whose *values* the caller has already checked: finite, L2-normalised rows.

        Only the layout is checked here (an ndarray, float32, 2-D, C-contiguous; O(1)), never
        the values: use it after validation of one's own (e.g. `esg_memory.validate.check_keys`),
        else call `as_unit_rows`. The array is not copied, so the caller must not write to it
        while the `UnitRows` is in use. Raises `InvalidArgumentError` on a wrong layout (a
        programming error, not bad data).
        """
        # the routed call's hot path: cheapest tests first, the common dtype object by identity
        if (type(array) is np.ndarray and array.ndim == 2 and (array.dtype is _F32 or array.dtype == _F32)
                and array.flags.c_contiguous):
            rows = _new(UnitRows)
            _SLOT.__set__(rows, array)
            return rows
        raise InvalidArgumentError("UnitRows.trusted needs a C-contiguous float32 2-D numpy array, got "
                                   + _describe(array))

    @property
    def array(self) -> np.ndarray:
        """The rows: read-only float32 ``(n, dim)``, C-contiguous."""
        arr = self._array
        if arr.flags.writeable:
            # a trusted caller's array: the read-only view is made on first access, not in
            # `trusted` (setting the flag costs more than the rest of a routed call's check)
            arr = arr.view()
            arr.flags.writeable = False
            _SLOT.__set__(self, arr)  # the same rows, now behind a read-only view
        return arr

    @property
    def dim(self) -> int:
        """Number of columns."""
        return self._array.shape[1]

    def __len__(self) -> int:
        return self._array.shape[0]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("UnitRows is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("UnitRows is immutable")

    def __repr__(self) -> str:
        return f"UnitRows(n={len(self)}, dim={self.dim})"


_SLOT = UnitRows.__dict__["_array"]  # the slot's own setter: `UnitRows.__setattr__` refuses every write


_new = object.__new__  # `UnitRows.__init__` refuses: instances are made without it


def _wrap(array: np.ndarray) -> UnitRows:
    rows = _new(UnitRows)
    _SLOT.__set__(rows, array)
    return rows


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        flags = "C-contiguous" if x.flags.c_contiguous else "not C-contiguous"
        return f"{x.dtype} array of shape {x.shape}, {flags}"
    return type(x).__name__


def as_unit_rows(values: Any, dim: int, *, n: int | None = None, name: str = "keys") -> UnitRows:
    """Check and normalise ``values`` into `UnitRows` of ``dim`` columns (and ``n`` rows if given).

    Anything numpy can read as real numbers is accepted; a 1-D input of length ``dim`` is one
    row. Rows are cast to float32 and L2-normalised (norm in float64). NaN/inf, values outside
    float32 range, zero rows and non-real dtypes raise `InvalidVectorError`; a wrong shape,
    column count or row count raises `DimensionError`. A `UnitRows` is returned as it is once
    its dim and row count are right (it is never checked twice).
    """
    if isinstance(values, UnitRows):
        if values.dim != dim:
            raise _dim_error(values._array, dim, name)
        rows = values
    else:
        arr = _unit_array(values, dim, name, True)
        arr.flags.writeable = False  # a fresh array nobody else holds: read-only is immutable
        rows = _wrap(arr)
    if n is not None and len(rows) != n:
        raise DimensionError(f"{name} must have {n} rows, got {len(rows)}")
    return rows


def rows_array(values: Any, dim: int, name: str = "keys", allow_1d: bool = True) -> np.ndarray:
    """The unit rows ``values`` stands for, as an array the index only reads: a `UnitRows`' own
    array, whose dim alone is checked, or ``values`` checked and normalised as `as_unit_rows`
    does (a fresh array)."""
    if isinstance(values, UnitRows):
        arr = values._array
        if arr.shape[1] != dim:
            raise _dim_error(arr, dim, name)
        return arr
    return _unit_array(values, dim, name, allow_1d)


def _dim_error(arr: np.ndarray, dim: int, name: str) -> DimensionError:
    return DimensionError(f"{name} must have {dim} columns, got {arr.shape[1]}")


def _unit_array(values: Any, dim: int, name: str, allow_1d: bool) -> np.ndarray:
    """A fresh C-contiguous float32 (n, dim) array of L2-normalised rows, or a typed error.

    Rejects NaN/inf, zero rows and dtypes that cannot be read as real numbers. A 1-D input of
    length ``dim`` is read as one row (if ``allow_1d``). Normalisation runs in float64 so tiny
    but non-zero vectors survive (their float32 squared norm would underflow to 0).
    """
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise InvalidVectorError(f"{name} cannot be read as a numeric array: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise InvalidVectorError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1 and allow_1d:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise DimensionError(f"{name} must be 2-D (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise DimensionError(f"{name} must have {dim} columns, got {arr.shape[1]}")
    if arr.dtype is _F32 or arr.dtype == _F32:
        f32 = arr  # only read below: the result is a fresh array either way
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 range -> inf
            f32 = arr.astype(np.float32)
    f64 = f32.astype(np.float64)
    sq = np.einsum("ij,ij->i", f64, f64)
    # One test on the norms stands for the per-value ones (a query's hot path): a float64 sum of
    # squared float32 values is finite iff every value is (it cannot overflow) and > 0 iff the row
    # is non-zero (the smallest float32 squared is a normal float64). NaN fails both comparisons.
    if sq.shape[0] == 1:  # one query: Python's sqrt and a scalar divisor are the same IEEE operations
        norm = math.sqrt(float(sq[0]))
        ok = 0.0 < norm < math.inf
    else:
        norm = np.sqrt(sq)[:, None]
        ok = bool(((norm > 0) & (norm < np.inf)).all())
    if not ok:
        if not np.isfinite(f32).all():
            bad = int(np.flatnonzero(~np.isfinite(f32).all(axis=1))[0])
            raise InvalidVectorError(f"{name} row {bad} has NaN/inf (or a value outside float32 range)")
        bad = int(np.flatnonzero(sq == 0)[0])
        raise InvalidVectorError(f"{name} row {bad} is a zero vector (cosine is undefined)")
    f64 /= norm
    return f64.astype(np.float32, order="C")  # C order even for a strided or Fortran-order input
