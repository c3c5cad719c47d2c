"""Hostile inputs and damaged files: every one refused with a typed error, and nothing changed.

The fixed catalogue (`tests/_fuzz_fixtures.py`, `tests/_fuzz_files.py`) is run case by case;
hypothesis then generates more of each kind (bounded, derandomized so CI is deterministic).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from _fuzz_files import flip_bytes, loader_cases
from _fuzz_fixtures import (
    fuzz_index,
    fuzz_memory,
    image_cases,
    index_cases,
    index_state,
    memory_cases,
    memory_state,
    png_header,
    run_case,
    save_targets_intact,
    summarize,
)
from _memory_fixtures import HashKeyEncoder, png_bytes, shape_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from esg_memory.errors import EsgMemoryError, ImageError, InvalidInputError
from esg_memory.images import LoadedImage, load_image
from esg_memory.memory import MAX_TEXT_CHARS, EditMemory
from index import ScopedIndex
from index.errors import ScopedIndexError

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def fm():
    return fuzz_memory()


def _assert_all_refused(outcomes):
    bad = [f for s in summarize(outcomes).values() for f in s["failed"]]
    assert not bad, f"{len(bad)} of {len(outcomes)} hostile inputs not refused cleanly:\n" + "\n".join(bad)


def test_memory_catalogue_refused_and_state_unchanged(fm, tmp_path):
    mem, info = fm
    cases = memory_cases(mem, info, tmp_path)
    assert len(cases) > 300
    assert {c.category for c in cases} >= {"ids", "texts", "images", "arrays", "structure"}
    _assert_all_refused([run_case(c, lambda: memory_state(mem)) for c in cases])
    assert save_targets_intact(tmp_path / "targets"), "a refused save damaged what was at its target"
    # the memory still works after all that
    assert mem.route(images=[info.red], texts=["what color is the circle?"]).edit_ids.tolist() == [info.a]


def test_state_fingerprint_sees_every_kind_of_change(tmp_path):
    """The 'unchanged' check must be able to fail: each real write moves the fingerprint."""
    mem, info = fuzz_memory()
    seen = {memory_state(mem)}
    for write in (
        lambda: mem.attach(info.b, "adapter", b"other"),
        lambda: mem.revise(info.c, answer="shakespeare"),
        lambda: mem.rollback(info.c, version=1),
        lambda: mem.feedback(None, "who is the author of hamlet?", info.c),
        lambda: mem.add(None, "brand new question?", "new"),
        lambda: mem.delete(info.b),
    ):
        write()
        s = memory_state(mem)
        assert s not in seen
        seen.add(s)


def test_load_image_catalogue_and_allowed_root(tmp_path):
    cases = image_cases(tmp_path)
    _assert_all_refused([run_case(c, lambda: "") for c in cases])
    escape = next(c for c in cases if c.name == "allowed_root: symlink inside pointing outside")
    with pytest.raises(ImageError, match="outside the allowed root"):
        escape.call()
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(png_header(40000, 40000))
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(png_header(9000, 9000))
    # controls: the same machinery accepts what is legitimately inside the root
    root = tmp_path / "root"
    assert load_image("inside.png", allowed_root=root).image.size == (32, 32)
    assert load_image("sub/../inside.png", allowed_root=root).image.size == (32, 32)


def test_index_catalogue_refused_and_state_unchanged(tmp_path):
    ix = fuzz_index()
    cases = index_cases(ix, tmp_path)
    _assert_all_refused([run_case(c, lambda: index_state(ix)) for c in cases])
    assert save_targets_intact(tmp_path / "index-targets")
    assert ix.edit_ids().tolist() == [0, 1, 5]


def test_loaders_refuse_damaged_directories(fm, tmp_path):
    mem, _ = fm
    cases = loader_cases(mem, tmp_path, seed=0, n_flips=24)
    # control: the undamaged copy loads into exactly the same memory
    loaded = EditMemory.load(tmp_path / "pristine", encoder=HashKeyEncoder(32))
    assert memory_state(loaded) == memory_state(mem)
    _assert_all_refused([run_case(c, lambda: memory_state(mem)) for c in cases])


# ------------------------------------------------------------------------------------ hypothesis

_invalid_text = st.one_of(
    st.text(alphabet=" \t\n\r\x0b\x0c", max_size=20),
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map(lambda t: t[0] + "\x00" + t[1]),
    st.tuples(st.text(max_size=10), st.integers(0xD800, 0xDFFF)).map(lambda t: t[0] + chr(t[1]) + "?"),
    st.integers(MAX_TEXT_CHARS + 1, MAX_TEXT_CHARS + 64).map(lambda n: "q" * n),
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=8),
    st.lists(st.text(min_size=1, max_size=5), max_size=2),
)


@FUZZ
@given(q=_invalid_text, where=st.sampled_from(["question", "answer", "revise", "route", "positive"]))
def test_invalid_texts_refused(fm, q, where):
    mem, info = fm
    before = memory_state(mem)
    call = {
        "question": lambda: mem.add(None, q, "x"),
        "answer": lambda: mem.add(None, "a valid question?", q),
        "revise": lambda: mem.revise(info.a, answer=q),
        "route": lambda: mem.route(texts=[q]),
        "positive": lambda: mem.add(None, "a valid question?", "x", positives=[q]),
    }[where]
    with pytest.raises(InvalidInputError):
        call()
    assert memory_state(mem) == before


_invalid_id = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63),
    st.integers(1000, 10**9),  # unknown
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
)


@FUZZ
@given(
    eid=_invalid_id,
    op=st.sampled_from(["get", "delete", "revise", "rollback", "history", "attach", "add"]),
)
def test_invalid_ids_refused(fm, eid, op):
    mem, _ = fm
    if op == "add" and (eid is None or (type(eid) is int and 0 <= eid < 2**63 - 1)):
        eid = 0  # None and unused ids are valid for add; an existing one is not
    before = memory_state(mem)
    call = {
        "get": lambda: mem.get(eid),
        "delete": lambda: mem.delete(eid),
        "revise": lambda: mem.revise(eid, answer="x"),
        "rollback": lambda: mem.rollback(eid, version=1),
        "history": lambda: mem.history(eid),
        "attach": lambda: mem.attach(eid, "k", b"x"),
        "add": lambda: mem.add(None, "yet another question?", "x", edit_id=eid),
    }[op]
    with pytest.raises(EsgMemoryError):
        call()
    assert memory_state(mem) == before


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_never_crash_the_image_loader(data):
    try:
        got = load_image(data)
    except ImageError:
        return
    assert isinstance(got, LoadedImage) and got.image.mode == "RGB"


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), cut=st.floats(0.0, 1.0))
def test_damaged_pngs_are_decoded_or_refused(seed, n, cut, tmp_path_factory):
    png = bytearray(png_bytes(shape_image("red")))
    rng = random.Random(seed)
    for _ in range(n):
        png[rng.randrange(len(png))] ^= 1 << rng.randrange(8)
    data = bytes(png[: max(1, int(len(png) * cut))] if cut < 0.95 else png)
    try:
        got = load_image(data)
    except ImageError:
        return
    assert got.image.mode == "RGB" and got.image.size[0] > 0


_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.complex64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
)


def _valid_keys(a: np.ndarray, dim: int) -> bool:
    if a.dtype.kind not in "biuf":
        return False
    b = a.reshape(1, -1) if a.ndim == 1 else a
    if b.ndim != 2 or b.shape[1] != dim:
        return False
    with np.errstate(all="ignore"):
        f = b.astype(np.float32).astype(np.float64)
    return bool(np.isfinite(f).all() and (np.linalg.norm(f, axis=1) > 1e-12).all())


@FUZZ
@given(a=_arrays, poison=st.sampled_from([None, np.nan, np.inf, -np.inf, 0.0]))
def test_random_arrays_as_route_keys(fm, a, poison):
    mem, _ = fm
    if poison is not None and a.size and a.dtype.kind in "fc":
        a = a.copy()
        a.flat[0] = poison
    before = memory_state(mem)
    if _valid_keys(a, 32):
        assert len(mem.route(keys=a)) == (1 if a.ndim == 1 else a.shape[0])
    else:
        with pytest.raises(InvalidInputError):
            mem.route(keys=a)
    assert memory_state(mem) == before


@FUZZ
@given(
    ids=st.lists(st.one_of(st.integers(-3, 12), st.integers(2**63, 2**64)), min_size=1, max_size=4),
    rows=st.integers(0, 5),
    dim=st.sampled_from([15, 16, 17]),
    thr=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.lists(st.floats(-2, 2), max_size=5)),
    op=st.sampled_from(["add", "add_keys", "replace_keys", "remove", "set_thresholds"]),
)
def test_random_index_writes_are_all_or_nothing(ids, rows, dim, thr, op):
    ix = fuzz_index(16)
    before = index_state(ix)
    keys = np.random.default_rng(len(ids) + rows).standard_normal((rows, dim))
    call = {
        "add": lambda: ix.add(ids, keys, thr),
        "add_keys": lambda: ix.add_keys(ids[0], keys, thr),
        "replace_keys": lambda: ix.replace_keys(ids[0], keys, thr),
        "remove": lambda: ix.remove(ids),
        "set_thresholds": lambda: ix.set_thresholds(ids, thr),
    }[op]
    try:
        call()
    except ScopedIndexError:
        assert index_state(ix) == before
        return
    # accepted: the index must be consistent and still answer queries
    assert ix.match(np.ones((1, 16))).shape == (1,)


@FUZZ
@given(seed=st.integers(0, 10**6), n=st.integers(1, 3))
def test_random_flips_in_a_saved_index_are_refused_or_harmless(seed, n, tmp_path_factory):
    ix = fuzz_index(16)
    d = tmp_path_factory.mktemp("ix") / "ix"
    ix.save(d)
    rng = random.Random(seed)
    files = sorted(p for p in d.iterdir() if p.is_file())
    for _ in range(n):
        flip_bytes(rng.choice(files), rng)
    try:
        got = ScopedIndex.load(d)
    except ScopedIndexError:
        return
    assert index_state(got) == index_state(ix), "a damaged index loaded into a different state"


def test_pil_image_limits_apply_before_conversion():
    big = Image.new("1", (9000, 9000))  # 10 MB as 1-bit; 243 MB if converted to RGB first
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(big)


def test_durable_directories_refuse_damage_or_drop_only_a_torn_last_record(tmp_path):
    from _fuzz_files import durable_cases

    cases = durable_cases(tmp_path, seed=0, n_flips=12)
    _assert_all_refused([run_case(c, lambda: "") for c in cases])
