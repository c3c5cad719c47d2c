"""The records an edit memory is made of: edits, their versions, their scopes, routing results.

Every record is a plain dataclass that round-trips through JSON (`to_dict` / `from_dict`), so a
saved memory is data a user can read, diff and audit — never pickled objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import FormatError

__all__ = [
    "Conflict",
    "ConflictProbe",
    "Edit",
    "EditVersion",
    "FeedbackOutcome",
    "FeedbackProbe",
    "Positive",
    "RouteResult",
    "ScopeRecord",
    "UncoveredPositive",
    "from_fields",
]


def from_fields(cls, data: Any, what: str):
    """``cls(**data)`` for a JSON object with no unknown fields, else `FormatError` naming ``what``."""
    if not isinstance(data, dict):
        raise FormatError(f"{what}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise FormatError(f"{what}: unknown fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise FormatError(f"{what}: {e}") from None


@dataclass(frozen=True)
class Positive:
    """An input that must route to the edit. ``None`` fields inherit the edit's own image/question."""

    text: str | None = None
    image: str | None = None  # sha256 of a stored blob

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Positive:
        return from_fields(cls, d, "positive")


@dataclass(frozen=True)
class FeedbackProbe:
    """An input a user reported: ``kind="positive"`` must route here, ``"negative"`` must not."""

    kind: str
    text: str | None
    image: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeedbackProbe:
        return from_fields(cls, d, "feedback probe")


@dataclass(frozen=True)
class ScopeRecord:
    """One key of an edit's scope and *why* its threshold is what it is."""

    origin: str  # "anchor", "positive:<label>" or "feedback:<n>"
    threshold: float
    hardest_negative: float | None  # cosine of the most similar negative to this key
    hardest_negative_source: str | None  # e.g. "edit 12 anchor", "locality 37", "same-image: 'What color...'"
    easiest_positive: float | None  # lowest cosine among the positives this key covers
    margin: float  # threshold - hardest_negative actually kept (None-negatives: vs the floor)
    covers: int  # positives (excluding the key itself) inside this key's ball
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScopeRecord:
        return from_fields(cls, d, "scope record")


@dataclass(frozen=True)
class UncoveredPositive:
    """A positive no key covers, and why covering it was refused."""

    origin: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UncoveredPositive:
        return from_fields(cls, d, "uncovered positive")


@dataclass
class EditVersion:
    """One entry of an edit's append-only history, with the scope it had while it was current."""

    version: int
    question: str
    answer: str
    image: str | None
    positives: list[Positive]
    created_at: float
    reason: str  # "add", "revise", "rollback to v<n>"
    feedback: list[FeedbackProbe] = field(default_factory=list)
    scope: list[ScopeRecord] = field(default_factory=list)
    uncovered: list[UncoveredPositive] = field(default_factory=list)
    constrained_by: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "question": self.question,
            "answer": self.answer,
            "image": self.image,
            "positives": [p.to_dict() for p in self.positives],
            "created_at": self.created_at,
            "reason": self.reason,
            "feedback": [p.to_dict() for p in self.feedback],
            "scope": [s.to_dict() for s in self.scope],
            "uncovered": [u.to_dict() for u in self.uncovered],
            "constrained_by": list(self.constrained_by),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditVersion:
        if not isinstance(d, dict):
            raise FormatError("version: expected an object")
        d = dict(d)
        try:
            d["positives"] = [Positive.from_dict(p) for p in d.get("positives", [])]
            d["feedback"] = [FeedbackProbe.from_dict(p) for p in d.get("feedback", [])]
            d["scope"] = [ScopeRecord.from_dict(p) for p in d.get("scope", [])]
            d["uncovered"] = [UncoveredPositive.from_dict(p) for p in d.get("uncovered", [])]
        except (TypeError, AttributeError) as e:
            raise FormatError(f"version: {e}") from None
        return from_fields(cls, d, "version")

    def copy(self) -> EditVersion:
        return EditVersion.from_dict(self.to_dict())


@dataclass(frozen=True)
class Edit:
    """A snapshot of one edit at its current version (what `EditMemory.get` returns)."""

    id: int
    version: int
    question: str
    answer: str
    image: str | None
    positives: list[Positive]
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    scope: list[ScopeRecord]
    uncovered: list[UncoveredPositive]
    constrained_by: list[int]

    @property
    def thresholds(self) -> list[float]:
        return [s.threshold for s in self.scope]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "question": self.question,
            "answer": self.answer,
            "image": self.image,
            "positives": [p.to_dict() for p in self.positives],
            "metadata": self.metadata,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "scope": [s.to_dict() for s in self.scope],
            "uncovered": [u.to_dict() for u in self.uncovered],
            "constrained_by": list(self.constrained_by),
        }


@dataclass(frozen=True)
class ConflictProbe:
    """A known input of ``owner`` that lands inside both edits' scopes."""

    owner: int
    origin: str
    score_a: float
    threshold_a: float
    score_b: float
    threshold_b: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Conflict:
    """Two edits with different answers whose scopes overlap on known inputs."""

    edit_a: int
    edit_b: int
    answer_a: str
    answer_b: str
    probes: list[ConflictProbe]

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in ("edit_a", "edit_b", "answer_a", "answer_b")},
            "probes": [p.to_dict() for p in self.probes],
        }


@dataclass(frozen=True)
class FeedbackOutcome:
    """What `EditMemory.feedback` changed."""

    routed_before: int
    routed_after: int
    actions: list[str]
    refit: list[int]
    resolved: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RouteResult:
    """Routing of a batch: one row per input.

    ``edit_ids`` is the in-scope edit with the largest margin (score - threshold) or -1.
    ``scores``/``thresholds``/``margins`` describe the best-margin candidate of each row, routed or
    not (so an unrouted row shows how far it was from the nearest scope; NaN when the memory is empty).
    ``runner_up`` is the candidate with the next-largest margin (-1 if none); ``keys`` are the
    encoded queries, reusable for another call with ``keys=``.
    """

    edit_ids: np.ndarray
    versions: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    margins: np.ndarray
    runner_up: np.ndarray
    runner_up_margins: np.ndarray
    nearest: np.ndarray
    origins: list[str]
    keys: np.ndarray

    def __len__(self) -> int:
        return int(self.edit_ids.shape[0])

    def explain(self, i: int) -> str:
        """One sentence saying why row ``i`` went where it went."""
        n = len(self)
        if not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"row {i!r} out of range for {n} rows")
        i = int(i) % n
        eid, near = int(self.edit_ids[i]), int(self.nearest[i])
        ru = int(self.runner_up[i])
        ru_txt = (
            f"; runner-up edit {ru} (margin {float(self.runner_up_margins[i]):+.4f})"
            if ru >= 0
            else "; no runner-up"
        )
        if near < 0:
            return f"row {i}: no edit (memory empty or no candidate)"
        detail = (
            f"score {float(self.scores[i]):.4f} vs threshold {float(self.thresholds[i]):.4f} "
            f"of key '{self.origins[i]}', margin {float(self.margins[i]):+.4f}"
        )
        if eid >= 0:
            return f"row {i}: routed to edit {eid} v{int(self.versions[i])}: {detail}{ru_txt}"
        return f"row {i}: no edit in scope; nearest is edit {near}: {detail}{ru_txt}"
