"""Scope sweeps: every global rule's threshold curve against our point, on hand-made keys."""

from __future__ import annotations

import numpy as np

from esg_memory.eval.baselines import KeyViews
from esg_memory.eval.sweep import above_curve, probe_table, scope_sweep


class _Routed:
    def __init__(self, ids, scores):
        self.edit_ids = np.asarray(ids)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.thresholds = np.full(len(ids), 0.5, dtype=np.float32)
        self.margins = self.scores - self.thresholds


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_sweep_curves_ours_point_and_oracle():
    anchors = _unit([[1, 0, 0], [0, 1, 0]])
    # two generalization probes near their own anchors, one near the wrong one, two locality probes
    q = _unit([[0.95, 0.3, 0], [0.2, 0.98, 0], [0.9, 0.1, 0.2], [0.3, 0.3, 0.9], [0.7, 0.0, 0.7]])
    kinds = ["reliability", "t_gen", "i_gen", "m_loc", "hard_same_image"]
    owner = np.array([0, 1, 1, -1, -1])
    views = KeyViews(q, q, q, np.ones(5, dtype=bool))
    av = KeyViews(anchors, anchors, anchors, np.ones(2, dtype=bool))
    ours = _Routed([10, 11, -1, -1, -1], [0.95, 0.98, 0.9, 0.4, 0.7])
    table = probe_table(kinds, owner, views, av, ours)
    assert table["joint_nearest"] == [0, 1, 0, 0, 0] and table["ours_edit"] == [10, 11, -1, -1, -1]
    sc = scope_sweep(table, av, ["a", "b"], np.array([True, True, False, False, False]))
    assert sc["ours"] == {"recall": 2 / 3, "leak": 0.0}
    assert sc["n_gen_probes"] == 3 and sc["n_loc_probes"] == 2
    joint = sc["curves"]["global_joint"]
    # low thresholds: everything fires, the i_gen probe goes to the wrong edit; high: nothing fires
    assert joint[0] == {"threshold": -0.2, "recall": 2 / 3, "leak": 1.0}
    assert joint[-1]["recall"] == joint[-1]["leak"] == 0.0
    # the oracle threshold between the locality cosines (<= 0.7) and the probes' (>= 0.95) matches ours
    assert sc["oracle_at_our_leak"]["global_joint"] == 2 / 3
    assert not sc["ours_beats"]["global_joint"]  # a threshold does as well on both axes
    assert above_curve({"recall": 0.9, "leak": 0.0}, joint)
    assert not above_curve({"recall": 0.5, "leak": 0.5}, joint)
