"""`index.UnitRows` / `index.as_unit_rows`: what is refused, immutability, checked once, same results."""

from __future__ import annotations

import numpy as np
import pytest
from _index_fixtures import near, single_faiss_thread, unit

import index.rows as rows_mod
from index import (
    DimensionError,
    IndexConfig,
    InvalidArgumentError,
    InvalidVectorError,
    ScopedIndex,
    UnitRows,
    as_unit_rows,
)

_ = single_faiss_thread  # autouse fixture
D = 8


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (np.full((2, D), np.nan), InvalidVectorError),
        (np.array([[np.inf] + [0.0] * (D - 1)]), InvalidVectorError),
        (np.array([[1e39] + [0.0] * (D - 1)]), InvalidVectorError),  # outside float32 range
        (np.zeros((1, D)), InvalidVectorError),
        (np.array([["a"] * D]), InvalidVectorError),
        (np.ones((2, D), dtype=complex), InvalidVectorError),
        ([[1.0] * D, [1.0] * (D - 1)], InvalidVectorError),  # ragged
        (object(), InvalidVectorError),
        (np.ones((2, D + 1)), DimensionError),
        (np.ones(D - 1), DimensionError),
        (np.ones((2, 2, D)), DimensionError),
        (np.float32(1.0), DimensionError),
    ],
)
def test_as_unit_rows_refuses_what_the_index_refuses(values, error):
    with pytest.raises(error):
        as_unit_rows(values, D)
    ix = ScopedIndex(D)
    with pytest.raises(error):  # the same checks, the same errors, as a raw array given to the index
        ix.search(values)


def test_as_unit_rows_checks_the_row_count_and_names_the_argument():
    with pytest.raises(DimensionError, match="queries must have 3 rows, got 2"):
        as_unit_rows(np.ones((2, D)), D, n=3, name="queries")
    with pytest.raises(DimensionError, match="probe must have"):
        as_unit_rows(np.ones((2, D + 1)), D, name="probe")
    assert len(as_unit_rows(np.ones((2, D)), D, n=2)) == 2
    assert len(as_unit_rows(np.zeros((0, D)), D, n=0)) == 0


def test_as_unit_rows_normalises_into_a_read_only_float32_array():
    x = np.arange(1, 2 * D + 1, dtype=np.int64).reshape(2, D)
    r = as_unit_rows(x, D)
    a = r.array
    assert a.dtype == np.float32 and a.shape == (2, D) and a.flags.c_contiguous and not a.flags.writeable
    assert r.dim == D and len(r) == 2 and repr(r) == f"UnitRows(n=2, dim={D})"
    want = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(a, want, rtol=1e-6)
    one = as_unit_rows(np.ones(D), D)  # a 1-D row is one row, as the index reads it
    assert one.array.shape == (1, D)
    tiny = as_unit_rows(np.full((1, D), 1e-30), D)  # float64 norm: a tiny row survives
    np.testing.assert_allclose(np.linalg.norm(tiny.array), 1.0, rtol=1e-6)
    assert not np.shares_memory(as_unit_rows(a, D).array, x)


def test_unit_rows_are_immutable():
    src = unit(np.random.default_rng(0), 3, D)
    for r in (as_unit_rows(src, D), UnitRows.trusted(src.copy())):
        with pytest.raises(AttributeError):
            r._array = np.zeros((1, D), np.float32)  # type: ignore[misc]
        with pytest.raises(AttributeError):
            r.array = np.zeros((1, D), np.float32)  # type: ignore[misc]
        with pytest.raises(AttributeError):
            r.extra = 1  # type: ignore[attr-defined]
        with pytest.raises(AttributeError):
            del r._array
        with pytest.raises(ValueError, match="read-only"):
            r.array[0, 0] = 5.0
        assert r.array is r.array  # one view, handed out again
    with pytest.raises(TypeError):
        UnitRows(src)  # type: ignore[call-arg]


def test_trusted_checks_the_layout_only():
    ok = unit(np.random.default_rng(1), 4, D)
    r = UnitRows.trusted(ok)
    assert np.shares_memory(r.array, ok) and ok.flags.writeable  # no copy; the caller's array untouched
    assert UnitRows.trusted(r.array).array is r.array  # an already read-only array is kept as it is
    for bad in (ok.astype(np.float64), ok[0], ok[:, ::2], np.asfortranarray(ok[:, :3]), ok.tolist(),
                ok.astype(ok.dtype.newbyteorder())):
        with pytest.raises(InvalidArgumentError, match=r"UnitRows\.trusted"):
            UnitRows.trusted(bad)  # type: ignore[arg-type]


def test_as_unit_rows_of_unit_rows_is_the_same_object():
    r = as_unit_rows(np.ones((2, D)), D)
    assert as_unit_rows(r, D) is r and as_unit_rows(r, D, n=2) is r
    with pytest.raises(DimensionError):
        as_unit_rows(r, D + 1)
    with pytest.raises(DimensionError):
        as_unit_rows(r, D, n=3)


def _populated(seed: int) -> tuple[ScopedIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    ix = ScopedIndex(D, backend="flat", config=IndexConfig(prune_min_keys=40, prune_keys_per_cluster=4))
    keys = unit(rng, 120, D)
    ix.add(np.arange(120) // 2, keys, rng.uniform(0.6, 0.95, 120).astype(np.float32))
    return ix, np.vstack([near(rng, keys[::7], 0.3), unit(rng, 10, D)])


@pytest.fixture
def checks(monkeypatch):
    """Counts the calls of the unit-row checker behind every index method."""
    calls = []
    real = rows_mod._unit_array

    def counted(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rows_mod, "_unit_array", counted)
    return calls


def test_unit_rows_are_not_checked_again_and_give_the_raw_array_results(checks):
    ix, queries = _populated(2)
    checks.clear()
    q = as_unit_rows(queries, D, name="queries")
    assert checks == ["queries"]
    checks.clear()

    got = (ix.search(q, k=3), ix.match(q), ix.match_details(q), ix.maybe_in_scope(q), ix.scan_margins(q))
    assert checks == [], "a UnitRows was checked again"
    want = (ix.search(queries, k=3), ix.match(queries), ix.match_details(queries), ix.maybe_in_scope(queries),
            ix.scan_margins(queries))
    assert checks == ["queries"] * 5  # raw arrays are still checked, once per call
    for g, w in zip(got, want, strict=True):
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(g, w)
        else:
            for field in ("scores", "edit_ids", "in_scope", "thresholds", "key_positions"):
                np.testing.assert_array_equal(getattr(g, field), getattr(w, field))
    assert (got[1] >= 0).any() and (got[1] < 0).any() and ix._cones.current is not None


def test_mutations_take_unit_rows_unchecked_with_the_same_effect(checks):
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((6, D)) * 3.0  # not unit: the check normalises it
    r = as_unit_rows(raw, D)
    a, b = ScopedIndex(D), ScopedIndex(D)
    checks.clear()
    a.add([1, 1, 2], UnitRows.trusted(np.ascontiguousarray(r.array[:3])), 0.8)
    a.add_keys(2, UnitRows.trusted(np.ascontiguousarray(r.array[3:5])), [0.7, 0.75])
    a.add([3], UnitRows.trusted(np.ascontiguousarray(r.array[5:])), 0.9)
    a.replace_keys(1, UnitRows.trusted(np.ascontiguousarray(r.array[4:])), 0.85)
    assert checks == []
    b.add([1, 1, 2], raw[:3], 0.8)
    b.add_keys(2, raw[3:5], [0.7, 0.75])
    b.add([3], raw[5], 0.9)  # one id, one 1-D row
    b.replace_keys(1, raw[4:], 0.85)
    assert len(checks) == 4
    np.testing.assert_array_equal(a.edit_ids(), b.edit_ids())
    for e in a.edit_ids().tolist():
        for x, y in zip(a.keys_of(e), b.keys_of(e), strict=True):
            np.testing.assert_array_equal(x, y)


def test_unit_rows_of_another_dim_are_refused_before_anything_changes():
    ix, _ = _populated(4)
    before = ix.stats()
    wrong = as_unit_rows(np.ones((2, D + 1)), D + 1)
    for call in (lambda: ix.search(wrong), lambda: ix.match(wrong), lambda: ix.maybe_in_scope(wrong),
                 lambda: ix.scan_margins(wrong), lambda: ix.match_details(wrong),
                 lambda: ix.add([900, 901], wrong, 0.9), lambda: ix.add_keys(0, wrong, 0.9),
                 lambda: ix.replace_keys(0, wrong, 0.9)):
        with pytest.raises(DimensionError):
            call()
    with pytest.raises(DimensionError):  # rows and ids must still agree
        ix.add([900], as_unit_rows(np.ones((2, D)), D), 0.9)
    assert ix.stats() == before
