"""Scope on both axes at once: every global rule's full threshold sweep against our learned scope.

At the end of a stream (retention), for the same keys and live edits, each routing rule is a point
(``leak``, ``recall``):

- ``recall``: share of generalization probes (reliability, T-Gen, I-Gen, IT-Gen) of live edits whose
  own edit fires (the router's half of generalization);
- ``leak``: share of locality and hard-negative probes on which *any* edit fires.

A global rule (joint, text-only or image-only keys; GRACE's radii) has a curve: one point per
threshold, including the *oracle* ones chosen on these very probes (the most any global rule could
do). Ours is one point; it beats a rule on both axes when no point of the rule's curve has at least
its recall and at most its leak. `scope_sweep` computes the curves and `probe_table` the per-probe
rows (score, threshold, margin, routed edit, the nearest edit and its cosine per view), so sweeps and
audits are computed from one run, offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .aggregate import EDIT_GEN_KINDS, LOC_KINDS
from .baselines import KeyViews, grace_radii

__all__ = ["above_curve", "probe_table", "scope_sweep"]

_VIEWS = ("joint", "text", "image")
#: Thresholds swept (cosine), fine enough that the curve is drawn as a line.
_GRID = np.append(np.round(np.linspace(-0.2, 1.0, 241), 4), 1.01)  # 1.01: nothing fires, the (0, 0) end


def _nearest(anchors: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest anchor per query and its cosine (blocked: 10k x 90k never held at once)."""
    idx = np.empty(q.shape[0], dtype=np.int64)
    best = np.empty(q.shape[0], dtype=np.float32)
    for i in range(0, q.shape[0], 4096):
        s = q[i : i + 4096] @ anchors.T
        idx[i : i + 4096] = s.argmax(1)
        best[i : i + 4096] = s[np.arange(s.shape[0]), idx[i : i + 4096]]
    return idx, best


def _point(
    t: float, fires: np.ndarray, right: np.ndarray, gen: np.ndarray, loc: np.ndarray
) -> dict[str, float]:
    """(threshold, recall, leak) of a rule that fires where ``fires`` and is right where ``right``."""
    return {
        "threshold": float(t),
        "recall": float((fires & right)[gen].mean()) if gen.any() else 0.0,
        "leak": float(fires[loc].mean()) if loc.any() else 0.0,
    }


def _curve(best: np.ndarray, right: np.ndarray, gen: np.ndarray, loc: np.ndarray) -> list[dict[str, float]]:
    """The sweep of a global rule whose nearest cosine per probe is ``best``."""
    return [_point(t, best >= t, right, gen, loc) for t in _GRID]


def probe_table(
    kinds: Sequence[str],
    owner_anchor: np.ndarray,
    queries: KeyViews,
    anchors: KeyViews,
    ours: Any,
) -> dict[str, Any]:
    """Per-probe routing facts, column-wise (JSON-ready): kind, the owner's anchor row (-1: no live
    owner), ours' routed edit / score / threshold / margin, and per key view the nearest anchor row
    and its cosine. ``ours`` is the memory's `RouteResult` for the same rows."""
    cols: dict[str, Any] = {
        "kind": list(kinds),
        "owner_anchor": owner_anchor.astype(int).tolist(),
        "ours_edit": np.asarray(ours.edit_ids).astype(int).tolist(),
        "ours_score": np.round(np.asarray(ours.scores, dtype=np.float64), 5).tolist(),
        "ours_threshold": np.round(np.asarray(ours.thresholds, dtype=np.float64), 5).tolist(),
        "ours_margin": np.round(np.asarray(ours.margins, dtype=np.float64), 5).tolist(),
    }
    for v in _VIEWS:
        a, q = getattr(anchors, v), getattr(queries, v)
        idx, best = _nearest(a, q)
        if v == "image":  # rows without a picture have no image key: never routed by an image rule
            best = np.where(queries.has_image, best, -np.inf)
        cols[f"{v}_nearest"] = idx.astype(int).tolist()
        cols[f"{v}_cosine"] = [None if not np.isfinite(b) else round(float(b), 5) for b in best]
    return cols


def scope_sweep(
    table: dict[str, Any], anchors: KeyViews, answers: Sequence[str], ours_owner_fired: np.ndarray
) -> dict[str, Any]:
    """Curves of every global rule and GRACE, ours' point, and for each rule whether ours beats it on
    both axes (see the module docstring). ``ours_owner_fired``: per probe, did ours route it to its own
    edit."""
    kinds = np.asarray(table["kind"])
    owner = np.asarray(table["owner_anchor"])
    gen = np.isin(kinds, EDIT_GEN_KINDS) & (owner >= 0)
    loc = np.isin(kinds, LOC_KINDS)
    ours_fired = np.asarray(table["ours_edit"]) >= 0
    point = {
        "recall": float(ours_owner_fired[gen].mean()) if gen.any() else 0.0,
        "leak": float(ours_fired[loc].mean()) if loc.any() else 0.0,
    }
    curves: dict[str, list[dict[str, float]]] = {}
    for v in _VIEWS:
        best = np.asarray([-np.inf if c is None else c for c in table[f"{v}_cosine"]], dtype=np.float64)
        right = np.asarray(table[f"{v}_nearest"]) == owner
        curves[f"global_{v}"] = _curve(best, right, gen, loc)
    # GRACE: radii grown / halved in stream order from a start radius; swept over the start radius
    idx = np.asarray(table["joint_nearest"])
    q_best = np.asarray(table["joint_cosine"], dtype=np.float64)
    right = idx == owner
    grace = []
    for t in np.append(_GRID[:-1:4], _GRID[-1]):  # each start radius re-runs the radii: a coarser grid
        thr = grace_radii(anchors.joint, answers, 1.0 - float(t))
        # a probe routes to its nearest anchor when inside that anchor's radius (GRACE's codebook lookup)
        fires = q_best >= thr[idx] if len(thr) else np.zeros(len(kinds), dtype=bool)
        grace.append(_point(t, fires, right, gen, loc))
    curves["grace"] = grace
    return {
        "ours": point,
        "curves": curves,
        "ours_beats": {k: above_curve(point, c) for k, c in curves.items()},
        "oracle_at_our_leak": {k: _best_recall(c, point["leak"]) for k, c in curves.items()},
        "n_gen_probes": int(gen.sum()),
        "n_loc_probes": int(loc.sum()),
    }


def _best_recall(curve: list[dict[str, float]], leak: float) -> float:
    """The most recall any threshold of ``curve`` gets without leaking more than ``leak``."""
    ok = [p["recall"] for p in curve if p["leak"] <= leak + 1e-12]
    return max(ok) if ok else 0.0


def above_curve(point: dict[str, float], curve: list[dict[str, float]]) -> bool:
    """True when no point of ``curve`` has at least ``point``'s recall and at most its leak
    (ours is above the curve: better on both axes than every threshold of the rule)."""
    return not any(p["recall"] >= point["recall"] and p["leak"] <= point["leak"] for p in curve)
