"""One writer adding/removing/rebuilding while several readers search: no errors, consistent results."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _index_fixtures import near, single_faiss_thread, unit

from index import IndexConfig, ScopedIndex

_ = single_faiss_thread  # autouse fixture
D = 16
STABLE = 40  # edits 0..39 are never touched by the writer


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw", "auto"])
def test_readers_during_writes(backend):
    rng = np.random.default_rng(0)
    cfg = IndexConfig(ivf_min_train=150, auto_ivf_keys=200, ivf_growth=2.0, min_dead_to_compact=20)
    ix = ScopedIndex(D, backend=backend, config=cfg)
    stable_keys = unit(rng, STABLE, D)
    ix.add(np.arange(STABLE), stable_keys, 0.9)
    queries = near(rng, stable_keys, 0.05)
    ever_added = set(range(STABLE))
    errors: list[BaseException] = []
    stop = threading.Event()
    checks = [0]

    def writer():
        wrng = np.random.default_rng(1)
        live: list[int] = []
        next_id = 1000
        try:
            for step in range(150):
                n = int(wrng.integers(1, 8))
                ids = list(range(next_id, next_id + n))
                ever_added.update(ids)
                next_id += n
                # Writer keys are far from the stable queries' scopes (thresholds 0.999).
                ix.add(ids, unit(wrng, n, D), 0.999)
                live.extend(ids)
                if step % 3 == 0 and live:
                    drop = [live.pop(int(wrng.integers(len(live)))) for _ in range(min(len(live), 4))]
                    ix.remove(drop)
                if step % 7 == 0 and live:
                    ix.set_thresholds([live[0]], [0.9995])
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    def reader(seed: int):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                rows = r.choice(STABLE, size=4, replace=False)
                got = ix.match(queries[rows])
                assert (got == rows).all(), (got, rows)
                res = ix.search(queries[rows], k=3)
                assert (res.edit_ids[:, 0] == rows).all()
                seen = set(res.edit_ids.ravel().tolist()) - {-1}
                assert seen <= ever_added
                assert len(ix.edit_ids()) >= STABLE
                checks[0] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in (2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors[0]
    assert checks[0] > 0
    assert (ix.match(queries) == np.arange(STABLE)).all()
    if backend in ("ivf", "auto"):
        assert ix.structure == "ivf"  # the writer drove it through training while readers ran
