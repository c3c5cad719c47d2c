"""From per-probe outputs to the figures of the tables: per-probe records, aggregates, audits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import ProbeOutput, exact_match, locality, mean_or_none, residue, scope_audit, token_accuracy

__all__ = [
    "EDIT_GEN_KINDS",
    "GEN_KINDS",
    "LOC_KINDS",
    "aggregate",
    "deletion_audit",
    "edit_outcome",
    "interaction_audit",
    "probe_record",
]

#: Probes that should give the edit's (current) answer: its input and its generalizations.
EDIT_GEN_KINDS = ("reliability", "t_gen", "i_gen", "i_t_gen")
#: Probes that should give an answer (portability: the data's own answer).
GEN_KINDS = (*EDIT_GEN_KINDS, "portability")
#: Probes that should answer as the pre-edit model did.
LOC_KINDS = ("t_loc", "m_loc", "hard_same_image", "hard_same_question")


def probe_record(
    kind: str,
    target: str,
    out: ProbeOutput,
    pre: ProbeOutput | None,
    fired: int,
    owner_edit: int,
    case: int,
    probe: int = -1,
    forced: ProbeOutput | None = None,
) -> dict[str, Any]:
    """One probe's outcome under one method and state (``fired``: the edit injected, -1 none).

    ``forced``: a generalization probe's output with its own edit injected whatever the routing said
    (where vs what: ``fidelity`` is the adapter's half, ``owner_fired`` the router's).
    """
    rec: dict[str, Any] = {
        "kind": kind,
        "case": case,
        "probe": probe,
        "fired": fired,
        "owner_fired": fired == owner_edit,
        "answer": out.text,
    }
    if kind in LOC_KINDS:
        if pre is None:
            raise KeyError(f"no pre-edit output for a {kind} probe")
        diff = residue(pre, out)
        rec["loc"] = locality(pre, out, k=10 if kind == "m_loc" else 1)
        rec["changed"] = diff["tokens"] or diff["text"]
        rec["em"] = not diff["text"]
    else:
        rec["acc"] = token_accuracy(out)
        rec["em"] = exact_match(out, target)
        if forced is not None:
            rec["fidelity"] = exact_match(forced, target)
        if pre is not None:
            rec["residue"] = residue(pre, out)
    return rec


def edit_outcome(recs: Sequence[Mapping[str, Any]]) -> tuple[bool, bool, bool] | None:
    """One edit's ``(reliable, generalizes, leaks)`` from its probe records, as `scope_audit` counts them
    (None without a reliability probe)."""
    rel = [r["em"] for r in recs if r["kind"] == "reliability"]
    if not rel:
        return None
    return (
        bool(all(rel)),
        bool(all(r["em"] for r in recs if r["kind"] in EDIT_GEN_KINDS[1:])),
        bool(any(r["changed"] for r in recs if r["kind"] in LOC_KINDS)),
    )


def _per_case(records: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    by: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by[r["case"]].append(r)
    return by


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """EasyEdit-style figures (None where the data defines no such probe), audit shares, routing rates."""
    of = defaultdict(list)
    for r in records:
        of[r["kind"]].append(r)
    out: dict[str, Any] = {}
    for k in GEN_KINDS:
        out[k] = mean_or_none([r["acc"] for r in of[k]])
        out[f"{k}_em"] = mean_or_none([r["em"] for r in of[k]])
    out["t_loc"] = mean_or_none([r["loc"] for r in of["t_loc"]])
    out["m_loc"] = mean_or_none([r["loc"] for r in of["m_loc"]])
    hard = of["hard_same_image"] + of["hard_same_question"]
    out["hard_loc"] = mean_or_none([r["loc"] for r in hard])
    loc = [r for k in LOC_KINDS for r in of[k]]
    out["loc_unchanged"] = mean_or_none([r["em"] for r in loc])
    outcomes = [o for o in map(edit_outcome, _per_case(records).values()) if o is not None]
    reliable, general, leaks = ([o[i] for o in outcomes] for i in range(3))
    out["audit"] = scope_audit(reliable, general, leaks)
    gen = [r for k in EDIT_GEN_KINDS for r in of[k]]
    out["routing"] = {
        "right_edit": mean_or_none([r["owner_fired"] for r in gen]),
        "wrong_edit": mean_or_none([r["fired"] >= 0 and not r["owner_fired"] for r in gen]),
        "loc_any_edit": mean_or_none([r["fired"] >= 0 for r in loc]),
        "loc_own_edit": mean_or_none([r["owner_fired"] for r in loc]),
        "loc_any_edit_by_kind": {k: mean_or_none([r["fired"] >= 0 for r in of[k]]) for k in LOC_KINDS},
        "right_edit_by_kind": {k: mean_or_none([r["owner_fired"] for r in of[k]]) for k in GEN_KINDS},
    }
    # the adapter's half: the new answer with the right edit injected, whatever the router decided
    out["fidelity"] = {k: mean_or_none([r["fidelity"] for r in of[k] if "fidelity" in r]) for k in GEN_KINDS}
    out["n_edits"] = len(reliable)
    out["n_probes"] = len(records)
    return out


def interaction_audit(
    immediate: Mapping[int, Sequence[Mapping[str, Any]]], final: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """How later edits moved each live edit's outcomes between its immediate and its final scoring.

    Outcome per probe: the new answer given (generalization probes) or the answer unchanged
    (locality probes). An edit *moved* when any outcome flipped; *degraded* / *improved* when the
    share of good outcomes fell / rose. Revised edits are compared with their latest version's
    immediate scoring.
    """
    fin = _per_case(final)
    moved = degraded = improved = 0
    flips = 0
    deltas = []
    for case, recs in fin.items():
        imm = immediate.get(case)
        if not imm:
            continue
        a = {r["probe"]: bool(r["em"]) for r in imm}
        b = {r["probe"]: bool(r["em"]) for r in recs}
        common = sorted(set(a) & set(b))
        if not common:
            continue
        f = sum(a[p] != b[p] for p in common)
        d = (sum(b[p] for p in common) - sum(a[p] for p in common)) / len(common)
        flips += f
        moved += f > 0
        degraded += d < 0
        improved += d > 0
        deltas.append(abs(d))
    n = len(deltas)
    return {
        "n_edits": n,
        "moved": moved / n if n else None,
        "degraded": degraded / n if n else None,
        "improved": improved / n if n else None,
        "mean_abs_delta": mean_or_none(deltas),
        "flipped_outcomes": flips,
    }


def deletion_audit(
    after_delete: Sequence[Mapping[str, Any]], final: Sequence[Mapping[str, Any]], n_deleted: int
) -> dict[str, Any]:
    """Deleted edits' generalization probes against the pre-edit model: shares that still differ.

    ``text``: greedy answer differs; ``tokens``: a teacher-forced top-1 differs; ``top10``: the ranked
    top-10 differs; ``bits``: any logit bit differs. ``routed``: some (other) edit fired on them.
    A memory whose delete is exact reaches 0 wherever no other edit covers the probe.
    """

    def shares(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        res = [r["residue"] for r in recs if "residue" in r]
        out: dict[str, Any] = {
            k: mean_or_none([x[k] for x in res]) for k in ("text", "tokens", "top10", "bits")
        }
        out["routed"] = mean_or_none([r["fired"] >= 0 for r in recs])
        out["n_probes"] = len(res)
        return out

    return {"n_deleted": n_deleted, "right_after": shares(after_delete), "final": shares(final)}
