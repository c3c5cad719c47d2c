"""Evaluation-harness metrics, audits, baseline rules and the stream plan, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from esg_memory.errors import InvalidInputError
from esg_memory.eval import (
    ProbeOutput,
    aggregate,
    calibrate_global,
    deletion_audit,
    exact_match,
    grace_radii,
    interaction_audit,
    locality,
    nearest_rule,
    normalize_answer,
    residue,
    scope_audit,
    token_accuracy,
)
from esg_memory.eval.aggregate import probe_record
from esg_memory.eval.protocols import plan_stream


def out(stage: str, target=(5, 6, 7), topk=((5, 1), (2, 6), (7, 3)), text="a b", digest="d") -> ProbeOutput:
    return ProbeOutput(stage, tuple(target), tuple(tuple(r) for r in topk), text, digest)


def test_token_accuracy_and_exact_match():
    assert token_accuracy(out("post")) == pytest.approx(2 / 3)  # argmax 5, 2, 7 vs target 5, 6, 7
    assert token_accuracy(out("post", topk=((5,), (6,), (7,)))) == 1.0
    assert exact_match(out("post", text="  Long  Branch. "), "long branch")
    assert not exact_match(out("post", text="Long Branch, NJ"), "long branch")
    assert normalize_answer(" A\n boy.\n") == "a boy"


def test_locality_compares_pre_with_post_only():
    pre = out("pre", topk=((1, 2, 3), (4, 5, 6)), target=(1, 4))
    post = out("post", topk=((1, 3, 2), (9, 5, 6)), target=(1, 4))
    assert locality(pre, post, k=1) == 0.5  # position 0 same top-1, position 1 differs
    assert locality(pre, post, k=3) == pytest.approx(3 / 6)  # ranked cells: (1,1)(2,3)(3,2)(4,9)(5,5)(6,6)
    # comparing the model with itself is impossible: both sides must come from their own stage
    for a, b in ((post, post), (pre, pre), (post, pre)):
        with pytest.raises(InvalidInputError, match="pre-edit output with a post-edit"):
            locality(a, b)
    with pytest.raises(InvalidInputError, match="different targets"):
        locality(pre, out("post", target=(1, 5), topk=((1,), (5,))))
    with pytest.raises(InvalidInputError):
        ProbeOutput("during", (1,), ((1,),), "", "")


def test_residue_flags_each_level():
    pre = out("pre", digest="x")
    assert residue(pre, out("post", digest="x")) == {
        "text": False,
        "tokens": False,
        "top10": False,
        "bits": False,
    }
    r = residue(pre, out("post", topk=((5, 9), (2, 6), (7, 3)), digest="y"))
    assert r == {"text": False, "tokens": False, "top10": True, "bits": True}
    r = residue(pre, out("post", topk=((1, 5), (2, 6), (7, 3)), text="c", digest="y"))
    assert r["text"] and r["tokens"]


def test_scope_audit_counts_only_successful_edits():
    a = scope_audit(
        reliable=[True, True, True, True, False],
        generalizes=[True, False, True, False, True],
        leaks=[False, False, True, True, False],
    )
    assert a == {"correct": 0.25, "under": 0.25, "over": 0.25, "fail": 0.25, "n_successful": 4}
    assert scope_audit([False], [True], [False])["correct"] is None
    with pytest.raises(InvalidInputError):
        scope_audit([True], [True, False], [False])


def test_aggregate_and_probe_records():
    pre = out("pre", target=(5,), topk=((5, 1),), text="red")
    same = out("post", target=(5,), topk=((5, 1),), text="red")
    moved = out("post", target=(5,), topk=((1, 5),), text="blue")
    good = out("post", target=(5,), topk=((5, 1),), text="five")
    recs = [
        probe_record("reliability", "five", good, None, fired=10, owner_edit=10, case=0, probe=0),
        probe_record("t_gen", "five", good, None, 10, 10, 0, 1),
        probe_record("m_loc", "red", moved, pre, 10, 10, 0, 2),  # case 0 leaks: over
        probe_record("reliability", "five", good, None, 11, 11, 1, 3),
        probe_record("i_gen", "five", moved, None, -1, 11, 1, 4),  # case 1 under-generalizes
        probe_record("t_loc", "red", same, pre, -1, 11, 1, 5),
    ]
    agg = aggregate(recs)
    assert agg["reliability"] == 1.0 and agg["t_gen"] == 1.0 and agg["i_gen"] == 0.0
    assert agg["t_loc"] == 1.0 and agg["m_loc"] == 0.0  # top-10 order flipped at the only position
    assert agg["portability"] is None and agg["hard_loc"] is None
    assert agg["audit"] == {"correct": 0.0, "under": 0.5, "over": 0.5, "fail": 0.0, "n_successful": 2}
    assert agg["routing"]["right_edit"] == pytest.approx(3 / 4)
    assert agg["routing"]["loc_any_edit"] == 0.5
    with pytest.raises(KeyError):
        probe_record("t_loc", "red", same, None, -1, 0, 0)


def test_where_and_what_are_aggregated_apart():
    good = out("post", target=(5,), topk=((5, 1),), text="five")
    bad = out("post", target=(5,), topk=((1, 5),), text="blue")
    recs = [
        # the router missed (nothing fired) but the adapter, forced in, gives the answer: routing's fault
        probe_record("i_gen", "five", bad, None, -1, 11, 1, 4, forced=good),
        # the right edit fired but its adapter does not give the answer: the adapter's fault
        probe_record("t_gen", "five", bad, None, 11, 11, 1, 5, forced=bad),
        probe_record("t_gen", "five", good, None, 11, 11, 1, 6, forced=good),
        probe_record("reliability", "five", good, None, 11, 11, 1, 3),  # no forced run: not counted
    ]
    agg = aggregate(recs)
    assert agg["fidelity"] == {
        "reliability": None, "t_gen": 0.5, "i_gen": 1.0, "i_t_gen": None, "portability": None
    }
    assert agg["routing"]["right_edit_by_kind"] == {
        "reliability": 1.0,
        "t_gen": 1.0,
        "i_gen": 0.0,
        "i_t_gen": None,
        "portability": None,
    }
    assert agg["i_gen_em"] == 0.0 and agg["t_gen_em"] == 0.5


def test_interaction_and_deletion_audits():
    imm = {
        0: [{"probe": 0, "em": True, "case": 0}, {"probe": 1, "em": True, "case": 0}],
        1: [{"probe": 2, "em": False, "case": 1}],
    }
    fin = [
        {"probe": 0, "em": True, "case": 0},
        {"probe": 1, "em": False, "case": 0},
        {"probe": 2, "em": True, "case": 1},
    ]
    it = interaction_audit(imm, fin)
    assert it["n_edits"] == 2 and it["moved"] == 1.0
    assert it["degraded"] == 0.5 and it["improved"] == 0.5 and it["flipped_outcomes"] == 2
    clean = {"text": False, "tokens": False, "top10": False, "bits": False}
    d = deletion_audit(
        [{"residue": clean, "fired": -1}, {"residue": {**clean, "bits": True}, "fired": 3}],
        [{"residue": clean, "fired": -1}],
        n_deleted=1,
    )
    assert d["right_after"]["bits"] == 0.5 and d["right_after"]["routed"] == 0.5
    assert d["final"] == {"text": 0.0, "tokens": 0.0, "top10": 0.0, "bits": 0.0, "routed": 0.0, "n_probes": 1}


def test_baseline_rules_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    q = np.array([[0.9, 0.1], [0.6, 0.8], [0.1, 0.2]], dtype=np.float32)
    assert nearest_rule(a, q, None).tolist() == [0, 1, 1]
    assert nearest_rule(a, q, 0.85).tolist() == [0, -1, -1]
    assert nearest_rule(a, q, np.array([0.95, 0.7])).tolist() == [-1, 1, -1]
    assert nearest_rule(np.zeros((0, 2)), q, 0.5).tolist() == [-1, -1, -1]
    pool = np.array([[0.5, 0.0], [0.0, 0.3], [0.2, 0.2]], dtype=np.float32)
    assert calibrate_global(a, pool, margin=0.01) == pytest.approx(0.51)
    with pytest.raises(InvalidInputError):
        calibrate_global(a, np.zeros((0, 2)), 0.0)
    # GRACE: a conflicting key inside the radius halves both radii to half the gap
    b = np.array([[1.0, 0.0], [0.8, 0.6]], dtype=np.float32)  # cosine distance 0.2
    assert grace_radii(b, ["x", "y"], eps0=0.3) == pytest.approx([0.9, 0.9])
    assert grace_radii(b, ["x", "x"], eps0=0.3) == pytest.approx([0.7, 0.7])


def test_stream_plan_is_seeded_and_consistent():
    targets = [f"t{i}" for i in range(50)]
    revs = [(f"r{i}a", f"r{i}b") for i in range(50)]
    ops = plan_stream(targets, revs, seed=3, revise_rate=0.3, delete_rate=0.1)
    assert ops == plan_stream(targets, revs, seed=3, revise_rate=0.3, delete_rate=0.1)
    assert ops != plan_stream(targets, revs, seed=4, revise_rate=0.3, delete_rate=0.1)
    assert [o.case for o in ops if o.kind == "add"] == list(range(50))
    seen: set[int] = set()
    dead: set[int] = set()
    for o in ops:
        if o.kind == "add":
            seen.add(o.case)
        else:  # revisions and deletions only touch earlier, live edits
            assert o.case in seen and o.case not in dead
            if o.kind == "delete":
                dead.add(o.case)
    assert any(o.kind == "revise" for o in ops) and dead
    with pytest.raises(InvalidInputError):
        plan_stream(targets, revs, 0, revise_rate=1.5, delete_rate=0)
