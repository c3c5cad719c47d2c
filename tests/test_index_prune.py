"""`ScopedIndex.maybe_in_scope`: the exact, sublinear rule-out every routed call starts with.

Clustered keys (as real embeddings are) with per-key thresholds; the filter must agree with a full
margin scan on every row, actually skip most clusters for far queries, and stay exact while keys
are added (joining and widening clusters), removed, re-thresholded, compacted and re-clustered.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _index_fixtures import near, single_faiss_thread, unit

from index import IndexConfig, ScopedIndex, UnitRows
from index.errors import DimensionError, InvalidArgumentError, InvalidVectorError

_ = single_faiss_thread  # autouse fixture

D = 32
CFG = IndexConfig(prune_min_keys=300, min_dead_to_compact=16)


def _clustered(rng: np.random.Generator, n_topics: int, per_topic: int, spread: float = 0.35) -> np.ndarray:
    centers = unit(rng, n_topics, D)
    return near(rng, np.repeat(centers, per_topic, axis=0), spread)


def _filled(seed: int = 0) -> tuple[ScopedIndex, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    keys = _clustered(rng, 40, 30)
    ids = np.arange(keys.shape[0]) // 2  # two keys per edit
    thr = rng.uniform(0.9, 0.99, keys.shape[0]).astype(np.float32)
    ix = ScopedIndex(D, config=CFG)
    ix.add(ids, keys, thr)
    return ix, keys, rng


def _queries(rng: np.random.Generator, keys: np.ndarray) -> np.ndarray:
    """Far (random), near-miss (perturbed keys around their thresholds) and in-scope rows."""
    pick = keys[rng.choice(keys.shape[0], 40, replace=False)]
    return np.vstack([unit(rng, 30, D), near(rng, pick[:20], 0.5), near(rng, pick[20:], 0.05)])


def _check_exact(ix: ScopedIndex, q: np.ndarray) -> np.ndarray:
    got = ix.maybe_in_scope(q)
    assert got.dtype == bool and got.shape == (q.shape[0],)
    np.testing.assert_array_equal(got, ix.scan_margins(q) >= -ix.scan_error)
    return got


def test_rule_out_is_exact_and_skips_most_clusters():
    ix, keys, rng = _filled()
    q = _queries(rng, keys)
    got = _check_exact(ix, q)
    res = ix.search(q, k=3)
    assert not res.in_scope[~got].any()  # ruled out means nothing in scope
    assert got[-20:].all() and not got[:30].any()  # the mix is a real test: both outcomes occur
    f = ix._cones.current
    assert f is not None and f.table is ix._table
    # far queries keep a small share of the clusters: that is what makes the call sublinear
    kept = (q[:30] @ f.cent.T >= f.cut).mean()
    assert kept < 0.1, kept


def test_small_index_scans_and_bad_queries_are_typed_errors():
    ix = ScopedIndex(D, config=CFG)
    rng = np.random.default_rng(1)
    assert ix.maybe_in_scope(unit(rng, 2, D)).tolist() == [False, False]  # empty index
    ix.add([1, 2], unit(rng, 2, D), 0.5)
    _check_exact(ix, unit(rng, 5, D))
    assert ix._cones.current is None  # below prune_min_keys: a plain scan
    with pytest.raises(DimensionError):
        ix.maybe_in_scope(np.ones((1, D + 1), np.float32))
    with pytest.raises(InvalidVectorError):
        ix.maybe_in_scope(np.full((1, D), np.nan))
    with pytest.raises(InvalidVectorError):
        ix.maybe_in_scope(np.zeros(D))
    with pytest.raises(InvalidArgumentError):  # a UnitRows vouches for float32 rows only
        ix.maybe_in_scope(UnitRows.trusted(np.ones((1, D), np.float64)))
    with pytest.raises(DimensionError):
        ix.maybe_in_scope(UnitRows.trusted(np.ones((1, D + 1), np.float32)))
    assert ix.maybe_in_scope(np.zeros((0, D), np.float32)).shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [{"prune_min_keys": 0}, {"prune_growth": 1.0}, {"prune_keys_per_cluster": 0}, {"prune_max_clusters": -1},
     {"prune_growth": True}],
)
def test_config_is_validated(bad):
    with pytest.raises(InvalidArgumentError):
        IndexConfig(**bad)


def test_stays_exact_through_every_mutation():
    ix, keys, rng = _filled(2)
    q = _queries(rng, keys)
    _check_exact(ix, q)
    first = ix._cones.current
    # a key far from every centroid joins the nearest cluster and widens its cone: a query on
    # top of it must still be kept
    lone = unit(rng, 1, D)
    ix.add([10_000], lone, 0.99)
    probe = np.vstack([lone, q])
    assert _check_exact(ix, probe)[0]
    now = ix._cones.current
    assert now is not first and now.cent is first.cent  # updated, not re-clustered
    # thresholds lowered make rows in scope that were not; raised, the reverse
    ix.set_thresholds(np.arange(0, 300, 7), -0.5)
    assert _check_exact(ix, probe).all()
    ix.set_thresholds(np.arange(0, 300, 7), 0.999)
    _check_exact(ix, probe)
    # remove most edits: dead keys hold nothing, then compaction carries the filter over
    table = ix._table
    ix.remove(np.arange(0, 600, 2))
    _check_exact(ix, probe)
    assert ix._table is not table  # compacted
    _check_exact(ix, probe)
    assert ix._cones.current.table is ix._table and ix._cones.current.cent is first.cent
    # growth past prune_growth re-clusters
    more = _clustered(rng, 40, 50)  # live keys grow past prune_growth x those clustered
    ix.add(np.arange(20_000, 20_000 + more.shape[0]), more, 0.95)
    _check_exact(ix, np.vstack([probe, near(rng, more[:10], 0.05)]))
    assert ix._cones.current.cent is not first.cent


def test_concurrent_readers_and_a_writer_stay_exact():
    ix, keys, rng = _filled(3)
    q = _queries(rng, keys)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                rows = q[r.choice(q.shape[0], 8, replace=False)]
                ix.maybe_in_scope(rows)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            ix.add(np.arange(50_000 + 10 * i, 50_010 + 10 * i), _clustered(rng, 1, 10), 0.95)
            ix.remove([i])
            ix.set_thresholds([100 + i], 0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    _check_exact(ix, q)


def test_loading_builds_the_filter_and_it_stays_exact(tmp_path):
    ix, keys, rng = _filled(4)
    ix.save(tmp_path / "ix")
    back = ScopedIndex.load(tmp_path / "ix")
    assert back._cones.current is not None and back._cones.current.table is back._table
    q = _queries(rng, keys)
    np.testing.assert_array_equal(_check_exact(back, q), _check_exact(ix, q))


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw"])
def test_reconfigure_switches_the_rule_out_on_and_keeps_every_answer(backend):
    rng = np.random.default_rng(9)
    keys = _clustered(rng, 20, 20)
    ix = ScopedIndex(D, backend=backend, config=IndexConfig(ivf_min_train=100, min_dead_to_compact=10_000))
    ix.add(np.arange(keys.shape[0]), keys, rng.uniform(0.9, 0.99, keys.shape[0]).astype(np.float32))
    ix.remove(np.arange(0, 400, 9))
    q = _queries(rng, keys)
    before = (ix.maybe_in_scope(q), ix.match(q), ix.scan_margins(q))
    assert ix._cones.current is None  # 400 keys: below the default prune_min_keys, a plain scan
    with pytest.raises(InvalidArgumentError):
        ix.reconfigure({"prune_min_keys": 8})  # type: ignore[arg-type]
    cfg = IndexConfig(prune_min_keys=8, prune_keys_per_cluster=2, ivf_min_train=100, min_dead_to_compact=16)
    ix.reconfigure(cfg)
    assert ix.config == cfg and ix.stats()["dead_slots"] == 0  # rebuilt now, as compact does
    ix.prepare_rule_out()
    assert ix._cones.current is not None  # the cluster filter answers now
    after = (_check_exact(ix, q), ix.match(q), ix.scan_margins(q))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[2], before[2], atol=ix.scan_error)
