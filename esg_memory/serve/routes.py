"""The HTTP endpoints of ``esg-memory serve``: request parsing onto `EditService` calls (registered by
`esg_memory.serve.app.create_app`).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime,
and they name classes imported inside `register_routes` (FastAPI is imported only when an app is built).
"""

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

from ..config import TuneMode
from ..errors import InvalidInputError
from ..images import LoadedImage, image_from_bytes
from .auth import check_bearer, resolve_image_path
from .generation import GenerateOptions
from .service import EditService

__all__ = ["register_routes"]

_POSITIVE_FIELDS = frozenset({"text", "image_path", "image_index"})


def _parse_json(raw: str | None, what: str, kind: type) -> Any:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise InvalidInputError(f"{what} must be JSON ({e})") from None
    if not isinstance(value, kind):
        raise InvalidInputError(f"{what} must be a JSON {'list' if kind is list else 'object'}")
    return value


def _positives(raw: str | None, uploads: list[LoadedImage], root: Path | None) -> list[Any] | None:
    """``positives`` JSON: a list of texts or ``{"text", "image_path" | "image_index"}`` objects;
    ``image_index`` points into the ``positive_image`` uploads."""
    items = _parse_json(raw, "positives", list)
    if items is None:
        if uploads:
            raise InvalidInputError("positive_image uploads need a positives list that references them")
        return None
    out: list[Any] = []
    for j, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
            continue
        if not isinstance(item, dict) or set(item) - _POSITIVE_FIELDS:
            fields = sorted(_POSITIVE_FIELDS)
            raise InvalidInputError(f"positives[{j}] must be a text or an object with fields {fields}")
        text, path, idx = item.get("text"), item.get("image_path"), item.get("image_index")
        if path is not None and idx is not None:
            raise InvalidInputError(f"positives[{j}] gives both image_path and image_index")
        data = None
        if path is not None:
            if not isinstance(path, str):
                raise InvalidInputError(f"positives[{j}].image_path must be a string")
            data = resolve_image_path(path, root).data
        elif idx is not None:
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(uploads):
                raise InvalidInputError(f"positives[{j}].image_index must be in 0..{len(uploads) - 1}")
            data = uploads[idx].data
        if text is not None and not isinstance(text, str):
            raise InvalidInputError(f"positives[{j}].text must be a string or null")
        out.append((data, text))
    return out


def register_routes(app: Any, service: EditService, *, token: str | None, root: Path | None,
                    protect_reads: bool) -> None:
    """Add every endpoint to the FastAPI ``app``; writes need ``token`` (reads too with ``protect_reads``)."""
    from fastapi import Depends, File, Form, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import PlainTextResponse
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException

    bearer = HTTPBearer(auto_error=False, description="Needed for writes (and reads with --protect-reads).")

    def writer(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        check_bearer(request.headers.get("authorization"), token)

    def reader(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        if protect_reads:
            check_bearer(request.headers.get("authorization"), token)

    async def upload(f: UploadFile, what: str) -> LoadedImage:
        data = await f.read()
        return await run_in_threadpool(image_from_bytes, data, what)

    async def one_image(image: UploadFile | None, image_path: str | None) -> LoadedImage | None:
        if image is not None and image_path:
            raise InvalidInputError("give the image as an upload or as image_path, not both")
        if image is not None:
            return await upload(image, "uploaded image")
        if image_path:
            return await run_in_threadpool(resolve_image_path, image_path, root)
        return None

    async def rows(prompts: list[str], images: list[UploadFile] | None,
                   paths: list[str] | None) -> list[tuple[Any, str]]:
        if images and paths:
            raise InvalidInputError("give images as uploads or as image_path, not both")
        if len(prompts) > service.config.max_rows_per_request:
            raise InvalidInputError(f"at most {service.config.max_rows_per_request} prompts per request")
        loaded = [await upload(f, f"image {i}") for i, f in enumerate(images or [])]
        for p in paths or []:
            loaded.append(await run_in_threadpool(resolve_image_path, p, root))
        if not loaded:
            return [(None, p) for p in prompts]
        if len(loaded) == 1:
            return [(loaded[0].image, p) for p in prompts]
        if len(loaded) != len(prompts):
            n, m = len(loaded), len(prompts)
            raise InvalidInputError(f"{n} images for {m} prompts: give one image, or one per prompt")
        return [(li.image, p) for li, p in zip(loaded, prompts, strict=True)]

    class RollbackBody(BaseModel):
        version: int = Field(..., ge=1, description="The version to restore (becomes a new version).")

    @app.post("/edits", status_code=201, tags=["edits"], dependencies=[Depends(writer)])
    async def add_edit(
        question: Annotated[str, Form(description="The question (prompt) the edit answers.")],
        answer: Annotated[str, Form(description="The new answer.")],
        image: Annotated[UploadFile | None, File(description="The edit's image.")] = None,
        image_path: Annotated[str | None, Form(description="Image path inside the allowed root.")] = None,
        positives: Annotated[str | None, Form(description='JSON list: texts or {"text","image_path"|'
                                                          '"image_index"} objects.')] = None,
        positive_image: Annotated[list[UploadFile] | None, File(description="Images for positives")] = None,
        metadata: Annotated[str | None, Form(description="JSON object stored with the edit.")] = None,
        tune: Annotated[TuneMode, Form(description="Tune the adapter: never, sync (before the reply) or "
                                               "background.")] = "never",
        edit_id: Annotated[int | None, Form(description="Explicit id (never reused).")] = None,
    ) -> dict[str, Any]:
        """Add an edit; it is live for the next request and on disk before this returns."""
        img = await one_image(image, image_path)
        pos_up = [await upload(f, f"positive_image {i}") for i, f in enumerate(positive_image or [])]
        pos = await run_in_threadpool(_positives, positives, pos_up, root)
        meta = _parse_json(metadata, "metadata", dict)
        return await run_in_threadpool(service.add_edit, None if img is None else img.data, question, answer,
                                       pos, meta, tune, edit_id)

    @app.get("/edits", tags=["edits"], dependencies=[Depends(reader)])
    async def list_edits(offset: Annotated[int, Query(ge=0)] = 0,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Current version of each edit (paged, by id)."""
        return await run_in_threadpool(service.list_edits, offset, limit)

    @app.get("/edits/{edit_id}", tags=["edits"], dependencies=[Depends(reader)])
    async def get_edit(edit_id: int) -> dict[str, Any]:
        """One edit with its full version history and hit count since start."""
        return await run_in_threadpool(service.get_edit, edit_id)

    @app.delete("/edits/{edit_id}", tags=["edits"], dependencies=[Depends(writer)])
    async def delete_edit(edit_id: int) -> dict[str, Any]:
        """Delete an edit exactly (neighbours' scopes are restored); persisted before the reply."""
        return await run_in_threadpool(service.delete_edit, edit_id)

    @app.patch("/edits/{edit_id}", tags=["edits"], dependencies=[Depends(writer)])
    async def revise_edit(
        edit_id: int,
        question: Annotated[str | None, Form()] = None,
        answer: Annotated[str | None, Form()] = None,
        image: Annotated[UploadFile | None, File()] = None,
        image_path: Annotated[str | None, Form()] = None,
        positives: Annotated[str | None, Form(description="JSON list; replaces the positives")] = None,
        positive_image: Annotated[list[UploadFile] | None, File()] = None,
        tune: Annotated[TuneMode, Form()] = "never",
    ) -> dict[str, Any]:
        """Revise an edit: a new version supersedes the current one."""
        img = await one_image(image, image_path)
        pos_up = [await upload(f, f"positive_image {i}") for i, f in enumerate(positive_image or [])]
        pos = await run_in_threadpool(_positives, positives, pos_up, root)
        return await run_in_threadpool(
            lambda: service.revise_edit(edit_id, tune=tune, question=question, answer=answer,
                                        image=None if img is None else img.data, positives=pos))

    @app.post("/edits/{edit_id}/rollback", tags=["edits"], dependencies=[Depends(writer)])
    async def rollback(edit_id: int, body: RollbackBody) -> dict[str, Any]:
        """Restore an earlier version (history stays append-only)."""
        return await run_in_threadpool(service.rollback, edit_id, body.version)

    @app.post("/generate", tags=["inference"], dependencies=[Depends(reader)])
    async def generate(
        prompt: Annotated[list[str], Form(description="One or more prompts (repeat the field).")],
        image: Annotated[list[UploadFile] | None, File(description="One image, or one per prompt.")] = None,
        image_path: Annotated[list[str] | None, Form(description="Paths inside the allowed root.")] = None,
        max_new_tokens: Annotated[int, Form(ge=1)] = 16,
        do_sample: Annotated[bool, Form()] = False,
        temperature: Annotated[float, Form(gt=0)] = 1.0,
        top_p: Annotated[float, Form(gt=0, le=1)] = 1.0,
        seed: Annotated[int | None, Form(ge=0)] = None,
    ) -> dict[str, Any]:
        """Generate with edits injected per row; each row says which edit (if any) fired."""
        batch = await rows(prompt, image, image_path)
        opts = GenerateOptions(max_new_tokens, do_sample, temperature, top_p, seed)
        fut = service.submit_generate(batch, opts)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(fut), service.config.request_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise HTTPException(504, "generation timed out") from None
        return {"results": results}

    @app.post("/route", tags=["inference"], dependencies=[Depends(reader)])
    async def route(
        prompt: Annotated[list[str], Form()],
        image: Annotated[list[UploadFile] | None, File()] = None,
        image_path: Annotated[list[str] | None, Form()] = None,
    ) -> dict[str, Any]:
        """Which edit (if any) covers each input, with score, threshold, margin and an explanation."""
        batch = await rows(prompt, image, image_path)
        return {"results": await run_in_threadpool(service.route, batch)}

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and a summary (edit count, queue, last persistence error)."""
        return service.health()

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse, dependencies=[Depends(reader)])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format: requests, latency, edits, hits, batch sizes, persistence time."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
