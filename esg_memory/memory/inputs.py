"""Parsing the arguments of `EditMemory` writes into checked values (ids, images, positives, metadata).

Pure functions of the arguments and the committed state they are checked against; a refused
argument raises a typed error before anything is planned.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import DuplicateEditError, ImageError, InvalidInputError, UnknownEditError, VersionError
from ..images import LoadedImage, load_image
from ..types import EditVersion, FeedbackProbe, Positive
from ..validate import check_text, normalize_image_arg
from .committed import Committed
from .ops import NewEdit
from .state import EditState

__all__ = [
    "MAX_ID",
    "MAX_METADATA_CHARS",
    "additions",
    "attachment_arg",
    "image_arg",
    "lookup",
    "metadata_arg",
    "new_id",
    "positives_arg",
    "revised",
    "rolled_back",
    "version_of",
]

MAX_ID = 2**63 - 2
_ADD_FIELDS = frozenset({"image", "question", "answer", "positives", "negatives", "metadata", "edit_id"})
_ATTACH_KINDS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
#: Largest edit metadata accepted, as JSON text: it is stored in memory.json and every journal record.
MAX_METADATA_CHARS = 1 << 20


def lookup(edits: dict[int, EditState], eid: Any) -> EditState:
    """The state of edit ``eid``; `UnknownEditError` / `InvalidInputError` otherwise."""
    if isinstance(eid, bool) or not isinstance(eid, (int, np.integer)):
        raise InvalidInputError(f"an edit id must be an int, not {type(eid).__name__}")
    st = edits.get(int(eid))
    if st is None:
        raise UnknownEditError(f"no edit with id {int(eid)}")
    return st


def _listed(values: Any, name: str) -> Any:
    """``values`` as given when it is a list of examples (None: none); a lone text, bytes or dict is
    refused rather than iterated."""
    if values is None:
        return ()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise InvalidInputError(f"{name} must be a list of texts or (image, text|None) pairs")
    return values


def positives_arg(positives: Any, blobs: dict[str, bytes], stored: Committed) -> list[Positive]:
    """User positives: texts, `Positive`s naming stored images, or (image, text|None) pairs.

    New images are added to ``blobs`` (the write's images)."""
    out = []
    for j, p in enumerate(_listed(positives, "positives")):
        if isinstance(p, str):
            out.append(Positive(text=check_text(p, f"positives[{j}]")))
        elif isinstance(p, Positive):
            if p.image is not None and not isinstance(p.image, str):
                raise InvalidInputError(
                    f"positives[{j}]: a Positive names a stored image by its sha256; pass a new picture "
                    "as an (image, text|None) pair"
                )
            if p.image is not None and p.image not in stored.blobs and p.image not in blobs:
                raise ImageError(f"positives[{j}] names an image sha256 not stored in this memory")
            text = None if p.text is None else check_text(p.text, f"positives[{j}].text")
            if text is None and p.image is None:
                raise InvalidInputError(f"positives[{j}] has neither image nor text")
            out.append(Positive(text=text, image=p.image))
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            img, txt = p
            txt = None if txt is None else check_text(txt, f"positives[{j}] text")
            sha = image_arg(img, blobs)
            if sha is None and txt is None:
                raise InvalidInputError(f"positives[{j}] has neither image nor text")
            out.append(Positive(text=txt, image=sha))
        else:
            raise InvalidInputError(f"positives[{j}] must be a text or an (image, text|None) pair")
    return out


def negatives_arg(
    negatives: Any, blobs: dict[str, bytes], image: str | None, question: str, now: float
) -> list[FeedbackProbe]:
    """User negatives — inputs the edit must not hold — as stored feedback probes.

    Like a positive, a negative text keeps the edit's image and a negative image keeps its question
    ("this picture, but not this question"; "this question, but not on this picture"); a pair is
    taken as given. Each is stored resolved (both sides named), so its meaning never depends on the
    version it sits in. The edit's own input cannot be one of its negatives.
    """
    out = []
    for j, n in enumerate(_listed(negatives, "negatives")):
        if isinstance(n, str):
            sha, txt = image, check_text(n, f"negatives[{j}]")
        elif isinstance(n, (tuple, list)) and len(n) == 2:
            img, txt = n
            if img is None and txt is None:
                raise InvalidInputError(f"negatives[{j}] has neither image nor text")
            txt = question if txt is None else check_text(txt, f"negatives[{j}] text")
            sha = image_arg(img, blobs)
        else:
            raise InvalidInputError(f"negatives[{j}] must be a text or an (image, text|None) pair")
        if (sha, txt) == (image, question):
            raise InvalidInputError(f"negatives[{j}] is the edit's own input")
        out.append(FeedbackProbe(kind="negative", text=txt, image=sha, created_at=now))
    return out


def image_arg(image: Any, blobs: dict[str, bytes]) -> str | None:
    """The sha256 of an image argument (None stays None); its bytes are added to ``blobs``."""
    if image is None:
        return None
    li: LoadedImage = load_image(normalize_image_arg(image))
    blobs[li.sha256] = li.data
    return li.sha256


def new_id(edit_id: Any, taken: set[int], stored: Committed, start: int | None = None) -> int:
    """``edit_id`` checked (or the next free id from ``start``, default the memory's next id): never one in
    use, taken by this write, or retired."""
    if edit_id is None:
        eid = stored.next_id if start is None else start
        while eid in stored.edits or eid in stored.retired or eid in taken:
            eid += 1
        return eid
    if isinstance(edit_id, bool) or not isinstance(edit_id, (int, np.integer)):
        raise InvalidInputError(f"edit_id must be an int, not {type(edit_id).__name__}")
    eid = int(edit_id)
    if not 0 <= eid <= MAX_ID:
        raise InvalidInputError(f"edit_id must be in [0, {MAX_ID}], got {eid}")
    if eid in stored.edits or eid in taken:
        raise DuplicateEditError(f"edit id {eid} already exists", edit_id=eid)
    if eid in stored.retired:
        raise DuplicateEditError(
            f"edit id {eid} belonged to a deleted edit; ids are never reused", edit_id=eid
        )
    return eid


def metadata_arg(metadata: Any) -> dict[str, Any]:
    """Edit metadata: a JSON object of bounded size, returned as a deep copy."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInputError("metadata must be a dict with string keys")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {e}") from None
    except RecursionError:
        raise InvalidInputError("metadata is nested too deeply") from None
    if len(text) > MAX_METADATA_CHARS:
        raise InvalidInputError(
            f"metadata is {len(text)} characters as JSON; the limit is {MAX_METADATA_CHARS}"
        )
    try:
        return json.loads(text)
    except RecursionError:  # dumps can go deeper than loads
        raise InvalidInputError("metadata is nested too deeply") from None


def additions(
    edits: Any, blobs: dict[str, bytes], stored: Committed, now: float
) -> list[tuple[NewEdit, EditVersion]]:
    """The edits of an `add_many` call checked, with ids assigned, as (op entry, first version) pairs."""
    if isinstance(edits, (str, bytes, Mapping)) or not isinstance(edits, Iterable):
        raise InvalidInputError("add_many takes a list of dicts")
    taken: set[int] = set()
    out = []
    start = stored.next_id  # as one add after another: numbering goes on after an explicit id
    for j, spec in enumerate(list(edits)):
        if not isinstance(spec, Mapping):
            raise InvalidInputError(f"edits[{j}] must be a dict")
        unknown = set(spec) - _ADD_FIELDS
        if unknown:
            raise InvalidInputError(f"edits[{j}] has unknown fields {sorted(unknown)}")
        q = check_text(spec.get("question"), "question")
        a = check_text(spec.get("answer"), "answer")
        sha = image_arg(spec.get("image"), blobs)
        pos = positives_arg(spec.get("positives"), blobs, stored)
        negs = negatives_arg(spec.get("negatives"), blobs, sha, q, now)
        meta = metadata_arg(spec.get("metadata"))
        eid = new_id(spec.get("edit_id"), taken, stored, start)
        taken.add(eid)
        start = max(start, eid + 1)
        v = EditVersion(
            version=1, question=q, answer=a, image=sha, positives=pos, created_at=now, reason="add",
            feedback=negs,
        )
        out.append((NewEdit(eid, q, a, sha, tuple(p.to_dict() for p in pos), meta,
                            negatives=tuple(n.to_dict() for n in negs)), v))
    return out


def revised(
    st: EditState,
    blobs: dict[str, bytes],
    stored: Committed,
    answer: Any,
    question: Any,
    image: Any,
    positives: Any,
) -> EditVersion:
    """The next version of ``st`` with the given fields replaced (None keeps the current value)."""
    cur = st.current
    q = cur.question if question is None else check_text(question, "question")
    a = cur.answer if answer is None else check_text(answer, "answer")
    sha = cur.image if image is None else image_arg(image, blobs)
    pos = list(cur.positives) if positives is None else positives_arg(positives, blobs, stored)
    # Feedback was about this subject; a new image or question is a new subject.
    fb = list(cur.feedback) if (q == cur.question and sha == cur.image) else []
    return EditVersion(
        version=cur.version + 1,
        question=q,
        answer=a,
        image=sha,
        positives=pos,
        created_at=time.time(),
        reason="revise",
        feedback=fb,
    )


def rolled_back(st: EditState, version: Any) -> EditVersion:
    """A new version of ``st`` equal to its old ``version`` (its scope is fitted anew)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise VersionError(f"version must be an int, not {type(version).__name__}")
    old = next((v for v in st.versions if v.version == int(version)), None)
    if old is None:
        raise VersionError(f"edit {st.id} has no version {version} (versions 1..{st.current.version})")
    return replace(
        old.copy(),
        version=st.current.version + 1,
        created_at=time.time(),
        reason=f"rollback to v{int(version)}",
        scope=[],
        uncovered=[],
        constrained_by=[],
    )


def version_of(st: EditState, version: Any) -> int:
    """``version`` of ``st`` checked (None: the current one)."""
    if version is None:
        return st.current.version
    if (
        isinstance(version, bool)
        or not isinstance(version, (int, np.integer))
        or not 1 <= int(version) <= st.current.version
    ):
        raise VersionError(f"edit {st.id} has no version {version!r}")
    return int(version)


def attachment_arg(kind: Any, data: Any) -> bytes:
    """Checked attachment: a short ``kind`` name of safe characters, and bytes."""
    if not isinstance(kind, str) or not 0 < len(kind) <= 64 or not set(kind) <= _ATTACH_KINDS:
        raise InvalidInputError("attachment kind must be 1-64 characters of [A-Za-z0-9_.-]")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"attachment data must be bytes, not {type(data).__name__}")
    return bytes(data)
