"""Save/load round trips and every kind of damaged or foreign directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _index_fixtures import near, single_faiss_thread, unit

import index.persist as persist
from index import IndexConfig, IndexFormatError, InvalidArgumentError, ScopedIndex, read_index, write_index

_ = single_faiss_thread  # autouse fixture
D = 16


def _built(backend: str, seed: int = 0) -> tuple[ScopedIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    cfg = IndexConfig(ivf_min_train=200, auto_ivf_keys=300, min_dead_to_compact=1000)
    ix = ScopedIndex(D, backend=backend, config=cfg)
    keys = unit(rng, 600, D)
    ix.add(np.arange(400).repeat([2] * 200 + [1] * 200), keys, rng.uniform(0.5, 0.95, 600).astype(np.float32))
    ix.remove(np.arange(0, 400, 7))  # removed keys still sit in flat/hnsw structures: saved too
    ix.set_key_thresholds(1, [0.3, 0.4])
    queries = np.vstack([near(rng, keys[::5], 0.2), unit(rng, 20, D)])
    return ix, queries


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw", "auto"])
def test_round_trip_gives_identical_results(tmp_path, backend):
    ix, queries = _built(backend)
    if backend in ("ivf", "auto"):
        assert ix.structure == "ivf"
    path = tmp_path / "ix"
    ix.save(path)
    meta = json.loads((path / "index.json").read_text())
    assert meta["format_version"] == persist.FORMAT_VERSION and meta["dim"] == D
    assert meta["backend"] == backend
    assert meta["metric"] == "cosine" and meta["counts"]["edits"] == len(ix)
    assert set(meta["files"]) == set(persist._FILES)
    back = ScopedIndex.load(path)
    assert back.backend == backend and back.structure == ix.structure and back.config == ix.config
    assert back.edit_ids().tolist() == ix.edit_ids().tolist()
    for e in ix.edit_ids()[:50].tolist():
        for a, b in zip(ix.keys_of(e), back.keys_of(e), strict=True):
            np.testing.assert_array_equal(a, b)
    r1, r2 = ix.search(queries, k=5), back.search(queries, k=5)
    for f in ("edit_ids", "scores", "in_scope", "thresholds"):
        np.testing.assert_array_equal(getattr(r1, f), getattr(r2, f))
    np.testing.assert_array_equal(ix.match(queries), back.match(queries))
    # The loaded index keeps working: removals, additions and a second save.
    back.remove([2, 3])
    back.add([1000], queries[:1], 0.5)
    assert back.match(queries[:1])[0] == 1000
    back.save(path)  # overwrite in place
    again = ScopedIndex.load(path)
    assert 1000 in again and 2 not in again


@pytest.mark.parametrize("backend", ["flat", "ivf", "hnsw", "auto"])
def test_write_index_and_read_index_are_save_and_load(tmp_path, backend):
    ix, queries = _built(backend)
    ix.save(tmp_path / "saved")
    write_index(ix, tmp_path / "written")
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "written").iterdir()) == sorted([*persist._FILES,
                                                                                         "index.json"])
    for name in names:  # the same files, bit for bit
        assert (tmp_path / "saved" / name).read_bytes() == (tmp_path / "written" / name).read_bytes(), name
    loaded, read = ScopedIndex.load(tmp_path / "written"), read_index(tmp_path / "saved")
    assert isinstance(read, ScopedIndex)
    assert read.stats() == loaded.stats() == ix.stats() and read.config == ix.config
    r1, r2 = read.search(queries, k=4), loaded.search(queries, k=4)
    for f in ("edit_ids", "scores", "in_scope", "thresholds", "key_positions"):
        np.testing.assert_array_equal(getattr(r1, f), getattr(r2, f))
    np.testing.assert_array_equal(read.maybe_in_scope(queries), ix.maybe_in_scope(queries))
    # what read_index gives is what load gives, down to the files it writes (an IVF structure is
    # not byte-stable through a load, which rebuilds its direct map: compare load with load)
    write_index(read, tmp_path / "again_w")
    loaded.save(tmp_path / "again_s")
    for name in names:
        assert (tmp_path / "again_w" / name).read_bytes() == (tmp_path / "again_s" / name).read_bytes(), name
    with pytest.raises(InvalidArgumentError):
        write_index(object(), tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(IndexFormatError):
        read_index(tmp_path / "nothing_here")


def test_empty_index_round_trip(tmp_path):
    ScopedIndex(D, backend="hnsw").save(tmp_path / "e")
    back = ScopedIndex.load(tmp_path / "e")
    assert len(back) == 0 and back.backend == "hnsw"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ix, _ = _built("ivf", seed=1)
    path = tmp_path_factory.mktemp("good") / "ix"
    ix.save(path)
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "ix"
    shutil.copytree(saved, dst)
    return dst


def _edit_json(path, fn):
    meta = json.loads((path / "index.json").read_text())
    meta.pop("checksum", None)  # a hand edit would fail the self-checksum; test the field checks behind it
    fn(meta)
    (path / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", list(persist._FILES))
def test_flipped_byte_is_a_checksum_error(saved, tmp_path, name):
    p = _copy(saved, tmp_path)
    data = bytearray((p / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (p / name).write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum"):
        ScopedIndex.load(p)


@pytest.mark.parametrize("name", list(persist._FILES))
def test_truncated_or_missing_file(saved, tmp_path, name):
    p = _copy(saved, tmp_path)
    (p / name).write_bytes((p / name).read_bytes()[:-10])
    with pytest.raises(IndexFormatError, match="truncated"):
        ScopedIndex.load(p)
    (p / name).unlink()
    with pytest.raises(IndexFormatError, match="missing"):
        ScopedIndex.load(p)


@pytest.mark.parametrize("change,msg", [
    (lambda m: m.update(format_version=2), "newer"),
    (lambda m: m.update(format_version="1"), "unknown format_version"),
    (lambda m: m.update(format_version=0), "unknown format_version"),
    (lambda m: m.update(format="something-else"), "foreign"),
    (lambda m: m.update(dim=0), "dim"),
    (lambda m: m.update(backend="lsh"), "backend"),
    (lambda m: m["counts"].update(edits=1), "counts"),
    (lambda m: m["files"].pop("keys.npy"), "exactly"),
    (lambda m: m.update(structure={"kind": "pq"}), "structure"),
    (lambda m: m["structure"].update(kind="hnsw"), "expected a hnsw"),
    (lambda m: m["config"].update(ivf_nprobe=-1), "config"),
])
def test_bad_index_json(saved, tmp_path, change, msg):
    p = _copy(saved, tmp_path)
    _edit_json(p, change)
    with pytest.raises(IndexFormatError, match=msg):
        ScopedIndex.load(p)


def test_consistent_checksums_but_inconsistent_arrays(saved, tmp_path):
    # Files rewritten *with* matching checksums must still be cross-checked.
    import hashlib
    import io

    p = _copy(saved, tmp_path)
    thr = np.load(p / "key_thresholds.npy")
    thr[0] = 3.0
    buf = io.BytesIO()
    np.save(buf, thr, allow_pickle=False)
    (p / "key_thresholds.npy").write_bytes(buf.getvalue())
    _edit_json(p, lambda m: m["files"]["key_thresholds.npy"].update(
        sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue())))
    with pytest.raises(IndexFormatError, match="thresholds"):
        ScopedIndex.load(p)


def test_foreign_and_missing_directories(tmp_path):
    with pytest.raises(IndexFormatError, match="not a directory"):
        ScopedIndex.load(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(IndexFormatError, match=r"no index\.json"):
        ScopedIndex.load(tmp_path / "other")
    (tmp_path / "other" / "index.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable"):
        ScopedIndex.load(tmp_path / "other")
    (tmp_path / "other" / "index.json").write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="foreign"):
        ScopedIndex.load(tmp_path / "other")


def test_failed_save_keeps_previous_version(tmp_path, monkeypatch):
    ix, queries = _built("flat")
    path = tmp_path / "ix"
    ix.save(path)
    ix.add([5000], queries[:1], 0.5)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(persist.json, "dumps", boom)
    with pytest.raises(OSError):
        ix.save(path)
    monkeypatch.undo()
    back = ScopedIndex.load(path)
    assert 5000 not in back and len(back) == len(ix) - 1
    assert not [p for p in tmp_path.iterdir() if p.name != "ix"]  # no temp dirs left behind
