"""Scope fitting on hand-made similarity matrices and vectors (pure numpy, no encoder)."""

from __future__ import annotations

import numpy as np
import pytest

from esg_memory.config import MemoryConfig
from esg_memory.errors import ConfigError, FormatError, InvalidInputError
from esg_memory.scope import fit_scope, pairwise_sims


def cfg(**kw) -> MemoryConfig:
    base = {"margin": 0.05, "min_threshold": 0.5, "max_threshold": 0.99, "max_keys": 4, "placement": 0.0}
    base.update(kw)
    return MemoryConfig(**base)


def test_threshold_sits_margin_above_hardest_negative():
    cc = np.array([[1.0, 0.9], [0.9, 1.0]])
    cn = np.array([[0.7, 0.2, 0.65], [0.6, 0.1, 0.3]])
    fit = fit_scope(cc, cn, ["anchor", "p"], ["n0", "n1", "n2"], cfg())
    assert fit.key_index == (0,)
    assert fit.thresholds[0] == pytest.approx(0.75)
    rec = fit.records[0]
    assert rec.hardest_negative == pytest.approx(0.7) and rec.hardest_negative_source == "n0"
    assert rec.easiest_positive == pytest.approx(0.9) and rec.covers == 1
    assert rec.margin == pytest.approx(0.05)
    assert "hardest negative" in rec.reason and not fit.uncovered


@pytest.mark.parametrize(("placement", "expected"), [(0.0, 0.75), (0.5, 0.80), (1.0, 0.85)])
def test_placement_moves_threshold_toward_easiest_positive(placement, expected):
    cc = np.array([[1.0, 0.9], [0.9, 1.0]])
    cn = np.array([[0.7], [0.5]])
    fit = fit_scope(cc, cn, ["anchor", "p"], ["n"], cfg(placement=placement))
    assert fit.thresholds[0] == pytest.approx(expected)
    assert fit.records[0].covers == 1  # the positive stays covered whatever the placement


def test_floor_when_negatives_are_far_and_no_negatives_at_all():
    cc = np.array([[1.0]])
    fit = fit_scope(cc, np.array([[0.1]]), ["anchor"], ["far"], cfg())
    assert fit.thresholds[0] == pytest.approx(0.5)
    assert "floor" in fit.records[0].reason
    fit2 = fit_scope(cc, np.zeros((1, 0)), ["anchor"], [], cfg())
    assert fit2.thresholds[0] == pytest.approx(0.5) and fit2.records[0].hardest_negative is None


def test_positive_behind_a_negative_becomes_an_extra_key_instead_of_widening():
    # p1 is only 0.6 from the anchor while a negative sits at 0.7: one ball cannot hold p1 without
    # the negative, so p1 gets its own key, whose ball excludes every negative.
    cc = np.array([[1.0, 0.6, 0.55], [0.6, 1.0, 0.95], [0.55, 0.95, 1.0]])
    cn = np.array([[0.7], [0.3], [0.35]])
    fit = fit_scope(cc, cn, ["anchor", "p1", "p2"], ["neg"], cfg())
    assert fit.key_index == (0, 1)
    assert fit.thresholds[0] == pytest.approx(0.75)
    assert fit.thresholds[1] == pytest.approx(0.5)  # 0.3 + margin is below the floor
    assert fit.records[1].covers == 2 and not fit.uncovered  # p2 and (at 0.6) the anchor itself
    for k, t in zip(fit.key_index, fit.thresholds, strict=True):
        assert cn[k].max() < t  # no negative inside any ball


def test_greedy_cover_prefers_the_positive_covering_most():
    # p1 covers only itself; p2 covers p1, p2, p3 -> p2 is chosen, one extra key suffices.
    cc = np.array(
        [
            [1.0, 0.2, 0.3, 0.2],
            [0.2, 1.0, 0.8, 0.1],
            [0.3, 0.8, 1.0, 0.8],
            [0.2, 0.1, 0.8, 1.0],
        ]
    )
    cn = np.array([[0.6], [0.1], [0.1], [0.1]])
    fit = fit_scope(cc, cn, ["a", "p1", "p2", "p3"], ["n"], cfg(min_threshold=0.7))
    assert fit.key_index == (0, 2)


def test_unsafe_positive_is_left_uncovered_with_a_reason():
    cc = np.array([[1.0, 0.4], [0.4, 1.0]])
    cn = np.array([[0.3], [0.97]])  # a negative sits right on top of the positive
    fit = fit_scope(cc, cn, ["anchor", "p"], ["twin"], cfg())
    assert fit.key_index == (0,)
    assert len(fit.uncovered) == 1 and "twin" in fit.uncovered[0].reason
    assert "within the margin" in fit.uncovered[0].reason


def test_max_keys_limits_the_split():
    c = 5
    cc = np.eye(c) + 0.1 * (1 - np.eye(c))
    cn = np.full((c, 1), 0.2)
    fit = fit_scope(cc, cn, [f"c{i}" for i in range(c)], ["n"], cfg(max_keys=3))
    assert len(fit.key_index) == 3
    assert len(fit.uncovered) == 2 and all("max_keys" in u.reason for u in fit.uncovered)


def test_anchor_with_unseparable_negative_is_capped_and_says_so():
    fit = fit_scope(np.array([[1.0]]), np.array([[0.999]]), ["anchor"], ["dup"], cfg())
    assert fit.thresholds[0] == pytest.approx(0.99)
    assert "unseparable" in fit.records[0].reason


def test_fit_on_real_vectors_is_deterministic():
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal(16)
    cand = np.stack([anchor + 0.3 * rng.standard_normal(16) for _ in range(6)])
    cand[0] = anchor
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    neg = rng.standard_normal((40, 16))
    neg /= np.linalg.norm(neg, axis=1, keepdims=True)
    labels = [f"c{i}" for i in range(6)]
    nl = [f"n{i}" for i in range(40)]
    f1 = fit_scope(pairwise_sims(cand, cand), pairwise_sims(cand, neg), labels, nl, cfg())
    f2 = fit_scope(pairwise_sims(cand, cand), pairwise_sims(cand, neg), labels, nl, cfg())
    assert f1.same_as(f2) and f1.records == f2.records
    sims = pairwise_sims(cand, neg)
    for k, t in zip(f1.key_index, f1.thresholds, strict=True):
        assert sims[k].max() + 0.05 <= t + 1e-6


def test_bad_inputs_are_typed_errors():
    with pytest.raises(InvalidInputError):
        fit_scope(np.ones((2, 2)), np.ones((2, 1)), ["a"], ["n"], cfg())
    with pytest.raises(InvalidInputError):
        fit_scope(np.array([[np.nan]]), np.zeros((1, 0)), ["a"], [], cfg())
    with pytest.raises(InvalidInputError):
        fit_scope(np.zeros((0, 0)), np.zeros((0, 0)), [], [], cfg())
    with pytest.raises(InvalidInputError):
        pairwise_sims(np.ones((2, 3)), np.ones((2, 4)))


@pytest.mark.parametrize(
    "bad",
    [
        {"margin": -0.1},
        {"margin": float("nan")},
        {"placement": 2.0},
        {"min_threshold": 0.9, "max_threshold": 0.8},
        {"max_keys": 0},
        {"route_k": 0},
        {"n_text_positives": -1},
        {"seed": 1.5},
        {"separate_same_answer": "yes"},
        {"max_threshold": 1.0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        MemoryConfig(**bad)


def test_config_round_trip_and_unknown_fields():
    c = MemoryConfig(margin=0.04, max_keys=2)
    assert MemoryConfig.from_dict(c.to_dict()) == c
    with pytest.raises(FormatError):
        MemoryConfig.from_dict({**c.to_dict(), "surprise": 1})
    with pytest.raises(FormatError):
        MemoryConfig.from_dict({**c.to_dict(), "margin": 7})
    assert c.neighbour_radius == pytest.approx(c.min_threshold - c.margin)
