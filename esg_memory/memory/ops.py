"""The vocabulary of writes: what a write asked for (`Op`) and what it did to the memory (`Change`).

Every write of an `EditMemory` — live, replayed from its journal, or (later) read from a shared log —
is one `Op` and one `Change`. The `Op` is the logical request, recorded as JSON in the journal
(``to_dict`` / `op_from_dict`, the format of journal version 1, unchanged). The `Change` is its
physical effect: the new state of every edit it created, re-fitted or deleted, the images it stored,
and the bookkeeping (`Effects`) that follows from the op alone — ids retired, the next free id,
attachments set, copied or dropped, deletes left to settle. `effects_of` derives that bookkeeping
from an op in one place, so a live write and its replay cannot disagree about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FormatError
from .state import EditState

__all__ = [
    "AddEdits",
    "Attach",
    "AttachmentEffect",
    "Change",
    "CopyAttachments",
    "Delete",
    "DropAttachments",
    "Effects",
    "Feedback",
    "NewEdit",
    "NewVersion",
    "Op",
    "SetAttachment",
    "Settle",
    "effects_of",
    "op_from_dict",
]


def _int(d: Mapping[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"{what}: {key!r} must be an integer, got {v!r}")
    return v


def _opt_str(d: Mapping[str, Any], key: str, what: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise FormatError(f"{what}: {key!r} must be a string or null, got {type(v).__name__}")
    return v


# ------------------------------------------------------------------------------------ ops
@dataclass(frozen=True)
class NewEdit:
    """One edit of an `AddEdits`: its id and content as given (images by sha256)."""

    edit_id: int
    question: str
    answer: str
    image: str | None
    positives: tuple[dict[str, Any], ...]  # `types.Positive.to_dict()` each
    metadata: Mapping[str, Any]
    attachments: Mapping[str, str] = field(default_factory=dict)
    """Attachments of the first version stored with the add (kind -> sha256; e.g. a compiled adapter)."""
    negatives: tuple[dict[str, Any], ...] = ()
    """User negatives as stored (`types.FeedbackProbe.to_dict()` each): inputs the edit must not hold."""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "edit_id": self.edit_id,
            "question": self.question,
            "answer": self.answer,
            "image": self.image,
            "positives": [dict(p) for p in self.positives],
            "metadata": self.metadata,
        }
        if self.attachments:  # absent when empty: records without attachments are as they always were
            d["attachments"] = dict(self.attachments)
        if self.negatives:  # likewise
            d["negatives"] = [dict(n) for n in self.negatives]
        return d


@dataclass(frozen=True)
class AddEdits:
    """`EditMemory.add` / `add_many`: new edits, all or none."""

    time: float
    edits: tuple[NewEdit, ...]
    NAME = "add_many"

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.NAME, "time": self.time, "edits": [e.to_dict() for e in self.edits]}


@dataclass(frozen=True)
class NewVersion:
    """`revise` / `rollback`: a new current version (a rollback copies the old version's attachments)."""

    edit_id: int
    version: Mapping[str, Any]  # `types.EditVersion.to_dict()`
    attachments_from: int | None = None
    NAME = "new_version"

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.NAME,
            "edit_id": self.edit_id,
            "version": dict(self.version),
            "attachments_from": self.attachments_from,
        }


@dataclass(frozen=True)
class Delete:
    """`delete`: the edit leaves. ``deferred``: its holders are re-fitted by a later `Settle`, which
    needs the one fact ``answer`` (whether it gave them negatives)."""

    edit_id: int
    deferred: bool = False
    answer: str | None = None
    NAME = "delete"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.NAME, "edit_id": self.edit_id}
        if self.deferred:
            d.update(deferred=True, answer=self.answer)
        return d


@dataclass(frozen=True)
class Settle:
    """The holders of these deferred deletes re-fitted (see `esg_memory.memory.settle`)."""

    deleted: tuple[int, ...]
    NAME = "settle"

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.NAME, "deleted": list(self.deleted)}


@dataclass(frozen=True)
class Feedback:
    """`feedback`: one observed input turned into negatives / a positive of the edits it concerns."""

    time: float
    image: str | None
    text: str | None
    expected_edit_id: int | None
    NAME = "feedback"

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.NAME,
            "time": self.time,
            "image": self.image,
            "text": self.text,
            "expected_edit_id": self.expected_edit_id,
        }


@dataclass(frozen=True)
class Attach:
    """`attach`: opaque bytes (sha256 given) stored for one version of an edit."""

    edit_id: int
    kind: str
    version: int
    sha256: str
    NAME = "attach"

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.NAME,
            "edit_id": self.edit_id,
            "kind": self.kind,
            "version": self.version,
            "sha256": self.sha256,
        }


Op = AddEdits | NewVersion | Delete | Settle | Feedback | Attach


def op_from_dict(d: Any, what: str = "operation") -> Op:
    """The `Op` a journal record holds; `FormatError` for an unknown or malformed one."""
    if not isinstance(d, Mapping):
        raise FormatError(f"{what}: expected an object, got {type(d).__name__}")
    name = d.get("op")
    if name == AddEdits.NAME:
        edits = d.get("edits")
        if not isinstance(edits, list):
            raise FormatError(f"{what}: 'edits' must be a list")
        out = []
        for e in edits:
            if not isinstance(e, Mapping) or not isinstance(e.get("positives", []), list):
                raise FormatError(f"{what}: malformed added edit")
            atts = e.get("attachments", {})
            if not isinstance(atts, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in atts.items()
            ):
                raise FormatError(f"{what}: 'attachments' of an added edit must map kinds to sha256s")
            out.append(
                NewEdit(
                    edit_id=_int(e, "edit_id", what),
                    question=str(e.get("question")),
                    answer=str(e.get("answer")),
                    image=_opt_str(e, "image", what),
                    positives=tuple(e.get("positives", [])),
                    metadata=e.get("metadata") or {},
                    attachments=dict(atts),
                    negatives=tuple(e.get("negatives", [])),
                )
            )
        return AddEdits(time=float(d.get("time", 0.0)), edits=tuple(out))
    if name == NewVersion.NAME:
        version = d.get("version")
        if not isinstance(version, Mapping):
            raise FormatError(f"{what}: 'version' must be an object")
        src = d.get("attachments_from")
        if src is not None:
            src = _int(d, "attachments_from", what)
        return NewVersion(edit_id=_int(d, "edit_id", what), version=version, attachments_from=src)
    if name == Delete.NAME:
        deferred = bool(d.get("deferred", False))
        answer = _opt_str(d, "answer", what) if deferred else None
        return Delete(edit_id=_int(d, "edit_id", what), deferred=deferred, answer=answer)
    if name == Settle.NAME:
        deleted = d.get("deleted")
        if not isinstance(deleted, list) or not all(isinstance(x, int) for x in deleted):
            raise FormatError(f"{what}: 'deleted' must be a list of ids")
        return Settle(deleted=tuple(deleted))
    if name == Feedback.NAME:
        exp = d.get("expected_edit_id")
        return Feedback(
            time=float(d.get("time", 0.0)),
            image=_opt_str(d, "image", what),
            text=_opt_str(d, "text", what),
            expected_edit_id=None if exp is None else _int(d, "expected_edit_id", what),
        )
    if name == Attach.NAME:
        kind, sha = d.get("kind"), d.get("sha256")
        if not isinstance(kind, str) or not isinstance(sha, str):
            raise FormatError(f"{what}: attach needs a kind and a sha256")
        return Attach(
            edit_id=_int(d, "edit_id", what), kind=kind, version=_int(d, "version", what), sha256=sha
        )
    raise FormatError(f"{what}: unknown operation {name!r}")


# ------------------------------------------------------------------------------------ effects
@dataclass(frozen=True)
class SetAttachment:
    edit_id: int
    version: int
    kind: str
    data: bytes


@dataclass(frozen=True)
class CopyAttachments:
    """Every attachment of ``edit_id`` at version ``source`` copied to version ``target``."""

    edit_id: int
    source: int
    target: int


@dataclass(frozen=True)
class DropAttachments:
    """Every attachment of ``edit_id`` dropped (it was deleted)."""

    edit_id: int


AttachmentEffect = SetAttachment | CopyAttachments | DropAttachments


@dataclass(frozen=True)
class Effects:
    """The bookkeeping of one or more writes, beyond the edit states they install.

    ``next_id``: the next free id is at least this; ``retired``: ids of deleted edits (never reused);
    ``attachments``: applied in order; ``pending``: deferred deletes added (id -> answer) and
    ``settled``: deferred deletes whose holders are re-fitted.
    """

    next_id: int | None = None
    retired: frozenset[int] = frozenset()
    attachments: tuple[AttachmentEffect, ...] = ()
    pending: Mapping[int, str | None] = field(default_factory=dict)
    settled: frozenset[int] = frozenset()

    def then(self, later: Effects) -> Effects:
        """These effects followed by ``later`` (ids are never reused, so a deferred delete is always
        added before it is settled)."""
        nxt = [n for n in (self.next_id, later.next_id) if n is not None]
        pending = {e: a for e, a in self.pending.items() if e not in later.settled}
        pending.update(later.pending)
        return Effects(
            next_id=max(nxt) if nxt else None,
            retired=self.retired | later.retired,
            attachments=self.attachments + later.attachments,
            pending=pending,
            settled=(self.settled - frozenset(later.pending)) | later.settled,
        )


def effects_of(op: Op, attachment: bytes | Mapping[str, bytes] | None = None) -> Effects:
    """The bookkeeping an op implies. ``attachment``: the bytes of an `Attach`; for an `AddEdits` whose
    edits carry attachments, their bytes by sha256."""
    if isinstance(op, AddEdits):
        atts = attachment if isinstance(attachment, Mapping) else {}
        try:
            sets = tuple(
                SetAttachment(e.edit_id, 1, kind, bytes(atts[sha]))
                for e in op.edits
                for kind, sha in sorted(e.attachments.items())
            )
        except KeyError as e:
            raise FormatError(f"add of edits: no bytes for attachment {e.args[0]!r}") from None
        return Effects(next_id=max(e.edit_id for e in op.edits) + 1 if op.edits else None, attachments=sets)
    if isinstance(op, NewVersion):
        if op.attachments_from is None:
            return Effects()
        target = int(op.version["version"])
        return Effects(attachments=(CopyAttachments(op.edit_id, op.attachments_from, target),))
    if isinstance(op, Delete):
        return Effects(
            retired=frozenset((op.edit_id,)),
            attachments=(DropAttachments(op.edit_id),),
            pending={op.edit_id: op.answer} if op.deferred else {},
        )
    if isinstance(op, Settle):
        return Effects(settled=frozenset(op.deleted))
    if isinstance(op, Attach):
        if attachment is None:
            raise FormatError(f"attach of edit {op.edit_id}: no attachment bytes")
        return Effects(attachments=(SetAttachment(op.edit_id, op.version, op.kind, bytes(attachment)),))
    return Effects()  # Feedback: its effect is the re-fitted states alone


# ------------------------------------------------------------------------------------ change
@dataclass(frozen=True)
class Change:
    """What a write does to the committed state; `EditMemory` installs it in one step.

    ``states``: the new state of every edit the write created or re-fitted, None for one it deleted.
    ``changed_vec``: edits whose encoded vectors are new (their neighbour-table rows and cached cross
    blocks are replaced; the journal records their vectors, not just their fit). ``blobs``: images
    the write stores. ``new_cross`` / ``refit_log``: the plan's cross-block cache and the ids it
    re-fitted (live writes only; a replayed change has neither).
    """

    states: Mapping[int, EditState | None]
    changed_vec: frozenset[int] = frozenset()
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    effects: Effects = field(default_factory=Effects)
    new_cross: Mapping[tuple[int, int], tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    refit_log: tuple[int, ...] = ()

    @property
    def deleted(self) -> list[int]:
        return sorted(eid for eid, st in self.states.items() if st is None)
