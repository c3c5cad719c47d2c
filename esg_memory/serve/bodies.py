"""Request bodies of the native routes: a multipart (or urlencoded) form or a JSON object, chosen by
``Content-Type`` and read into the route's request model (`esg_memory.serve.schemas`).

- ``multipart/form-data`` / ``application/x-www-form-urlencoded`` (and no Content-Type): image fields
  are file uploads, list fields repeat, ``positives`` / ``metadata`` are JSON text, an empty field is
  an absent one (as FastAPI's form fields).
- ``application/json`` (or ``*+json``): one object; image fields are base64 strings or ``data:`` URIs,
  a list field takes one value or a list, null is absent.
- anything else: 415.

Both land in the same pydantic model, so they are validated alike: a `RequestValidationError` (422,
``ValidationError``) for a missing or mistyped field, `InvalidInputError` (422) for malformed JSON or
base64, `esg_memory.errors.ImageError` (422) later for bytes that are no image. The body-size limit
(`esg_memory.serve.middleware.RequestLimits`, 413) applies while either kind streams in.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..errors import InvalidInputError

__all__ = ["FORM_TYPES", "JSON_TYPE", "decode_base64", "read_body"]

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_TYPE = "application/json"

_URLSAFE = str.maketrans("-_", "+/")
_MAX_TEXT_PART = 1 << 30


def decode_base64(value: Any, what: str) -> bytes:
    """The bytes of a base64 string (standard or URL-safe alphabet, whitespace ignored) or of a
    ``data:<type>;base64,<data>`` URI; `InvalidInputError` otherwise."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a base64 string or a data: URI, not {type(value).__name__}")
    text = value.strip()
    if text[:5].lower() == "data:":
        head, sep, text = text.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise InvalidInputError(f"{what}: a data: URI must be base64 (data:<type>;base64,<data>)")
    text = "".join(text.split()).translate(_URLSAFE)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what} is not valid base64 ({e})") from None


def _json_text(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"{what} must be JSON ({e})") from None


def _json_fields(raw: bytes, model: Any) -> dict[str, Any]:
    """A JSON body's fields, images decoded to bytes (runs in a worker thread: bodies can be MBs)."""
    if not raw.strip():
        raise InvalidInputError("the JSON request body is empty")
    body = _json_text(raw, "the request body")
    if not isinstance(body, dict):
        raise InvalidInputError("the JSON request body must be an object")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if value is None:
            continue
        if key in model.LIST_FIELDS and not isinstance(value, list):
            value = [value]
        if key in model.IMAGE_FIELDS:
            if isinstance(value, list) and key in model.LIST_FIELDS:
                value = [decode_base64(v, f"{key}[{i}]") for i, v in enumerate(value)]
            else:
                value = decode_base64(value, key)
        out[key] = value
    return out


async def _form_fields(request: Any, model: Any) -> dict[str, Any]:
    from starlette.datastructures import UploadFile

    out: dict[str, Any] = {}
    # a text part (``positives`` with inline base64 images) may be large: the body limit bounds it, not
    # Starlette's 1 MiB default per part
    async with request.form(max_part_size=_MAX_TEXT_PART) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if not data and not value.filename:
                    continue  # a file field left empty (a browser form without a file chosen)
                if key not in model.IMAGE_FIELDS:
                    raise InvalidInputError(f"{key} must be a text field, not a file upload")
                value = data
            elif value == "":
                continue  # an empty form field is an absent one
            elif key in model.IMAGE_FIELDS:
                raise InvalidInputError(f"{key} must be a file upload (or use image_path, or a JSON body)")
            elif key in model.JSON_TEXT_FIELDS:
                value = _json_text(value, key)
            if key in model.LIST_FIELDS:
                out.setdefault(key, []).append(value)
            else:
                out[key] = value  # a single field given twice: the last one counts
    return out


def _validate(model: Any, fields: dict[str, Any]) -> Any:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        return model.model_validate(fields)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in errs]) from None


async def read_body(request: Any, model: Any) -> Any:
    """``model`` (a `esg_memory.serve.schemas` request model) from the request's form or JSON body."""
    from fastapi.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == JSON_TYPE or (media.startswith("application/") and media.endswith("+json")):
        raw = await request.body()
        fields = await run_in_threadpool(_json_fields, raw, model)
    elif media in FORM_TYPES or not media:
        fields = await _form_fields(request, model)
    else:
        raise HTTPException(415, f"unsupported Content-Type {media!r}: send multipart/form-data, "
                                 "application/x-www-form-urlencoded or application/json")
    return _validate(model, fields)
