"""Smaller guarantees: thread settings restored, rebuild failures contained, compact(), benchmark CLI."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest
from _index_fixtures import single_faiss_thread, unit

import index.scoped as scoped
from index import IndexConfig, ScopedIndex

_ = single_faiss_thread  # autouse fixture
D = 16


def test_small_calls_restore_faiss_threads():
    rng = np.random.default_rng(0)
    faiss.omp_set_num_threads(2)
    try:
        ix = ScopedIndex(D, backend="ivf", config=IndexConfig(ivf_min_train=100))
        ix.add(np.arange(300), unit(rng, 300, D), 0.9)
        ix.match(unit(rng, 3, D))
        ix.remove([1])
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(1)


def test_failed_rebuild_keeps_index_working(monkeypatch, caplog):
    rng = np.random.default_rng(1)
    ix = ScopedIndex(D, backend="ivf", config=IndexConfig(ivf_min_train=100))
    keys = unit(rng, 150, D)
    ix.add(np.arange(50), keys[:50], 0.9)

    def boom(*a, **k):
        raise MemoryError("no room for k-means")

    monkeypatch.setattr(scoped, "build", boom)  # the structure builder every rebuild calls
    with caplog.at_level(logging.WARNING, logger="index.scoped"):
        ix.add(np.arange(50, 150), keys[50:], 0.9)  # crosses the training floor; rebuild fails
    assert "rebuild" in caplog.text
    assert len(ix) == 150 and ix.structure == "flat"
    np.testing.assert_array_equal(ix.match(keys), np.arange(150))
    with pytest.raises(MemoryError):
        ix.compact()  # an explicit request does raise
    monkeypatch.undo()
    ix.add([999], unit(rng, 1, D), 0.9)  # next write retries and succeeds
    assert ix.structure == "ivf"
    np.testing.assert_array_equal(ix.match(keys), np.arange(150))


@pytest.mark.parametrize("backend", ["flat", "hnsw", "ivf"])
def test_compact_drops_removed_slots(backend):
    rng = np.random.default_rng(2)
    ix = ScopedIndex(D, backend=backend, config=IndexConfig(ivf_min_train=100, min_dead_to_compact=10_000))
    keys = unit(rng, 200, D)
    ix.add(np.arange(200), keys, 0.9)
    ix.remove(np.arange(0, 200, 2))
    assert ix.stats()["dead_slots"] == 100
    ix.compact()
    st = ix.stats()
    assert st["dead_slots"] == 0 and st["slots"] == 100 and st["faiss_ntotal"] == 100
    np.testing.assert_array_equal(ix.match(keys[1::2]), np.arange(1, 200, 2))
    assert (ix.match(keys[::2]) == -1).all()


def test_benchmark_main_writes_table_and_json(tmp_path, capsys):
    from benchmarks.bench_index import main

    out = tmp_path / "b.json"
    assert main(["--sizes", "300", "--dim", "16", "--backends", "ivf", "hnsw", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| N | backend |" in text and "recall@1 vs flat" in text
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"flat", "ivf", "hnsw"}
    assert rows["flat"]["recall_at_1_vs_flat"] == 1.0 and rows["flat"]["match1_speedup_vs_flat"] == 1.0
    for r in rows.values():
        assert r["n_keys"] == 300 and r["match1_ms_median"] > 0 and r["bytes_per_key"] > 16 * 4
        assert 0.9 <= r["hit_rate"] <= 1.0
