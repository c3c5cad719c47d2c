"""``audit.jsonl`` and ``probe_images/``: a run's ScopeEdit audit per edit and its deletion audit, per probe.

``results.json`` holds the audit as shares; this file holds what they are shares *of*, so a reader (the
``/ui`` Audit view, ``jq``) can see which edit was *over* and on which probe it leaked. One JSON object a
line, by ``type``:

- ``header``: ``format`` (``esg-memory-eval-audit``), ``format_version`` (1), ``methods``, ``protocols``,
  ``labels``, ``thumbnail_px``;
- ``case`` (one per edit of the stream): ``case``, ``uid``, ``edit_id``, ``question``, ``answer`` (its
  last), ``image`` (the sha256 of its thumbnail, or null), ``deleted``, and ``probes``: per probe
  ``probe``, ``kind``, ``question``, ``image`` (thumbnail sha or null) — what does not depend on a method;
- ``edit`` (one per method, protocol and scored edit): ``method``, ``protocol``, ``case``, ``label``
  (``correct`` / ``under`` / ``over`` / ``fail`` among edits whose reliability probe is answered exactly,
  ``unreliable`` otherwise: ScopeEdit's classes, exactly the rule behind results.json's shares),
  ``reliable``, ``generalizes``, ``leaks``, and ``probes``: ``probe``, ``target``, ``generated``,
  ``exact_match``, ``fired`` (the edit injected, null: none), ``owner_fired``, and where they apply
  ``changed`` (locality probes: the answer or a top-1 token moved vs the pre-edit model), ``fidelity``
  (generalization probes: the new answer with the edit's own adapter forced in) and ``score`` /
  ``threshold`` / ``margin`` (ours only: its best-margin candidate, routed or not);
- ``deletion`` (one per method, stage and deleted edit): ``method``, ``stage`` (``right_after`` the delete
  or ``final``), ``case``, and per generalization probe ``probe``, ``target``, ``generated``, ``fired``,
  ``residue`` (``text`` / ``tokens`` / ``top10`` / ``bits``: differs from the pre-edit model).

Pictures: every probe's picture as a PNG thumbnail of at most `THUMBNAIL_PX` pixels a side (never
enlarged) in ``probe_images/<sha256 of the PNG>.png``, written once per distinct picture; a picture that
cannot be read is logged and left out (``image``: null). The memory keeps nothing of a deleted edit: this
file is where its audit lives.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index import atomic_write_bytes

from ..errors import EsgMemoryError
from .aggregate import edit_outcome

__all__ = [
    "AUDIT_FILE",
    "AUDIT_FORMAT",
    "IMAGES_DIR",
    "LABELS",
    "THUMBNAIL_PX",
    "AuditInput",
    "edit_label",
    "write_audit",
]

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
AUDIT_FORMAT = "esg-memory-eval-audit"
IMAGES_DIR = "probe_images"
#: Longest side of a probe thumbnail, in pixels.
THUMBNAIL_PX = 96
#: Per-edit labels: ScopeEdit's four classes of a successful edit, then the edits outside the shares.
LABELS = ("correct", "under", "over", "fail", "unreliable")


@dataclass
class AuditInput:
    """What the run knows that the audit needs: the stream's cases and probes, and the records scored.

    ``records[method][protocol]``: `probe_record` dicts (with ``target``; ours' with ``score`` /
    ``threshold`` / ``margin``); ``deleted[method][stage]``: the deleted edits' generalization probes.
    """

    cases: list[dict[str, Any]]
    """Per case: ``uid``, ``edit_id``, ``question``, ``answer``, ``image`` (an image ref), ``deleted``."""
    probe_case: list[int]
    probe_kind: list[str]
    probe_question: list[str]
    probe_image: list[Any]
    records: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    deleted: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def edit_label(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One edit's audit from its probe records (None without a reliability probe): ``reliable``,
    ``generalizes``, ``leaks`` (`aggregate.edit_outcome`, the audit's own rule) and the ``label`` they give,
    as `scope_audit` counts it."""
    outcome = edit_outcome(records)
    if outcome is None:
        return None
    reliable, general, leaks = outcome
    if not reliable:
        label = "unreliable"
    elif general:
        label = "over" if leaks else "correct"
    else:
        label = "fail" if leaks else "under"
    return {"label": label, "reliable": reliable, "generalizes": general, "leaks": leaks}


def _num(x: Any) -> float | None:
    """A JSON-safe float to 5 decimals, as probes.json's (NaN and infinities: None)."""
    if x is None:
        return None
    v = float(x)
    return round(v, 5) if math.isfinite(v) else None


def _fired(r: Mapping[str, Any]) -> int | None:
    return None if r["fired"] < 0 else int(r["fired"])


def _probe_out(r: Mapping[str, Any]) -> dict[str, Any]:
    out = {
        "probe": int(r["probe"]),
        "target": r.get("target"),
        "generated": r.get("answer"),
        "exact_match": bool(r["em"]),
        "fired": _fired(r),
        "owner_fired": bool(r["owner_fired"]),
    }
    if "changed" in r:  # locality probes
        out["changed"] = bool(r["changed"])
    if "fidelity" in r:  # generalization probes of a live edit
        out["fidelity"] = bool(r["fidelity"])
    for k in ("score", "threshold", "margin"):  # ours' routing
        if k in r:
            out[k] = _num(r[k])
    return out


def _residue_out(r: Mapping[str, Any]) -> dict[str, Any]:
    res = r.get("residue")
    return {
        "probe": int(r["probe"]),
        "target": r.get("target"),
        "generated": r.get("answer"),
        "fired": _fired(r),
        "residue": None if res is None else {k: bool(v) for k, v in res.items()},
    }


class _Thumbnails:
    """Writes each distinct picture once as a PNG thumbnail under ``out/probe_images``."""

    def __init__(self, out: Path, px: int = THUMBNAIL_PX):
        self.dir, self.px = out / IMAGES_DIR, px
        self.seen: dict[Any, str | None] = {}
        self.bytes = 0

    def __call__(self, ref: Any) -> str | None:
        if ref is None:
            return None
        key = ("b", hashlib.sha256(bytes(ref)).hexdigest()) if isinstance(ref, (bytes, bytearray)) \
            else ("p", str(ref))
        if key not in self.seen:
            self.seen[key] = self._write(ref)
        return self.seen[key]

    def _write(self, ref: Any) -> str | None:
        from ..images import load_image

        try:
            im = load_image(ref).image.copy()
            im.thumbnail((self.px, self.px))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        except (EsgMemoryError, OSError, ValueError) as e:
            logger.warning("probe picture %s left out of the audit: %s", str(ref)[:80], e)
            return None
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        path = self.dir / f"{sha}.png"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            self.bytes += len(data)
        return sha


def _by_case(records: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    by: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by[int(r["case"])].append(r)
    return by


def audit_lines(src: AuditInput, thumb: Any) -> list[dict[str, Any]]:
    """The objects of ``audit.jsonl`` (``thumb``: picture ref -> thumbnail sha or None)."""
    protocols = sorted({p for per in src.records.values() for p in per}, key=("immediate", "retention").index)
    lines: list[dict[str, Any]] = [{
        "type": "header", "format": AUDIT_FORMAT, "format_version": 1, "methods": list(src.records),
        "protocols": protocols, "labels": list(LABELS), "thumbnail_px": THUMBNAIL_PX,
    }]
    probes_of: dict[int, list[int]] = defaultdict(list)
    for p, c in enumerate(src.probe_case):
        probes_of[c].append(p)
    for c, case in enumerate(src.cases):
        lines.append({
            "type": "case", "case": c, "uid": case["uid"], "edit_id": case["edit_id"],
            "question": case["question"], "answer": case["answer"], "image": thumb(case["image"]),
            "deleted": bool(case["deleted"]),
            "probes": [{"probe": p, "kind": src.probe_kind[p], "question": src.probe_question[p],
                        "image": thumb(src.probe_image[p])} for p in probes_of[c]],
        })
    for method, per in src.records.items():
        for protocol in protocols:
            for c, recs in sorted(_by_case(per.get(protocol) or []).items()):
                lab = edit_label(recs)
                if lab is None:
                    continue
                lines.append({"type": "edit", "method": method, "protocol": protocol, "case": c, **lab,
                              "probes": [_probe_out(r) for r in recs]})
    for method, stages in src.deleted.items():
        for stage in ("right_after", "final"):
            for c, recs in sorted(_by_case(stages.get(stage) or []).items()):
                lines.append({"type": "deletion", "method": method, "stage": stage, "case": c,
                              "probes": [_residue_out(r) for r in recs]})
    return lines


def write_audit(src: AuditInput, out: Path) -> dict[str, int]:
    """Write ``audit.jsonl`` and the thumbnails into ``out``; returns ``{"lines", "bytes",
    "images", "image_bytes"}`` (what it wrote)."""
    thumb = _Thumbnails(out)
    lines = audit_lines(src, thumb)
    text = "".join(json.dumps(x, allow_nan=False, separators=(",", ":")) + "\n" for x in lines)
    data = text.encode("utf-8")
    atomic_write_bytes(out / AUDIT_FILE, data)
    images = len({v for v in thumb.seen.values() if v is not None})
    return {"lines": len(lines), "bytes": len(data), "images": images, "image_bytes": thumb.bytes}
