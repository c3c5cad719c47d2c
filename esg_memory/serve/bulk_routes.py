"""``POST /edits:batch``: many edits in one request, all or none, one journal record (`esg_memory.bulk`).

The body is JSON, ``{"format": "jsonl" | "mmedit" | "vlkeb" | "zsre" | "counterfact", "records": [...]}``
(``format`` defaults to ``jsonl``: each record an object of the JSONL import format), or a multipart form
with the records as a ``file`` upload (JSONL text, or a benchmark JSON list), its ``format`` and any
number of ``image`` uploads. A record's image (and a positive's) is a ``data:`` URI (base64), the file
name of an ``image`` upload, or a path inside ``--allowed-root`` (403 outside it, or with no root);
the benchmark formats' pictures are paths under ``--allowed-root``.

Every record is checked, its images decoded, before anything is written; a bad one is a 422 whose
detail starts with its place (``record 3: answer must be a non-empty string``; ``line 17: ...`` in an
uploaded JSONL file). Writes need the bearer token, like every write.

No ``from __future__ import annotations`` here (FastAPI reads the endpoint's annotations at runtime).
"""

import json
from pathlib import Path
from typing import Any

from ..bulk.formats import FORMATS, IMAGE_FORMATS, ImageSource, parse_items, parse_jsonl
from ..errors import InvalidInputError
from ..images import image_from_bytes
from .auth import PathForbiddenError, resolve_image_path
from .bodies import decode_base64
from .service import EditService

__all__ = ["register_bulk_routes"]

_JSON_FIELDS = frozenset({"format", "records"})


def _images(uploads: dict[str, bytes], root: Path | None) -> ImageSource:
    def load(path: str) -> bytes:
        if path[:5].lower() == "data:":
            return image_from_bytes(decode_base64(path, "image"), "image").data
        if path in uploads:
            return image_from_bytes(uploads[path], f"uploaded image {path!r}").data
        return resolve_image_path(path, root).data

    return load


def _records(fmt: Any, items: Any, text: str | None, uploads: dict[str, bytes], root: Path | None) -> list:
    """Checked `EditRecord`s of a request (runs in a worker thread: decoding images takes time)."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt in IMAGE_FORMATS and root is None:
        raise PathForbiddenError(f"{fmt} records name image files: start the server with --allowed-root DIR")
    images = _images(uploads, root)
    if text is not None:
        if fmt == "jsonl":
            return parse_jsonl(text, images)
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidInputError(f"the {fmt} file is not JSON ({e})") from None
    return parse_items(items, fmt, images, image_root=root)


def _json_body(raw: bytes) -> tuple[Any, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"the request body must be JSON ({e})") from None
    if not isinstance(body, dict) or "records" not in body or set(body) - _JSON_FIELDS:
        raise InvalidInputError('the JSON body must be an object {"format": ..., "records": [...]}')
    return body.get("format", "jsonl"), body["records"]


def register_bulk_routes(app: Any, service: EditService, writer: Any, root: Path | None) -> None:
    """Add ``POST /edits:batch`` to the FastAPI ``app``; ``writer`` is the routes' write-auth dependency
    (`esg_memory.serve.routes.register_routes`' ``writer``), ``root`` the allowed image root or None."""
    from fastapi import Depends, Request
    from fastapi.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    from .schemas import error_responses

    docs = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["records"], "properties": {
            "format": {"type": "string", "enum": list(FORMATS), "default": "jsonl"},
            "records": {"type": "array", "items": {"type": "object"},
                        "description": "JSONL-format objects {image, question, answer, positives, "
                                       "metadata, id}, or records of the benchmark format"}}}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSONL, or a benchmark JSON list"},
            "format": {"type": "string", "enum": list(FORMATS), "default": "jsonl"},
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "pictures the records name by file name"}}}},
    }}}

    @app.post("/edits:batch", status_code=201, tags=["edits"], dependencies=[Depends(writer)],
              responses=error_responses(401, 403, 409, 413, 415, 422), openapi_extra=docs)
    async def add_batch(request: Request) -> dict[str, Any]:
        """Add many edits at once, all or none, each with its compiled adapter: one journal record,
        fsynced before the reply (``ids`` in record order)."""
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        uploads: dict[str, bytes] = {}
        text = items = None
        if media == "application/json":
            fmt, items = await run_in_threadpool(_json_body, await request.body())
        elif media == "multipart/form-data":
            fmt = "jsonl"
            async with request.form() as form:
                for key, value in form.multi_items():
                    if key == "format" and isinstance(value, str):
                        fmt = value
                    elif key == "file" and isinstance(value, UploadFile):
                        raw = await value.read()
                        try:
                            text = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            raise InvalidInputError("the records file must be UTF-8 text") from None
                    elif key == "image" and isinstance(value, UploadFile):
                        uploads[value.filename or f"image {len(uploads)}"] = await value.read()
                    else:
                        raise InvalidInputError(f"unexpected form field {key!r} (file, format, image)")
            if text is None:
                raise InvalidInputError("a multipart batch needs the records as a 'file' upload")
        else:
            raise HTTPException(415, f"unsupported Content-Type {media!r}: send application/json or "
                                     "multipart/form-data")
        records = await run_in_threadpool(_records, fmt, items, text, uploads, root)
        return await run_in_threadpool(service.add_batch, records)
