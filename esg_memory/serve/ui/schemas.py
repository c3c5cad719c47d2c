"""Pydantic models of the edit debugger's endpoints (`esg_memory.serve.ui.routes`), in /openapi.json.

Replies allow extra fields, as the native ones do (`esg_memory.serve.schemas`); the feedback body is a
content-neutral request model read from JSON or a form by `esg_memory.serve.bodies`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..schemas import RoutedRow

__all__ = [
    "AuditDeletionRow",
    "AuditEditRow",
    "AuditHealth",
    "AuditProbe",
    "AuditReply",
    "AuditRun",
    "AuditSummary",
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



# ------------------------------------------------------------------------------------- eval audit (/audit)


class AuditRun(_Out):
    """The eval run an ``/audit`` reply reads (``esg-memory ui --eval DIR``)."""

    name: str = Field(description="The run directory's name.")
    source: str | None = None
    kind: str | None = None
    image_mode: str | None = None
    model: str | None = None
    encoder: str | None = None
    seed: int | None = None
    n_adds: int | None = None
    n_revisions: int | None = None
    n_deletions: int | None = None
    methods: list[str]
    protocols: list[str]


class AuditSummary(_Out):
    """One method under one protocol: results.json's ScopeEdit shares and the rows' label counts."""

    method: str
    protocol: str
    n_edits: int = Field(description="Edits scored (rows).")
    n_successful: int | None = Field(None, description="Edits whose reliability probe is answered exactly.")
    shares: dict[str, float | None] = Field(description="results.json's audit: correct, under, over, fail "
                                                        "among the successful edits.")
    counts: dict[str, int] = Field(description="Rows per label (unreliable: outside the shares).")


class AuditProbe(_Out):
    """One probe of an audited edit, as its method saw it (``residue``: the deletion audit's)."""

    probe: int
    kind: str | None = None
    question: str | None = None
    image: str | None = Field(None, description="sha256 of its thumbnail (GET /audit/images/{sha}).")
    target: str | None = None
    generated: str | None = Field(None, description="The greedy answer.")
    exact_match: bool | None = None
    fired: int | None = Field(None, description="The edit injected (null: none).")
    owner_fired: bool | None = None
    changed: bool | None = Field(None, description="Locality probes: moved vs the pre-edit model.")
    fidelity: bool | None = None
    score: float | None = Field(None, description="ours: cosine of its best-margin candidate.")
    threshold: float | None = None
    margin: float | None = None
    residue: dict[str, bool] | None = Field(None, description="Deleted edits: differs from the pre-edit "
                                                               "model (text, tokens, top10, bits).")


class _AuditCase(_Out):
    case: int
    uid: str | None = None
    edit_id: int | None = None
    question: str | None = None
    answer: str | None = None
    image: str | None = None
    deleted: bool = False


class AuditEditRow(_AuditCase):
    """One edit's ScopeEdit label under a method and protocol, with its probes."""

    label: str = Field(description="correct, under, over, fail (edits answering their own input), or "
                                   "unreliable.")
    reliable: bool
    generalizes: bool
    leaks: bool
    probes: list[AuditProbe]


class AuditDeletionRow(_AuditCase):
    """A deleted edit's generalization probes right after the delete and at the end."""

    right_after: list[AuditProbe]
    final: list[AuditProbe]


class AuditReply(_Out):
    """``GET /audit``: the run, its summary, one method and protocol's rows and the method's deletions;
    ``run`` null (and the rest empty) when the server has no eval run (started without ``--eval``)."""

    run: AuditRun | None
    method: str | None = None
    protocol: str | None = None
    labels: list[str]
    summary: list[AuditSummary] = Field(default_factory=list)
    rows: list[AuditEditRow] = Field(default_factory=list)
    deletion: dict[str, Any] | None = Field(None, description="results.json's deletion audit of the method.")
    deletions: list[AuditDeletionRow] = Field(default_factory=list)


class AuditHealth(_Out):
    """``/health`` of an audit-only server (``esg-memory ui --eval DIR`` without a memory)."""

    status: str
    read_only: bool = True
    audit_only: bool = True
    run: str = Field(description="The run directory's name.")
