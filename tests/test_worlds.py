"""The scenes world (issue #16): sizes, splits that make generalization measurable, deterministic renders,
and 10,000-edit streams whose locality probes no edit covers — checked symbolically, without rendering."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np
import pytest

from esg_memory.worlds import ScenesWorld, check_stream, plan_stream
from esg_memory.worlds.render import SIZES, Nuisance, SceneObject, render
from esg_memory.worlds.scenes import FAMILIES


@pytest.fixture(scope="module")
def world() -> ScenesWorld:
    return ScenesWorld()


@pytest.fixture(scope="module")
def stream(world):
    return plan_stream(world, 10_000, seed=0)


def test_the_space_is_large_enough_for_10k_streams(world):
    assert len(world.subjects) == 7040 and world.pairs() >= 30_000
    held = sum(world.is_held_out(s) for s in world.subjects)
    assert 0.15 < held / len(world.subjects) < 0.25
    halves = [world.subject_split(s) for s in world.subjects if world.is_held_out(s)]
    assert set(halves) == {"pool", "test"} and 0.4 < halves.count("pool") / len(halves) < 0.6
    assert all(world.subject_split(s) == "train" for s in world.subjects[:50] if not world.is_held_out(s))
    assert len({s.objects for s in world.subjects}) == len(world.subjects)  # each subject is one scene


def test_phrasings_are_split_and_families_ask_different_things(world):
    train_all = {p for fs in FAMILIES.values() for f in fs for p in f.train}
    for fs in FAMILIES.values():
        for f in fs:
            assert f.train and f.held_out and not set(f.held_out) & train_all, f.name
    for n, fs in FAMILIES.items():
        subjects = [s for s in world.subjects if len(s.objects) == n][:400]
        answers = {f.name: tuple(s.answer(f) for s in subjects) for f in fs}
        for a, b in itertools.combinations(fs, 2):  # no family is another in other words
            assert answers[a.name] != answers[b.name], (a.name, b.name)
        for s in subjects[:50]:
            for f in fs:
                alts = s.alternatives(f)
                assert alts and s.answer(f) not in alts


def test_nuisance_splits_do_not_overlap(world):
    tr = [world.nuisance("train", i, k) for i in range(60) for k in range(5)]
    ho = [world.nuisance("held_out", i, k) for i in range(60) for k in range(5)]
    assert all(not 35 <= n.rotation % 90 < 55 for n in tr) and all(40 <= n.rotation % 90 < 50 for n in ho)
    assert max(n.rotation for n in tr) - min(n.rotation for n in tr) > 300  # objects turned every way
    assert {n.background for n in tr}.isdisjoint({n.background for n in ho})
    assert {n.tint for n in tr}.isdisjoint({n.tint for n in ho})
    # held-out scales, noise and light lie between trained bands: never a trained value
    assert all(0.85 <= n.scale < 0.9 or 1.1 <= n.scale < 1.15 for n in ho)
    assert all(not (0.85 <= n.scale < 0.9 or 1.1 <= n.scale < 1.15) for n in tr)
    assert all(9 <= n.noise < 13 for n in ho) and all(n.noise < 8 or n.noise >= 14 for n in tr)
    assert all(0.78 <= n.light < 0.85 or 1.1 <= n.light < 1.2 for n in ho)
    assert all(not (0.78 <= n.light < 0.85 or 1.1 <= n.light < 1.2) for n in tr)
    assert all(n.blur == 1 for n in ho) and 0 < sum(n.blur for n in tr) < len(tr)
    # sizes stay answerable under every nuisance: the largest small object is below the smallest large one
    scales = [n.scale for n in tr + ho]
    assert SIZES["small"] * max(scales) < SIZES["large"] * min(scales)
    with pytest.raises(ValueError):
        world.nuisance("test", 0, 0)


def test_renders_are_deterministic_and_vary_only_by_nuisance(world):
    s = world.subjects[700]
    a = world.render(s, "train", 0)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.render(s, "train", 0))
    # RENDER_VERSION 3, WORLD_VERSION 3: a change to any pixel must bump them
    assert (
        hashlib.sha256(a.tobytes()).hexdigest()
        == "581da802cc2e05267f9fa18636f4befd3904b61e1b1fce9fbf16dafdb36ed33c"
    )
    held = world.render(world.subjects[5], "held_out", 3)
    assert hashlib.sha256(held.tobytes()).hexdigest() == (
        "6c57e12e6bdcf98be3042f8e53d2eeafa37a0e43c8dce4cb9154fb0b17c091a3"
    )
    assert not np.array_equal(a, world.render(s, "train", 1))
    assert not np.array_equal(a, world.render(s, "held_out", 0))


def test_render_draws_what_the_subject_says():
    plain = Nuisance()
    red = render((SceneObject("square", "red", "solid", "large"),), plain, 0)
    assert tuple(red[32, 32]) == (214, 39, 40) and tuple(red[1, 1]) == (250, 250, 250)
    small = render((SceneObject("square", "red", "solid", "small"),), plain, 0)
    assert (np.all(small == (214, 39, 40), axis=2)).sum() < (np.all(red == (214, 39, 40), axis=2)).sum()
    striped = render((SceneObject("square", "red", "striped", "large"),), plain, 0)
    assert (np.all(striped == np.rint(np.asarray((214, 39, 40)) * 0.55), axis=2)).sum() > 100
    pair = render(
        (SceneObject("circle", "blue", "solid", "large"), SceneObject("circle", "red", "solid", "large")),
        plain,
        0,
    )
    assert tuple(pair[32, 16]) == (31, 90, 220) and tuple(pair[32, 48]) == (214, 39, 40)  # left to right
    with pytest.raises(ValueError):
        render((SceneObject("blob", "red", "solid", "large"),), plain, 0)


def test_a_10k_stream_is_valid_symbolically(world, stream):
    assert len(stream) == 10_000 and len({(e.subject, e.family) for e in stream}) == 10_000
    assert check_stream(world, stream) == []
    kinds = {p.kind for e in stream for p in e.probes}
    assert kinds == {
        "reliability",
        "t_gen",
        "i_gen",
        "i_t_gen",
        "m_loc",
        "hard_same_image",
        "hard_same_question",
        "t_loc",
    }
    assert plan_stream(world, 50, seed=3) == plan_stream(world, 50, seed=3)  # seeded


def test_the_checker_finds_planted_violations(world, stream):
    plan = list(stream[:200])
    e = plan[0]
    m_loc = next(p for p in e.probes if p.kind == "m_loc")
    # an edit covering another edit's locality probe
    covering = dataclasses.replace(plan[1], subject=m_loc.subject, family=m_loc.family)
    found = check_stream(world, [*plan[:1], covering, *plan[2:]])
    assert any("covered by an edit" in p for p in found) and any("held out" in p for p in found)
    # a generalization probe with a training phrasing where a held-out one is due
    bad = tuple(dataclasses.replace(p, phrasing=("train", 0)) if p.kind == "t_gen" else p for p in e.probes)
    assert any("wrong phrasing" in p for p in check_stream(world, [dataclasses.replace(e, probes=bad)]))
    # an edit that changes nothing, and a repeated edit
    s = world.subjects[e.subject]
    f = next(f for f in world.families(s) if f.name == e.family)
    same = dataclasses.replace(e, new_answer=s.answer(f))
    assert any("changes nothing" in p for p in check_stream(world, [same]))
    assert any("repeat" in p for p in check_stream(world, [e, e]))
    with pytest.raises(ValueError):
        plan_stream(world, 10**6)
