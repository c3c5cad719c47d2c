"""The records an edit memory is made of: edits, their versions, their scopes, routing results.

Every record is a plain dataclass that round-trips through JSON (`to_dict` / `from_dict`), so a
saved memory is data a user can read, diff and audit — never pickled objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import ConfigError, FormatError

__all__ = [
    "Conflict",
    "ConflictProbe",
    "Edit",
    "EditVersion",
    "FeedbackOutcome",
    "FeedbackProbe",
    "MemoryConfig",
    "Positive",
    "RouteResult",
    "ScopeRecord",
    "UncoveredPositive",
]


def _from_dict(cls, data: Any, what: str):
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


@dataclass
class MemoryConfig:
    """How scopes are learned. Every field is part of a saved memory (changing one changes routing).

    The neighbour radius (two edits constrain each other when any of their known inputs are at
    least this similar) is derived: ``min_threshold - margin``. Below it an input cannot influence a
    threshold, which is what makes scopes independent of unrelated edits and deletion exact.
    """

    margin: float = field(
        default=0.03, metadata={"help": "Gap kept between a threshold and the hardest negative."}
    )
    placement: float = field(
        default=0.0,
        metadata={
            "help": "Where the threshold sits in the free interval [hardest negative + margin, easiest "
            "positive - margin]: 0 = lowest safe value (widest generalization), 1 = tight around positives."
        },
    )
    min_threshold: float = field(
        default=0.6, metadata={"help": "No key's threshold goes below this cosine (caps a ball's size)."}
    )
    max_threshold: float = field(
        default=0.995, metadata={"help": "No threshold goes above this (a key must still cover near copies)."}
    )
    max_keys: int = field(
        default=4, metadata={"help": "Most keys one edit may own (anchor + extra positives)."}
    )
    n_text_positives: int = field(
        default=4, metadata={"help": "Generated question rephrasings (question_templates) used as positives."}
    )
    n_image_positives: int = field(
        default=2, metadata={"help": "Generated image augmentations (augment_image) used as positives."}
    )
    n_generic_questions: int = field(
        default=8,
        metadata={"help": "Hard negatives 'same image, other question' from built-in generic questions."},
    )
    n_pool_images: int = field(
        default=4,
        metadata={"help": "Hard negatives 'same question, other image' taken from locality-pool images."},
    )
    hard_negative_max_text_sim: float = field(
        default=0.75,
        metadata={
            "help": "A generic/other question this text-similar to the edit's question is not a negative."
        },
    )
    hard_negative_max_image_sim: float = field(
        default=0.9,
        metadata={
            "help": "An image (image-only cosine) this close to the edit's shows the same subject: "
            "not a negative."
        },
    )
    locality_pool_size: int = field(
        default=1000,
        metadata={"help": "Most unrelated inputs (locality pool) used as negatives by every edit."},
    )
    neighbour_k: int = field(
        default=4,
        metadata={
            "help": "Nearest neighbour edits whose question/image are crossed with this edit's "
            "as hard negatives."
        },
    )
    max_neighbours: int = field(
        default=16,
        metadata={
            "help": "Most neighbour edits that constrain one edit's scope: the nearest ones (by link "
            "cosine, ties by id) within the neighbour radius; 0 = all of them. Bounds what one add or "
            "delete re-fits when many edits look alike; saved memories from before this field load as 0."
        },
    )
    route_k: int = field(default=8, metadata={"help": "Candidate edits examined per routed input."})
    separate_same_answer: bool = field(
        default=False,
        metadata={
            "help": "Also keep apart edits whose answers are equal "
            "(default: only different answers conflict)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of generated positives (mixed with each edit's content)."}
    )
    settle: str = field(
        default="background",
        metadata={
            "help": "When a delete re-fits the neighbours the deleted edit constrained: 'background' "
            "(the delete returns once the edit stops routing; a thread re-fits them right after), "
            "'manual' (at the next write, save or settle()), 'sync' (inside the delete call). Until "
            "then they keep the scopes they had while it existed; afterwards the memory routes as if "
            "the edit never existed. Does not change settled routing."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def neighbour_radius(self) -> float:
        return self.min_threshold - self.margin

    def validate(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"MemoryConfig.{name} must be a finite number, got {v!r}")
            return float(v)

        def count(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"MemoryConfig.{name} must be an integer >= {lo}, got {v!r}")

        if not 0.0 <= num("margin") < 0.5:
            raise ConfigError(f"MemoryConfig.margin must be in [0, 0.5), got {self.margin}")
        if not 0.0 <= num("placement") <= 1.0:
            raise ConfigError(f"MemoryConfig.placement must be in [0, 1], got {self.placement}")
        lo, hi = num("min_threshold"), num("max_threshold")
        if not -1.0 < lo <= hi < 1.0:
            raise ConfigError(f"need -1 < min_threshold <= max_threshold < 1, got {lo} and {hi}")
        for name in ("hard_negative_max_text_sim", "hard_negative_max_image_sim"):
            if not -1.0 <= num(name) <= 1.0:
                raise ConfigError(f"MemoryConfig.{name} must be in [-1, 1]")
        count("max_keys", 1)
        for name in (
            "n_text_positives",
            "n_image_positives",
            "n_generic_questions",
            "n_pool_images",
            "locality_pool_size",
            "neighbour_k",
            "max_neighbours",
            "seed",
        ):
            count(name, 0)
        count("route_k", 1)
        if not isinstance(self.separate_same_answer, bool):
            raise ConfigError("MemoryConfig.separate_same_answer must be a bool")
        if self.settle not in ("background", "sync", "manual"):
            raise ConfigError(
                f"MemoryConfig.settle must be 'background', 'sync' or 'manual', got {self.settle!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        if isinstance(data, dict) and "max_neighbours" not in data:
            # Written before the cap existed: every edit within the radius was a neighbour.
            data = {**data, "max_neighbours": 0}
        try:
            return _from_dict(cls, data, "config")
        except ConfigError as e:
            raise FormatError(f"saved config is invalid: {e}") from None


@dataclass(frozen=True)
class Positive:
    """An input that must route to the edit. ``None`` fields inherit the edit's own image/question."""

    text: str | None = None
    image: str | None = None  # sha256 of a stored blob

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Positive:
        return _from_dict(cls, d, "positive")


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
        return _from_dict(cls, d, "feedback probe")


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
        return _from_dict(cls, d, "scope record")


@dataclass(frozen=True)
class UncoveredPositive:
    """A positive no key covers, and why covering it was refused."""

    origin: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UncoveredPositive:
        return _from_dict(cls, d, "uncovered positive")


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
        return _from_dict(cls, d, "version")

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
