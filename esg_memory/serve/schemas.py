"""Pydantic models of the native HTTP API: the request bodies and every reply `/openapi.json` documents.

Request models (``*In``) are content-neutral: an image field holds the image's *bytes*.
`esg_memory.serve.bodies` fills one from a multipart (or urlencoded) form, where images are uploads,
or from a JSON body, where they are base64 strings or ``data:`` URIs decoded before validation, and
validates the same model: both content types get the same checks and the same errors.
`request_body_docs` writes a route's OpenAPI ``requestBody`` from its model, once per content type.

Reply models allow extra fields (``extra="allow"``): the service's dicts may grow, and a field added
there reaches clients before it is declared here. Routes reply with ``response_model_exclude_unset``,
so a declared field the service did not send is left out rather than sent as null.

Imported only when an app is built (pydantic is part of the ``serve`` extra).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema

from ..config import TuneMode

__all__ = [
    "EditDeleted",
    "EditDetail",
    "EditIn",
    "EditList",
    "EditRecord",
    "EditRolledBack",
    "EditWritten",
    "ErrorBody",
    "GenerateIn",
    "GenerateReply",
    "GeneratedRow",
    "Health",
    "PositiveIn",
    "ReviseIn",
    "RollbackIn",
    "RouteIn",
    "RouteReply",
    "RoutedRow",
    "TuneReport",
    "error_responses",
    "request_body_docs",
]

# ---------------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    """A request body. Unknown fields are refused (a misspelt field must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    #: fields that repeat in a form (JSON: a list, or one value)
    LIST_FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: fields a form carries as JSON text (JSON: the value itself)
    JSON_TEXT_FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: image fields: uploads in a form, base64 strings or ``data:`` URIs in JSON
    IMAGE_FIELDS: ClassVar[frozenset[str]] = frozenset()


class PositiveIn(BaseModel):
    """An extra input the edit must cover: a text, an image, or both."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="The positive's prompt (null: image only).")
    image: str | None = Field(None, description="The positive's image, base64 or a data: URI.")
    image_path: str | None = Field(None, description="The positive's image: a path inside --allowed-root.")
    image_index: int | None = Field(None, strict=True,
                                    description="The positive's image: an index into positive_image.")


_POSITIVES = ('Extra inputs the edit must cover: texts, or {"text", "image" | "image_path" | "image_index"} '
              "objects (image_index points into positive_image).")
_NEGATIVES = ("Inputs the edit must NOT hold: texts (asked about the edit's image), or the same objects as "
              "positives (an image alone keeps the edit's question; image_index points into negative_image).")
_TUNE = ("Tune the edit's adapter: auto, never, sync (before the reply) or background; "
         "absent: the service's default.")


class EditIn(_Body):
    """``POST /edits``."""

    LIST_FIELDS = frozenset({"positive_image", "negative_image"})
    JSON_TEXT_FIELDS = frozenset({"positives", "negatives", "metadata"})
    IMAGE_FIELDS = frozenset({"image", "positive_image", "negative_image"})

    question: str = Field(description="The question (prompt) the edit answers.")
    answer: str = Field(description="The new answer.")
    image: bytes | None = Field(None, description="The edit's image.")
    image_path: str | None = Field(None, description="The edit's image: a path inside --allowed-root.")
    positives: list[str | PositiveIn] | None = Field(None, description=_POSITIVES)
    positive_image: list[bytes] | None = Field(None, description="Images the positives refer to by index.")
    negatives: list[str | PositiveIn] | None = Field(None, description=_NEGATIVES)
    negative_image: list[bytes] | None = Field(None, description="Images the negatives refer to by index.")
    metadata: dict[str, Any] | None = Field(None, description="Object stored with the edit.")
    tune: TuneMode | None = Field(None, description=_TUNE)
    edit_id: int | None = Field(None, description="Explicit id (ids are never reused).")


class ReviseIn(_Body):
    """``PATCH /edits/{edit_id}``: the fields given replace the current version's."""

    LIST_FIELDS = frozenset({"positive_image"})
    JSON_TEXT_FIELDS = frozenset({"positives"})
    IMAGE_FIELDS = frozenset({"image", "positive_image"})

    question: str | None = Field(None, description="The new question.")
    answer: str | None = Field(None, description="The new answer.")
    image: bytes | None = Field(None, description="The new image.")
    image_path: str | None = Field(None, description="The new image: a path inside --allowed-root.")
    positives: list[str | PositiveIn] | None = Field(None, description=f"{_POSITIVES} Replaces the old ones.")
    positive_image: list[bytes] | None = Field(None, description="Images the positives refer to by index.")
    tune: TuneMode | None = Field(None, description=_TUNE)


class RouteIn(_Body):
    """``POST /route``: rows of (image, prompt); one image for every prompt, or one per prompt."""

    LIST_FIELDS = frozenset({"prompt", "image", "image_path"})
    IMAGE_FIELDS = frozenset({"image"})

    prompt: list[str] = Field(description="One or more prompts (a form repeats the field).")
    image: list[bytes] | None = Field(None, description="One image, or one per prompt.")
    image_path: list[str] | None = Field(None, description="Images as paths inside --allowed-root.")


class GenerateIn(RouteIn):
    """``POST /generate``: rows as for ``/route``, plus decoding options."""

    max_new_tokens: int = Field(16, ge=1, description="Tokens to generate at most.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, description="Seeded sampling is reproducible (it runs unbatched).")


class RollbackIn(BaseModel):
    """``POST /edits/{edit_id}/rollback``."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, description="The version to restore (becomes a new version).")


# ---------------------------------------------------------------------------------------------- replies


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """Every error reply, from the middleware or a route."""

    error: str = Field(description="Kind: an esg-memory error class, ValidationError, Unauthorized, ...")
    detail: Any = Field(description="A message, or the list of validation errors.")
    status: int = Field(description="The HTTP status, repeated.")


class TuneReport(_Reply):
    """How the adapter of a written edit was (or will be) tuned."""

    mode: str | None = None
    status: str | None = None
    exact: bool | None = None
    steps: int | None = None
    seconds: float | None = None
    loss: float | None = None
    error: str | None = None


class EditWritten(_Reply):
    """An acknowledged add or revision: on disk (journaled) before this reply."""

    id: int
    version: int
    tune: TuneReport | None = None
    persist_seconds: float = Field(description="Journal append + fsync time of this write.")
    gives_answer: bool | None = Field(None, description="Whether the model now gives the edit's answer on "
                                                        "its own input (null: not checked yet).")
    tuning: str | None = Field(None, description="Adapter tuning: none, pending, done or failed.")


class EditDeleted(_Reply):
    id: int
    deleted: bool
    persist_seconds: float


class EditRolledBack(_Reply):
    id: int
    version: int = Field(description="The new current version (a copy of the restored one).")
    rolled_back_to: int
    persist_seconds: float


class EditVersionOut(_Reply):
    """One entry of an edit's append-only history."""

    version: int
    question: str
    answer: str
    image: str | None = Field(None, description="Blob id (SHA-256) of the image, if any.")
    positives: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = Field([], description="Inputs this version must (positive) or must "
                                                           "not (negative) hold: given with the add, or "
                                                           "from /feedback.")
    created_at: float | None = None
    reason: str | None = None


class EditRecord(_Reply):
    """An edit at its current version."""

    id: int
    version: int
    question: str
    answer: str
    image: str | None = Field(None, description="Blob id (SHA-256) of the image, if any.")
    positives: list[dict[str, Any]] = []
    metadata: dict[str, Any] = {}
    created_at: float | None = None
    updated_at: float | None = None
    scope: list[dict[str, Any]] = []
    hits: int | None = Field(None, description="Generated rows this edit was injected into since start.")
    gives_answer: bool | None = None
    tuning: str | None = None


class TuningState(_Reply):
    pending: bool
    report: dict[str, Any] | None = None


class EditDetail(EditRecord):
    """One edit with its full version history."""

    history: list[EditVersionOut] = []
    tuning: str | TuningState | None = None
    tune_report: dict[str, Any] | None = Field(None, description="The latest tuning of this edit in this "
                                                                 "process (any version), if any.")


class EditList(_Reply):
    total: int
    offset: int
    limit: int
    edits: list[EditRecord]


class GeneratedRow(_Reply):
    text: str
    edit_id: int | None = Field(None, description="The edit injected into this row (null: none).")
    edit_version: int | None = None
    edit_answer: str | None = None
    score: float | None = None
    margin: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class GenerateReply(_Reply):
    results: list[GeneratedRow]


class RoutedRow(_Reply):
    edit_id: int | None = Field(None, description="The edit covering this input (null: none).")
    edit_version: int | None = None
    score: float | None = None
    threshold: float | None = None
    margin: float | None = None
    answer: str | None = None
    explanation: str | None = None


class RouteReply(_Reply):
    results: list[RoutedRow]


class ReplicaHealth(_Reply):
    """How far a replica of a shared (PostgreSQL) memory can vouch for being current."""

    healthy: bool = Field(description="stale_s within staleness_bound_s, following the log")
    store: str = Field(description="ok or unreachable")
    stale_s: float = Field(description="seconds since the replica last knew it had applied every write")
    staleness_bound_s: float
    applied: int = Field(description="the last log position this replica has applied")
    diverged: str | None = None
    last_error: str | None = None


class Health(_Reply):
    """Liveness and a summary; no edit contents (``/health`` is open even when reads are protected)."""

    status: str = Field(description="ok; degraded after a failed journal write or while the shared store "
                                    "is unreachable (reads served from memory, writes refused with 503); "
                                    "unhealthy (HTTP 503) when a replica is staler than its bound")
    edits: int
    read_only: bool
    model_type: str | None = None
    encoder: str | None = None
    queued: int
    uptime_s: float
    last_persist_error: str | None = None
    replica: ReplicaHealth | None = None


_ERRORS = {
    401: "No bearer token (writes; reads when they are protected).",
    403: "Wrong bearer token, read-only server, or an image path outside --allowed-root.",
    404: "Unknown edit.",
    409: "Conflict: duplicate id, unknown version, directory locked.",
    413: "Request body over --max-upload-mb.",
    415: "Content-Type neither multipart/form-data, x-www-form-urlencoded nor application/json.",
    422: "Invalid input: a missing or malformed field, bad base64, an undecodable image.",
    503: "Generation queue full (retry after Retry-After seconds).",
    504: "Generation timed out.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the error body for each status in ``codes``."""
    return {c: {"model": ErrorBody, "description": _ERRORS[c]} for c in codes}


# ---------------------------------------------------------------------------------------------- docs


class _FormSchema(GenerateJsonSchema):
    def bytes_schema(self, schema: Any) -> dict[str, Any]:
        return {"type": "string", "format": "binary"}


class _JsonSchema(GenerateJsonSchema):
    def bytes_schema(self, schema: Any) -> dict[str, Any]:
        return {"type": "string", "contentEncoding": "base64",
                "description": "base64, or a data: URI (data:image/png;base64,...)"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with every ``#/$defs/X`` reference replaced by its definition (none is recursive)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(copy.deepcopy(defs[ref.rsplit("/", 1)[1]]), defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _schema(model: type[_Body], generator: type[GenerateJsonSchema]) -> dict[str, Any]:
    raw = model.model_json_schema(schema_generator=generator)
    defs = raw.pop("$defs", {})
    return _inline(raw, defs)


def _one_or_many(prop: dict[str, Any]) -> dict[str, Any]:
    """A JSON list field's schema, widened to accept one item as well."""
    alts = prop.get("anyOf", [prop])
    arrays = [a for a in alts if a.get("type") == "array"]
    if not arrays:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "type", "items")}
    others = [a for a in alts if a.get("type") != "array"]
    return {**rest, "anyOf": [arrays[0]["items"], arrays[0], *others]}


def request_body_docs(model: type[_Body]) -> dict[str, Any]:
    """``openapi_extra`` of a route taking ``model`` as a multipart form or JSON (a urlencoded form, without
    files, is accepted too and parsed as the multipart one)."""
    form = _schema(model, _FormSchema)
    for name in model.JSON_TEXT_FIELDS:
        prop = form["properties"][name]
        form["properties"][name] = {"type": "string", "title": prop.get("title", name),
                                    "description": "JSON text. " + prop.get("description", "")}
    js = _schema(model, _JsonSchema)
    for name in model.LIST_FIELDS:
        js["properties"][name] = _one_or_many(js["properties"][name])
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": js},
    }}}
