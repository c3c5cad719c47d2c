"""Every backend against the brute-force oracle over random add/remove/set/search sequences."""

from __future__ import annotations

import numpy as np
import pytest
from _index_fixtures import Oracle, check_match, check_search_row, near, single_faiss_thread, unit

from index import IndexConfig, ScopedIndex

D = 16
_ = single_faiss_thread  # autouse fixture

# Small thresholds so IVF trains, retrains and compacts, HNSW/flat compact, and the rule-out filter
# of `maybe_in_scope` clusters, re-clusters and is carried over compactions, within a short run.
_PRUNE = {"prune_min_keys": 80, "prune_growth": 1.5}
CONFIGS = {
    "flat": IndexConfig(min_dead_to_compact=16, **_PRUNE),
    "ivf": IndexConfig(ivf_min_train=150, ivf_growth=2.0, min_dead_to_compact=16, ivf_nprobe=8, **_PRUNE),
    "hnsw": IndexConfig(min_dead_to_compact=16),
    "auto": IndexConfig(auto_ivf_keys=250, ivf_growth=2.0, min_dead_to_compact=16, ivf_nprobe=8, **_PRUNE),
}


def _thresholds(rng: np.random.Generator, n: int) -> np.ndarray:
    t = rng.uniform(0.3, 0.95, size=n)
    low = rng.random(n) < 0.05  # a few wide scopes force match to deepen its candidate list
    t[low] = rng.uniform(-0.5, 0.3, size=int(low.sum()))
    return t.astype(np.float32)


def _run_sequence(backend: str, seed: int, steps: int = 70):
    rng = np.random.default_rng(seed)
    ix = ScopedIndex(D, backend=backend, config=CONFIGS[backend])
    oracle = Oracle()
    next_id = 0
    exact = backend == "flat" or (backend in ("ivf", "auto") and ix.structure == "flat")
    stats = {"match_ok": 0, "match_n": 0, "top1_ok": 0, "top1_n": 0, "exact_rows": 0, "structures": set()}
    for _ in range(steps):
        op = rng.choice(["add", "add", "add", "add_keys", "remove", "set", "set_key", "replace"])
        present = sorted(oracle.keys)
        if op == "add" or not present:
            n_edits = int(rng.integers(1, 25))
            reps = rng.integers(1, 4, size=n_edits)
            ids = np.repeat(np.arange(next_id, next_id + n_edits), reps)
            rng.shuffle(ids)
            next_id += n_edits
            keys, thr = unit(rng, ids.size, D), _thresholds(rng, ids.size)
            ix.add(ids, keys, thr)
            oracle.add(ids, keys, thr)
        elif op == "add_keys":
            e = int(rng.choice(present))
            keys = near(rng, oracle.keys[e][:1].astype(np.float32), 0.5)
            keys = np.vstack([keys, unit(rng, int(rng.integers(0, 2)), D)])
            thr = _thresholds(rng, keys.shape[0])
            ix.add_keys(e, keys, thr)
            oracle.add([e] * keys.shape[0], keys, thr)
        elif op == "remove":
            victims = rng.choice(present, size=min(len(present), int(rng.integers(1, 12))), replace=False)
            ix.remove(victims)
            oracle.remove(victims.tolist())
        elif op == "set":
            ids = rng.choice(present, size=min(len(present), 5), replace=False)
            thr = _thresholds(rng, ids.size)
            ix.set_thresholds(ids, thr)
            oracle.set_thresholds(ids.tolist(), thr)
        elif op == "set_key":
            e = int(rng.choice(present))
            thr = _thresholds(rng, oracle.thr[e].size)
            ix.set_key_thresholds(e, thr)
            oracle.set_key_thresholds(e, thr)
        else:
            e = int(rng.choice(present))
            keys, thr = unit(rng, int(rng.integers(1, 3)), D), float(_thresholds(rng, 1)[0])
            ix.replace_keys(e, keys, thr)
            oracle.remove([e])
            oracle.add([e] * keys.shape[0], keys, np.repeat(thr, keys.shape[0]))
        stats["structures"].add(ix.structure)
        exact = backend == "flat" or ix.structure == "flat"

        # State must agree exactly, whatever the backend.
        assert ix.edit_ids().tolist() == sorted(oracle.keys)
        assert len(ix) == len(oracle.keys)
        for e in rng.choice(sorted(oracle.keys), size=min(3, len(oracle.keys)), replace=False).tolist():
            kk, tt = ix.keys_of(e)
            np.testing.assert_allclose(kk, oracle.keys[e], atol=1e-6)
            np.testing.assert_array_equal(tt, oracle.thr[e])

        # Queries: near-duplicates of stored keys (in scope of something) and random ones.
        present = sorted(oracle.keys)
        src = rng.choice(present, size=min(6, len(present)), replace=False)
        base = np.vstack([oracle.keys[e][rng.integers(oracle.keys[e].shape[0])] for e in src.tolist()])
        queries = np.vstack([near(rng, base.astype(np.float32), 0.1), unit(rng, 4, D)])
        got = ix.match(queries)
        if exact:
            check_match(oracle, queries, got)
        else:
            for q, g in zip(queries, got.tolist(), strict=True):
                stats["match_n"] += 1
                stats["match_ok"] += int(g == oracle.match(q))
        # the rule-out is exact for every backend: never a row some key may hold, and every row
        # the full margin scan clears (the oracle's in-scope rows are among the kept ones)
        maybe = ix.maybe_in_scope(queries)
        np.testing.assert_array_equal(maybe, ix.scan_margins(queries) >= -ix.scan_error)
        for q, keep in zip(queries, maybe.tolist(), strict=True):
            assert keep or oracle.match(q) == -1
        k = int(rng.integers(1, 6))
        res = ix.search(queries, k=k)
        assert res.edit_ids.shape == (queries.shape[0], k) and res.edit_ids.dtype == np.int64
        assert res.scores.dtype == np.float32 and res.in_scope.dtype == bool
        for i, q in enumerate(queries):
            stats["exact_rows"] += check_search_row(oracle, q, k, res.edit_ids[i], res.scores[i],
                                                    res.thresholds[i], res.in_scope[i], exact_set=exact)
            if not exact and i < len(src):
                ids, nearest, *_ = oracle.per_edit(q)
                stats["top1_n"] += 1
                stats["top1_ok"] += int(ids[np.argmax(nearest)] in res.edit_ids[i].tolist())
    return ix, stats


@pytest.mark.parametrize("seed,wide_cap", [(0, 4096), (1, 0)])
def test_flat_equals_oracle(seed, wide_cap, monkeypatch):
    # wide_cap=0 turns off match's exact scoring of low-threshold keys: it must then deepen.
    monkeypatch.setattr(ScopedIndex, "_WIDE_CAP", wide_cap)
    _, stats = _run_sequence("flat", seed)
    assert stats["exact_rows"] > 300  # most rows are tie-free and compared id for id


@pytest.mark.parametrize("backend", ["ivf", "hnsw", "auto"])
def test_approximate_backends_recall(backend):
    _, stats = _run_sequence(backend, seed=7, steps=90)
    if backend != "hnsw":
        assert "ivf" in stats["structures"], stats["structures"]  # the sequence really reached IVF
    assert stats["match_n"] > 100
    assert stats["match_ok"] / stats["match_n"] >= 0.95, stats
    assert stats["top1_ok"] / stats["top1_n"] >= 0.95, stats


def test_growth_retrains_and_compaction_drops_removed():
    rng = np.random.default_rng(3)
    cfg = IndexConfig(ivf_min_train=200, ivf_growth=2.0, min_dead_to_compact=16)
    ix = ScopedIndex(D, backend="ivf", config=cfg)
    ix.add(np.arange(150), unit(rng, 150, D), 0.9)
    assert ix.structure == "flat"  # too small to train: exact
    ix.add(np.arange(150, 300), unit(rng, 150, D), 0.9)
    s1 = ix.stats()["structure"]
    assert s1["kind"] == "ivf" and s1["trained_n"] == 300
    ix.add(np.arange(300, 700), unit(rng, 400, D), 0.9)
    s2 = ix.stats()["structure"]
    assert s2["trained_n"] == 700 and s2["nlist"] >= s1["nlist"]  # retrained after growing 2x
    ix.remove(np.arange(0, 300))
    st = ix.stats()
    assert st["dead_slots"] == 0 and st["slots"] == 400 and st["faiss_ntotal"] == 400  # compacted
    ix.remove(np.arange(300, 650))
    assert ix.structure == "flat" and len(ix) == 50  # shrank far below the training floor: exact again
    keys, _ = ix.keys_of(699)
    assert ix.match(keys)[0] == 699


def test_hnsw_removed_are_filtered_then_rebuilt():
    rng = np.random.default_rng(4)
    ix = ScopedIndex(D, backend="hnsw", config=IndexConfig(min_dead_to_compact=50, max_dead_fraction=0.3))
    keys = unit(rng, 400, D)
    ix.add(np.arange(400), keys, 0.5)
    ix.remove(np.arange(0, 60))
    st = ix.stats()
    assert st["dead_slots"] == 60 and st["faiss_ntotal"] == 400  # still in the graph, filtered
    res = ix.search(keys[:60], k=5)
    assert (res.edit_ids >= 60).all()
    assert (ix.match(keys[:60]) != np.arange(60)).all()
    ix.remove(np.arange(60, 130))
    st = ix.stats()
    assert st["dead_slots"] == 0 and st["faiss_ntotal"] == 270  # passed 30 %: graph rebuilt
    np.testing.assert_array_equal(ix.match(keys[130:]), np.arange(130, 400))
