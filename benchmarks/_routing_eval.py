"""Baseline routing rules and metrics of the routing benchmark (see ``bench_routing.py``)."""

from __future__ import annotations

import numpy as np
from _routing_data import Rec

# The baseline rules live in the evaluation harness; re-exported here for the benchmarks.
from esg_memory.eval.baselines import calibrate_global, grace_radii, nearest_rule

__all__ = ["build_probes", "calibrate_global", "grace_radii", "metrics", "nearest_rule"]


# ----------------------------------------------------------------------------- evaluation
def build_probes(recs: list[Rec], unrelated: list) -> dict:
    gen_im, gen_tx, gen_owner, gen_kind = [], [], [], []
    for i, r in enumerate(recs):
        for kind, im, tx in (
            ("text", r.subject, r.rephrase),
            ("image", r.subject_rephrase, r.src),
            ("both", r.subject_rephrase, r.rephrase),
        ):
            gen_im.append(im)
            gen_tx.append(tx)
            gen_owner.append(i)
            gen_kind.append(kind)
    hard_im, hard_tx, hard_owner, hard_kind = [], [], [], []
    for i, r in enumerate(recs):
        for kind, im, tx in (("same_image", r.subject, r.loc_q), ("same_question", r.loc_subject, r.src)):
            # VLKEB's m_loc_q asks the same generic kind of question ("Who is the actor shown in the
            # image?") about another picture: on this edit's picture it is a rephrasing, not a negative.
            if (im == r.subject and tx == r.src) or (kind == "same_image" and r.source == "VLKEB"):
                continue
            hard_im.append(im)
            hard_tx.append(tx)
            hard_owner.append(i)
            hard_kind.append(kind)
    return {
        "gen": (gen_im, gen_tx, np.asarray(gen_owner)),
        "hard": (hard_im, hard_tx, np.asarray(hard_owner)),
        "rel": ([r.subject for r in recs], [r.src for r in recs], np.arange(len(recs))),
        "unrel": ([u[0] for u in unrelated], [u[1] for u in unrelated], None),
        "_gen_kind": np.asarray(gen_kind),
        "_hard_kind": np.asarray(hard_kind),
        "_source": np.asarray([r.source for r in recs]),
    }


def metrics(routed: dict[str, np.ndarray], answers: list[str], probes: dict) -> dict:
    """routed[kind]: index into the stream's edits (or -1) for every probe of that kind."""
    ans = np.asarray([*answers, "<none>"], dtype=object)
    g, own = routed["gen"], probes["gen"][2]
    got_ans = ans[g]  # -1 indexes "<none>"
    right = got_ans == ans[own]
    wrong = (g >= 0) & ~right
    h, hown = routed["hard"], probes["hard"][2]
    u = routed["unrel"]
    n = len(answers)
    gen_ok = np.ones(n, dtype=bool)
    np.logical_and.at(gen_ok, own, right)
    leaky = np.zeros(n, dtype=bool)
    leaky[hown[h == hown]] = True
    leaky[u[u >= 0]] = True
    classes = {
        "correct": gen_ok & ~leaky,
        "under": ~gen_ok & ~leaky,
        "over": gen_ok & leaky,
        "fail": ~gen_ok & leaky,
    }
    gk, hk, src = probes["_gen_kind"], probes["_hard_kind"], probes["_source"]
    hleak = h == hown
    by_source = {}
    for s_ in sorted(set(src[:n].tolist())):
        gm, hm = src[own] == s_, src[hown] == s_
        by_source[s_] = {
            "edits": int((src[:n] == s_).sum()),
            "recall": float(right[gm].mean()) if gm.any() else None,
            "hard_negative_leak": float(hleak[hm].mean()) if hm.any() else None,
        }
    detail = {
        "recall_by_probe": {k: float(right[gk == k].mean()) for k in ("text", "image", "both")},
        "hard_leak_by_kind": {
            k: (float(hleak[hk == k].mean()) if (hk == k).any() else None)
            for k in ("same_image", "same_question")
        },
        "by_source": by_source,
    }
    return {
        "detail": detail,
        "recall": float(right.mean()),
        "recall_exact_id": float((g == own).mean()),
        "reliability": float((ans[routed["rel"]] == ans[probes["rel"][2]]).mean()),
        "leak": float((u >= 0).mean()),
        "hard_negative_leak": float((h == hown).mean()),
        "hard_negative_any": float((h >= 0).mean()),
        "wrong_edit": float(wrong.mean()),
        "audit": {k: float(v.mean()) for k, v in classes.items()},
    }
