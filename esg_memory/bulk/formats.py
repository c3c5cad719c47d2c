"""Files of edits turned into checked `EditRecord`s: the JSONL import format and the benchmark formats.

Formats (`FORMATS`):

- ``jsonl``: one edit per line, ``{"image": path | null, "question", "answer", "positives": [...],
  "metadata": {...}, "id": int (optional)}``. A positive is a text (a rephrasing) or
  ``{"text": str | null, "image": path | null}`` (null text: the edit's question on that picture). Image
  paths are relative to the image root (default: the file's folder) or absolute. Blank lines are
  skipped; any other field is refused. `esg_memory.bulk.export` writes exactly this format.
- ``mmedit``, ``vlkeb``, ``zsre``, ``counterfact``: the benchmark files the evaluation harness reads,
  through its loaders (`esg_memory.eval.data`): each record's edit (image, question ``src`` / ``prompt``,
  answer ``alt`` / ``target_new``) becomes an edit, its rephrased question a text positive and its
  ``image_rephrase`` a picture positive; the metadata says where it came from (``source``, ``record``,
  ``subject``). Images resolve under the image root (default: the file's folder) — never text-side
  placeholders.

Every record is checked — texts, ids (duplicates in the file), metadata, and every image *read and
decoded* — before anything is written; a bad one raises `BulkRecordError` starting with ``line N``
(JSONL, counted from 1 as editors do) or ``record N`` (a JSON list: the index, as the loaders say).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EsgMemoryError, ImageError, InvalidInputError
from ..images import load_image
from ..memory.inputs import MAX_ID, metadata_arg
from ..validate import check_text

__all__ = [
    "FORMATS",
    "IMAGE_FORMATS",
    "BulkImageError",
    "BulkRecordError",
    "EditRecord",
    "ImageSource",
    "file_images",
    "parse_items",
    "parse_jsonl",
    "read_file",
]

#: What ``esg-memory import --format`` accepts.
FORMATS = ("jsonl", "mmedit", "vlkeb", "zsre", "counterfact")
#: The benchmark formats whose records carry pictures.
IMAGE_FORMATS = ("mmedit", "vlkeb")
_FIELDS = frozenset({"image", "question", "answer", "positives", "metadata", "id"})
_POSITIVE_FIELDS = frozenset({"text", "image"})
_LOADER_KIND = {"mmedit": "vqa", "vlkeb": "vlkeb", "zsre": "zsre", "counterfact": "counterfact"}

#: An image as a record names it (a path string) -> its encoded bytes; raises `ImageError` (or a
#: subclass) when it is missing, outside what the caller allows, or not a picture.
ImageSource = Callable[[str], bytes]


class BulkRecordError(InvalidInputError):
    """A record of a bulk import is refused; the message starts with where it is (``line 17: ...``)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class BulkImageError(BulkRecordError, ImageError):
    """A record's image is missing, undecodable or too large (both a `BulkRecordError` and an
    `~esg_memory.errors.ImageError`)."""


@dataclass(frozen=True)
class EditRecord:
    """One checked edit of an import: what `EditMemory.add_many` takes, plus where it came from."""

    where: str
    """``line N`` or ``record N``: what an error about it says."""
    question: str
    answer: str
    image: bytes | None = None
    positives: tuple[Any, ...] = ()
    """Texts and ``(image bytes | None, text | None)`` pairs."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    edit_id: int | None = None

    def spec(self) -> dict[str, Any]:
        """The `EditMemory.add_many` entry of this record."""
        return {
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "positives": list(self.positives),
            "metadata": dict(self.metadata),
            "edit_id": self.edit_id,
        }


def file_images(root: str | Path) -> ImageSource:
    """Images from files: a relative path under ``root``, an absolute one as it is (read and decoded)."""
    base = Path(root)

    def load(path: str) -> bytes:
        p = Path(path)
        return load_image(p if p.is_absolute() else base / p).data

    return load


# ----------------------------------------------------------------------------- checks
def _text(rec: Mapping[str, Any], name: str) -> str:
    v = rec.get(name)
    if not isinstance(v, str) or not v.strip():
        raise InvalidInputError(f"{name} must be a non-empty string")
    return check_text(v, name)


def _image(path: Any, what: str, images: ImageSource) -> bytes | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path.strip():
        raise InvalidInputError(f"{what} must be a path (a non-empty string) or null")
    try:
        return images(path)
    except ImageError as e:
        raise type(e)(f"{what} {path!r}: {e}") from None


def _positives(items: Any, images: ImageSource) -> tuple[Any, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise InvalidInputError("positives must be a list of texts or {text, image} objects")
    out: list[Any] = []
    for j, p in enumerate(items):
        if isinstance(p, str):
            out.append(check_text(p, f"positives[{j}]"))
            continue
        if not isinstance(p, Mapping) or set(p) - _POSITIVE_FIELDS:
            raise InvalidInputError(f"positives[{j}] must be a text or an object with fields text, image")
        text = p.get("text")
        if text is not None:
            text = check_text(text, f"positives[{j}].text")
        img = _image(p.get("image"), f"positives[{j}].image", images)
        if img is None and text is None:
            raise InvalidInputError(f"positives[{j}] has neither text nor image")
        out.append((img, text))
    return tuple(out)


def _edit_id(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_ID:
        raise InvalidInputError(f"id must be an integer in [0, {MAX_ID}] or null, got {v!r}")
    return v


def _record(where: str, rec: Any, images: ImageSource) -> EditRecord:
    """One JSONL-format object checked (`BulkRecordError` naming ``where``)."""
    try:
        if not isinstance(rec, Mapping):
            raise InvalidInputError(f"a record must be a JSON object, got {type(rec).__name__}")
        unknown = set(rec) - _FIELDS
        if unknown:
            raise InvalidInputError(f"unknown fields {sorted(unknown)} (allowed: {sorted(_FIELDS)})")
        return EditRecord(
            where=where,
            question=_text(rec, "question"),
            answer=_text(rec, "answer"),
            image=_image(rec.get("image"), "image", images),
            positives=_positives(rec.get("positives"), images),
            metadata=metadata_arg(rec.get("metadata")),
            edit_id=_edit_id(rec.get("id")),
        )
    except EsgMemoryError as e:
        raise _at(where, e) from None


def _at(where: str, e: EsgMemoryError) -> EsgMemoryError:
    """``e`` located at ``where``: a `BulkRecordError` for bad input, else ``e``'s own type (a path outside
    the allowed root stays a refusal of its kind)."""
    if isinstance(e, BulkRecordError):
        return e
    if isinstance(e, ImageError):
        return BulkImageError(where, str(e))
    if isinstance(e, InvalidInputError):
        return BulkRecordError(where, str(e))
    return type(e)(f"{where}: {e}")


def _no_duplicate_ids(records: list[EditRecord]) -> list[EditRecord]:
    seen: dict[int, str] = {}
    for r in records:
        if r.edit_id is None:
            continue
        if r.edit_id in seen:
            raise BulkRecordError(r.where, f"id {r.edit_id} is given twice (also at {seen[r.edit_id]})")
        seen[r.edit_id] = r.where
    return records


def _bar(items: Iterable[Any], total: int | None, progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="edit")


# ----------------------------------------------------------------------------- readers
def parse_jsonl(
    text: str, images: ImageSource, limit: int | None = None, progress: bool = False
) -> list[EditRecord]:
    """The edits of a JSONL text (see the module docstring); ``limit``: the first N edits."""
    lines = text.splitlines()
    out: list[EditRecord] = []
    for n, line in _bar(enumerate(lines, 1), len(lines), progress, "checking edits"):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise BulkRecordError(f"line {n}", f"not JSON ({e})") from None
        out.append(_record(f"line {n}", rec, images))
    if not out:
        raise InvalidInputError("no edits to import (the input holds no records)")
    return _no_duplicate_ids(out)


def parse_items(
    items: Any,
    fmt: str,
    images: ImageSource,
    image_root: str | Path | None = None,
    limit: int | None = None,
) -> list[EditRecord]:
    """The edits of an in-memory list of records of format ``fmt`` (the service's JSON body)."""
    _check_format(fmt)
    if not isinstance(items, list) or not items:
        raise InvalidInputError("records must be a non-empty list")
    if fmt == "jsonl":
        recs = [_record(f"record {i}", r, images) for i, r in enumerate(items[:limit] if limit else items)]
        return _no_duplicate_ids(recs)
    with tempfile.TemporaryDirectory(prefix="esg-import-") as d:
        path = Path(d) / "records.json"
        path.write_text(json.dumps(items), encoding="utf-8")
        return _benchmark(path, fmt, image_root, images, limit, False)


def read_file(
    path: str | Path,
    fmt: str,
    image_root: str | Path | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> list[EditRecord]:
    """The checked edits of a file of format ``fmt``; images under ``image_root`` (default: the file's
    folder)."""
    _check_format(fmt)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"import file {str(p)!r} does not exist")
    root = Path(image_root) if image_root is not None else p.resolve().parent
    if not root.is_dir():
        raise ImageError(f"image root {str(root)!r} is not a directory")
    images = file_images(root)
    if fmt == "jsonl":
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read {str(p)!r} as UTF-8 text ({e})") from None
        return parse_jsonl(text, images, limit, progress)
    return _benchmark(p, fmt, root, images, limit, progress)


def _check_format(fmt: Any) -> None:
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown import format {fmt!r}; one of {', '.join(FORMATS)}")


def _benchmark(
    path: Path,
    fmt: str,
    root: str | Path | None,
    images: ImageSource,
    limit: int | None,
    progress: bool,
) -> list[EditRecord]:
    """A benchmark file through the evaluation loaders, each case as an edit (module docstring)."""
    from ..eval.data import load_mmedit, load_text_records

    kind = _LOADER_KIND[fmt]
    if fmt in IMAGE_FORMATS:
        if root is None:
            raise ImageError(f"a {fmt} import needs an image root for its pictures")
        ds = load_mmedit(path, kind, image_root=root, limit=limit)
    else:
        ds = load_text_records(path, kind, limit=limit)
    out = []
    for i, case in _bar(enumerate(ds.cases), len(ds.cases), progress, "checking edits"):
        where = f"record {i}"
        try:
            question, answer = check_text(case.question, "question"), check_text(case.target, "answer")
            img = None if case.image is None else _image(str(case.image), "image", images)
            pos: list[Any] = [check_text(case.rephrase, "rephrase")] if case.rephrase else []
            pos += [(_image(str(im), "image_rephrase", images), None) for im in case.image_rephrase]
        except EsgMemoryError as e:
            raise _at(where, e) from None
        meta: dict[str, Any] = {"source": case.source, "record": i}
        if case.subject is not None:
            meta["subject"] = case.subject
        if case.pred is not None:
            meta["pred"] = case.pred
        out.append(EditRecord(where, question, answer, img, tuple(pos), meta))
    return out
