"""Pydantic models of the edit debugger's endpoints (`esg_memory.serve.ui.routes`), in /openapi.json.

Replies allow extra fields, as the native ones do (`esg_memory.serve.schemas`); the feedback body is a
content-neutral request model read from JSON or a form by `esg_memory.serve.bodies`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..schemas import RoutedRow

__all__ = [
    "BareReply",
    "BareRow",
    "Candidate",
    "ExplainReply",
    "ExplainedRow",
    "FeedbackIn",
    "FeedbackReply",
    "Neighbour",
    "NeighboursReply",
    "ProbePoint",
    "ScopeMapReply",
    "ScopePoint",
]


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Candidate(_Out):
    """One edit considered for an input, scored on its best-margin key."""

    edit_id: int
    answer: str | None = None
    question: str | None = None
    key: str = Field(description="Origin of the edit's best-margin key: anchor, positive:..., feedback:...")
    score: float = Field(description="Cosine similarity of the input's key and that key.")
    threshold: float = Field(description="That key's cosine threshold.")
    margin: float = Field(description="score - threshold; routing picks the in-scope edit with the largest.")
    in_scope: bool
    why: str | None = Field(None, description="Why routing picked it, or why not (candidates only).")


class ExplainedRow(RoutedRow):
    """A ``POST /route`` row with the top-k candidates (the winner first when one is in scope)."""

    candidates: list[Candidate] = Field(default_factory=list)


class ExplainReply(_Out):
    results: list[ExplainedRow]


class BareRow(_Out):
    text: str = Field(description="The bare base model's answer: every edit disabled.")


class BareReply(_Out):
    results: list[BareRow]


class Neighbour(Candidate):
    """Another edit, scored on its best-margin key against this edit's anchor key."""


class NeighboursReply(_Out):
    id: int
    key: str = Field(description="The key of this edit that was routed (its anchor).")
    neighbours: list[Neighbour]
    constrained_by: list[int] = Field(description="Edits whose keys shaped this edit's scope.")
    holders: list[int] = Field(description="Edits whose scope this edit constrains.")


class ScopePoint(_Out):
    edit_id: int
    key: str
    answer: str | None = None
    x: float
    y: float
    threshold: float
    radius: float = Field(description="sqrt(2 (1 - threshold)): the scope's chord radius on the unit sphere, "
                                      "approximate in the 2-D projection.")


class ProbePoint(_Out):
    x: float
    y: float
    prompt: str | None = None
    edit_id: int | None = Field(None, description="The edit routing sends this input to (null: none).")


class ScopeMapReply(_Out):
    points: list[ScopePoint]
    probes: list[ProbePoint] = Field(default_factory=list)
    explained_variance: list[float]
    method: str


class FeedbackIn(BaseModel):
    """``POST /feedback``: this input should route to ``expected_edit_id`` (null: to no edit)."""

    model_config = ConfigDict(extra="forbid")
    LIST_FIELDS: ClassVar[frozenset[str]] = frozenset()
    JSON_TEXT_FIELDS: ClassVar[frozenset[str]] = frozenset()
    IMAGE_FIELDS: ClassVar[frozenset[str]] = frozenset({"image"})

    prompt: str | None = Field(None, description="The input's text.")
    image: bytes | None = Field(None, description="The input's image (an upload, or base64 / a data: URI).")
    expected_edit_id: int | None = Field(None, description="The edit that should answer it; null: none.")


class FeedbackReply(_Out):
    routed_before: int = Field(description="The edit the input routed to before (-1: none).")
    routed_after: int
    actions: list[str]
    refit: list[int]
    resolved: bool
    persist_seconds: float | None = None

