"""ScopedIndex API, semantics and every bad input (state unchanged after each refusal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _index_fixtures import single_faiss_thread, unit

import index
from index import (
    DimensionError,
    DuplicateIdError,
    IndexConfig,
    InvalidArgumentError,
    InvalidIdError,
    InvalidVectorError,
    ScopedIndex,
    ScopedIndexError,
    ThresholdError,
    UnknownIdError,
)

_ = single_faiss_thread  # autouse fixture
D = 8
BACKENDS = ["flat", "ivf", "hnsw", "auto"]


def _filled(backend: str = "flat", n: int = 20, seed: int = 0) -> tuple[ScopedIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    ix = ScopedIndex(D, backend=backend, config=IndexConfig(ivf_min_train=40))
    keys = unit(rng, 2 * n, D)
    ix.add(np.repeat(np.arange(n), 2), keys, 0.8)  # every edit owns two keys
    return ix, keys


def _snapshot(ix: ScopedIndex):
    ids = ix.edit_ids()
    return ids.tolist(), {e: tuple(a.tobytes() for a in ix.keys_of(e)) for e in ids.tolist()}, ix.stats()


def test_basic_api_and_shapes():
    rng = np.random.default_rng(1)
    ix = ScopedIndex(D)
    assert len(ix) == 0 and ix.edit_ids().dtype == np.int64 and ix.edit_ids().size == 0
    res = ix.search(unit(rng, 3, D), k=4)
    assert res.edit_ids.shape == (3, 4) and (res.edit_ids == -1).all() and not res.in_scope.any()
    assert np.isneginf(res.scores).all() and np.isposinf(res.thresholds).all()
    assert (ix.match(unit(rng, 2, D)) == -1).all()
    keys = rng.standard_normal((3, D)) * 5  # not unit, float64: normalised and cast on the way in
    ix.add([7, 7, 9], keys, [0.5, 0.6, 0.7])
    assert len(ix) == 2 and 7 in ix and 9 in ix and 8 not in ix and "x" not in ix and -1 not in ix
    assert ix.n_keys == 3
    k7, t7 = ix.keys_of(7)
    assert k7.dtype == np.float32 and k7.shape == (2, D)
    np.testing.assert_allclose(np.linalg.norm(k7, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(k7[0], keys[0] / np.linalg.norm(keys[0]), atol=1e-6)
    np.testing.assert_array_equal(t7, np.float32([0.5, 0.6]))
    assert ix.match(keys[2])[0] == 9  # 1-D query is one row
    ix.add_keys(9, unit(rng, 2, D), 0.9)
    assert ix.keys_of(9)[0].shape == (3, D)
    ix.remove([7])
    assert 7 not in ix and ix.n_keys == 3
    ix.remove(np.array([], dtype=np.int64))  # no-op


def test_results_are_per_edit_and_use_best_margin_key():
    ix = ScopedIndex(2)
    # Edit 1: a near key with a strict threshold and a farther key with a loose one.
    a = np.array([1.0, 0.0])
    near_key = np.array([np.cos(0.1), np.sin(0.1)])
    far_key = np.array([np.cos(0.5), np.sin(0.5)])
    ix.add([1, 1, 1], [near_key, far_key, near_key], [0.999, 0.5, 0.9999])
    ix.add([2], [np.array([np.cos(0.3), -np.sin(0.3)])], 0.9)
    res = ix.search(a, k=3)
    assert res.edit_ids[0].tolist() == [1, 2, -1]  # edit 1 only once though it has 3 near keys
    # Reported key of edit 1 is the loose far key (margin cos(0.5)-0.5 beats cos(0.1)-0.999).
    np.testing.assert_allclose(res.scores[0, 0], np.cos(0.5), atol=1e-6)
    np.testing.assert_allclose(res.thresholds[0, 0], 0.5)
    assert res.in_scope[0].tolist() == [True, True, False]
    np.testing.assert_allclose(res.margins[0, :2], [np.cos(0.5) - 0.5, np.cos(0.3) - 0.9], atol=1e-6)
    assert ix.match(a)[0] == 1
    ix.set_key_thresholds(1, [0.999, 0.99, 0.9999])  # now no key of edit 1 covers a
    assert ix.match(a)[0] == 2
    d = ix.match_details(a)
    assert d.edit_ids[0, 0] == 2 and d.in_scope[0, 0]
    np.testing.assert_allclose(d.scores[0, 0], np.cos(0.3), atol=1e-6)
    ix.set_thresholds([2], [1.0])
    assert ix.match(a)[0] == -1


@pytest.mark.parametrize("wide_cap", [4096, 0])
def test_match_finds_in_scope_edit_beyond_nearest_neighbours(wide_cap, monkeypatch):
    # Many near keys with strict thresholds hide one far edit with a very loose threshold:
    # match must score low-threshold keys directly, or (cap 0) deepen its candidate list until
    # nothing unseen could beat the best margin.
    monkeypatch.setattr(ScopedIndex, "_WIDE_CAP", wide_cap)
    rng = np.random.default_rng(2)
    ix = ScopedIndex(D)
    q = unit(rng, 1, D)[0]
    crowd = q + 0.05 * rng.standard_normal((50, D))
    ix.add(np.arange(50), crowd, 1.0)
    far = -q + 0.3 * rng.standard_normal(D)
    ix.add([99], far[None], -1.0)
    assert ix.match(q)[0] == 99
    assert 99 not in ix.search(q, k=5).edit_ids[0]


def test_match_equals_search_top_when_in_scope():
    ix, keys = _filled("flat", n=30)
    res = ix.search(keys, k=3)
    m = ix.match(keys)
    top = np.where(res.in_scope[:, 0], res.edit_ids[:, 0], -1)
    np.testing.assert_array_equal(m, top)


def test_error_types_derive_from_builtins():
    assert issubclass(UnknownIdError, KeyError) and issubclass(UnknownIdError, ScopedIndexError)
    for cls in (DimensionError, InvalidVectorError, DuplicateIdError, ThresholdError, InvalidIdError,
                InvalidArgumentError, index.IndexFormatError):
        assert issubclass(cls, ValueError) and issubclass(cls, ScopedIndexError)
    assert "not in the index" in str(UnknownIdError("edit ids not in the index: [3]"))


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": -3}, {"dim": 2.5}, {"dim": True},
                                    {"dim": 4, "backend": "lsh"}, {"dim": 4, "config": {"nprobe": 3}}])
def test_bad_constructor(kwargs):
    with pytest.raises(InvalidArgumentError):
        ScopedIndex(**kwargs)


@pytest.mark.parametrize("field,value", [("ivf_nprobe", 0), ("ivf_growth", 1.0), ("max_dead_fraction", 1.5),
                                         ("hnsw_m", True), ("seed", "x")])
def test_bad_config(field, value):
    with pytest.raises(InvalidArgumentError):
        IndexConfig(**{field: value})


BAD_ADDS = [
    ("wrong dim", lambda k: ([100], k[:1, :-1], 0.5), DimensionError),
    ("3-d keys", lambda k: ([100], k[None, :1], 0.5), DimensionError),
    ("rows != ids", lambda k: ([100, 101], k[:3], 0.5), DimensionError),
    ("2-d ids", lambda k: ([[100]], k[:1], 0.5), DimensionError),
    ("nan", lambda k: ([100, 101], np.vstack([k[0], np.full(D, np.nan)]), 0.5), InvalidVectorError),
    ("inf", lambda k: ([100], np.full((1, D), np.inf), 0.5), InvalidVectorError),
    ("float32 overflow", lambda k: ([100], np.full((1, D), 1e300), 0.5), InvalidVectorError),
    ("zero row", lambda k: ([100, 101], np.vstack([k[0], np.zeros(D)]), 0.5), InvalidVectorError),
    ("strings", lambda k: ([100], np.array([["a"] * D]), 0.5), InvalidVectorError),
    ("complex", lambda k: ([100], k[:1].astype(np.complex64), 0.5), InvalidVectorError),
    ("ragged", lambda k: ([100, 101], [[1.0] * D, [1.0]], 0.5), InvalidVectorError),
    ("present id", lambda k: ([100, 3], k[:2], 0.5), DuplicateIdError),
    ("negative id", lambda k: ([-1], k[:1], 0.5), InvalidIdError),
    ("float id", lambda k: ([1.5], k[:1], 0.5), InvalidIdError),
    ("huge id", lambda k: ([2**70], k[:1], 0.5), InvalidIdError),
    ("bool id", lambda k: (True, k[:1], 0.5), InvalidIdError),
    ("thr > 1", lambda k: ([100, 101], k[:2], [0.5, 1.01]), ThresholdError),
    ("thr < -1", lambda k: ([100], k[:1], -1.5), ThresholdError),
    ("thr nan", lambda k: ([100], k[:1], np.nan), ThresholdError),
    ("thr shape", lambda k: ([100, 101], k[:2], [0.5]), ThresholdError),
    ("thr str", lambda k: ([100], k[:1], "high"), ThresholdError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_ADDS, ids=[c[0] for c in BAD_ADDS])
def test_bad_add_leaves_state_unchanged(backend, case):
    ix, keys = _filled(backend)
    before = _snapshot(ix)
    probe = ix.search(keys, k=4)
    _, make, err = case
    with pytest.raises(err):
        ix.add(*make(keys))
    assert _snapshot(ix) == before
    after = ix.search(keys, k=4)
    np.testing.assert_array_equal(after.edit_ids, probe.edit_ids)


BAD_OTHER = [
    ("add_keys unknown", lambda ix, k: ix.add_keys(555, k[:1], 0.5), UnknownIdError),
    ("add_keys unknown, no keys", lambda ix, k: ix.add_keys(555, np.zeros((0, D)), 0.5), UnknownIdError),
    ("add_keys nan", lambda ix, k: ix.add_keys(3, np.full((1, D), np.nan), 0.5), InvalidVectorError),
    ("add_keys dim", lambda ix, k: ix.add_keys(3, k[:, :3], 0.5), DimensionError),
    ("add_keys thr", lambda ix, k: ix.add_keys(3, k[:2], [0.1, 2.0]), ThresholdError),
    ("remove unknown", lambda ix, k: ix.remove([1, 2, 555]), UnknownIdError),
    ("remove negative", lambda ix, k: ix.remove([1, -4]), InvalidIdError),
    ("set unknown", lambda ix, k: ix.set_thresholds([1, 555], [0.1, 0.2]), UnknownIdError),
    ("set range", lambda ix, k: ix.set_thresholds([1, 2], [0.1, 1.2]), ThresholdError),
    ("set shape", lambda ix, k: ix.set_thresholds([1, 2], [0.1, 0.2, 0.3]), ThresholdError),
    ("set duplicate", lambda ix, k: ix.set_thresholds([1, 1], [0.1, 0.2]), DuplicateIdError),
    ("set_key length", lambda ix, k: ix.set_key_thresholds(1, [0.1, 0.2, 0.3]), ThresholdError),
    ("set_key unknown", lambda ix, k: ix.set_key_thresholds(555, [0.1, 0.2]), UnknownIdError),
    ("replace unknown", lambda ix, k: ix.replace_keys(555, k[:1], 0.5), UnknownIdError),
    ("replace empty", lambda ix, k: ix.replace_keys(1, np.zeros((0, D)), 0.5), DimensionError),
    ("replace zero", lambda ix, k: ix.replace_keys(1, np.zeros((1, D)), 0.5), InvalidVectorError),
    ("keys_of unknown", lambda ix, k: ix.keys_of(555), UnknownIdError),
    ("search k=0", lambda ix, k: ix.search(k, k=0), InvalidArgumentError),
    ("search k float", lambda ix, k: ix.search(k, k=2.0), InvalidArgumentError),
    ("search dim", lambda ix, k: ix.search(k[:, :3]), DimensionError),
    ("search nan", lambda ix, k: ix.search(np.full((1, D), np.nan)), InvalidVectorError),
    ("match zero", lambda ix, k: ix.match(np.zeros((2, D))), InvalidVectorError),
    ("match dtype", lambda ix, k: ix.match(np.array([["x"] * D])), InvalidVectorError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_OTHER, ids=[c[0] for c in BAD_OTHER])
def test_other_bad_calls_leave_state_unchanged(backend, case):
    ix, keys = _filled(backend)
    before = _snapshot(ix)
    _, call, err = case
    with pytest.raises(err):
        call(ix, keys)
    assert _snapshot(ix) == before


def test_empty_and_odd_inputs():
    rng = np.random.default_rng(5)
    ix = ScopedIndex(D)
    ix.add(np.zeros(0, dtype=np.int64), np.zeros((0, D)), np.zeros(0))  # nothing to add is fine
    ix.add(np.array([3], dtype=np.uint8), unit(rng, 1, D), np.float64(0.2))
    ix.add([np.int32(4)], unit(rng, 1, D).astype(np.float16), [1])  # ints/float16 cast cleanly
    assert ix.edit_ids().tolist() == [3, 4]
    assert ix.search(np.zeros((0, D)), k=2).edit_ids.shape == (0, 2)
    assert ix.match(np.zeros((0, D))).shape == (0,)
    tiny = np.full((1, D), 1e-30)  # squared norm underflows float32; still a direction
    ix.add([5], tiny, 0.5)
    np.testing.assert_allclose(np.linalg.norm(ix.keys_of(5)[0]), 1, atol=1e-6)


@pytest.mark.parametrize("backend", ["flat", "hnsw"])
def test_replace_keys_is_atomic_swap(backend):
    rng = np.random.default_rng(6)
    ix = ScopedIndex(D, backend=backend)
    old, new = unit(rng, 2, D), unit(rng, 3, D)
    ix.add([1, 1], old, 0.95)
    ix.add([2], unit(rng, 1, D), 0.95)
    ix.replace_keys(1, new, [0.9, 0.91, 0.92])
    k, t = ix.keys_of(1)
    np.testing.assert_allclose(k, new, atol=1e-6)
    np.testing.assert_allclose(t, [0.9, 0.91, 0.92])
    assert (ix.match(new) == 1).all()
    assert (ix.match(old) != 1).all()


def test_index_package_does_not_import_torch():
    code = ("import sys, numpy as np; import index; ix = index.ScopedIndex(4, backend='auto'); "
            "ix.add([1], np.eye(4)[:1], 0.5); ix.match(np.eye(4)); "
            "ix.maybe_in_scope(index.as_unit_rows(np.eye(4), 4)); import index.bench; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for path in (root / "index").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
