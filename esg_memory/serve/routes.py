"""The native HTTP endpoints of ``esg-memory serve``: request bodies onto `EditService` calls (registered by
`esg_memory.serve.app.create_app`).

``POST /edits``, ``PATCH /edits/{id}``, ``POST /generate`` and ``POST /route`` take a multipart (or
urlencoded) form or a JSON object, chosen by ``Content-Type`` (`esg_memory.serve.bodies`): both are read
into the route's request model (`esg_memory.serve.schemas`), then one function per route makes the
service call. Replies are validated against the reply models, which `/openapi.json` documents with both
body kinds and the error body.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime,
and they name classes imported inside `register_routes` (FastAPI is imported only when an app is built).
"""

import asyncio
from pathlib import Path
from typing import Annotated, Any

from ..errors import InvalidInputError
from ..images import LoadedImage, image_from_bytes
from .auth import check_bearer, resolve_image_path
from .bodies import decode_base64, read_body
from .generation import GenerateOptions
from .service import EditService

__all__ = ["register_routes"]


def _examples(items: list[Any] | None, uploads: list[LoadedImage], root: Path | None,
              field: str = "positives") -> list[Any] | None:
    """Validated ``positives`` / ``negatives`` (texts or `PositiveIn`) as the service takes them: texts
    or (image bytes | None, text | None); ``image_index`` points into the ``positive_image`` /
    ``negative_image`` images."""
    kind = field.removesuffix("s")
    if items is None:
        if uploads:
            raise InvalidInputError(f"{kind}_image uploads need a {field} list that references them")
        return None
    out: list[Any] = []
    for j, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
            continue
        given = [k for k in ("image", "image_path", "image_index") if getattr(item, k) is not None]
        if len(given) > 1:
            raise InvalidInputError(f"{field}[{j}] gives {' and '.join(given)}: one image at most")
        data = None
        if item.image is not None:
            what = f"{field}[{j}].image"
            data = image_from_bytes(decode_base64(item.image, what), what).data
        elif item.image_path is not None:
            data = resolve_image_path(item.image_path, root).data
        elif item.image_index is not None:
            if not 0 <= item.image_index < len(uploads):
                raise InvalidInputError(f"{field}[{j}].image_index must be in 0..{len(uploads) - 1}")
            data = uploads[item.image_index].data
        out.append((data, item.text))
    return out


def register_routes(app: Any, service: EditService, *, token: str | None, root: Path | None,
                    protect_reads: bool) -> None:
    """Add every endpoint to the FastAPI ``app``; writes need ``token`` (reads too with ``protect_reads``)."""
    from fastapi import Depends, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response
    from fastapi.security import HTTPBearer
    from starlette.exceptions import HTTPException

    from .schemas import (
        EditDeleted,
        EditDetail,
        EditIn,
        EditList,
        EditRolledBack,
        EditWritten,
        GenerateIn,
        GenerateReply,
        Health,
        ReviseIn,
        RollbackIn,
        RouteIn,
        RouteReply,
        error_responses,
        request_body_docs,
    )

    bearer = HTTPBearer(auto_error=False, description="Needed for writes, and for reads when they are "
                        "protected (by default when the server binds beyond loopback).")

    def writer(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        check_bearer(request.headers.get("authorization"), token)

    def reader(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        if protect_reads:
            check_bearer(request.headers.get("authorization"), token)

    async def decoded(data: bytes, what: str) -> LoadedImage:
        return await run_in_threadpool(image_from_bytes, data, what)

    async def one_image(body: Any) -> LoadedImage | None:
        if body.image is not None and body.image_path:
            raise InvalidInputError("give the image as an upload or as image_path, not both")
        if body.image is not None:
            return await decoded(body.image, "uploaded image")
        if body.image_path:
            return await run_in_threadpool(resolve_image_path, body.image_path, root)
        return None

    async def examples(body: Any, field: str = "positives") -> list[Any] | None:
        kind = field.removesuffix("s")
        given = getattr(body, f"{kind}_image") or []
        ups = [await decoded(d, f"{kind}_image {i}") for i, d in enumerate(given)]
        return await run_in_threadpool(_examples, getattr(body, field), ups, root, field)

    async def rows(body: Any) -> list[tuple[Any, str]]:
        prompts, images, paths = body.prompt, body.image, body.image_path
        if images and paths:
            raise InvalidInputError("give images as uploads or as image_path, not both")
        if len(prompts) > service.config.max_rows_per_request:
            raise InvalidInputError(f"at most {service.config.max_rows_per_request} prompts per request")
        loaded = [await decoded(d, f"image {i}") for i, d in enumerate(images or [])]
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

    def tune(body: Any) -> dict[str, Any]:
        return {} if body.tune is None else {"tune": body.tune}  # absent: the service's default

    reads = [Depends(reader)]
    writes = [Depends(writer)]
    read_errors = (401, 403) if protect_reads else ()
    reply = {"response_model_exclude_unset": True}  # a declared field the service did not send stays out

    @app.post("/edits", status_code=201, tags=["edits"], dependencies=writes, response_model=EditWritten,
              responses=error_responses(401, 403, 409, 413, 415, 422),
              openapi_extra=request_body_docs(EditIn), **reply)
    async def add_edit(request: Request) -> dict[str, Any]:
        """Add an edit (a form with uploads, or JSON with base64 images); it is live for the next request
        and on disk before this returns."""
        body = await read_body(request, EditIn)
        img = await one_image(body)
        pos, neg = await examples(body), await examples(body, "negatives")
        return await run_in_threadpool(
            lambda: service.add_edit(None if img is None else img.data, body.question, body.answer,
                                     positives=pos, negatives=neg, metadata=body.metadata,
                                     edit_id=body.edit_id, **tune(body)))

    @app.get("/edits", tags=["edits"], dependencies=reads, response_model=EditList,
             responses=error_responses(*read_errors, 422), **reply)
    async def list_edits(offset: Annotated[int, Query(ge=0)] = 0,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Current version of each edit (paged, by id)."""
        return await run_in_threadpool(service.list_edits, offset, limit)

    @app.get("/edits/{edit_id}", tags=["edits"], dependencies=reads, response_model=EditDetail,
             responses=error_responses(*read_errors, 404, 422), **reply)
    async def get_edit(edit_id: int) -> dict[str, Any]:
        """One edit with its full version history and hit count since start."""
        return await run_in_threadpool(service.get_edit, edit_id)

    @app.delete("/edits/{edit_id}", tags=["edits"], dependencies=writes, response_model=EditDeleted,
                responses=error_responses(401, 403, 404, 422), **reply)
    async def delete_edit(edit_id: int) -> dict[str, Any]:
        """Delete an edit exactly (neighbours' scopes are restored); persisted before the reply."""
        return await run_in_threadpool(service.delete_edit, edit_id)

    @app.patch("/edits/{edit_id}", tags=["edits"], dependencies=writes, response_model=EditWritten,
               responses=error_responses(401, 403, 404, 409, 413, 415, 422),
               openapi_extra=request_body_docs(ReviseIn), **reply)
    async def revise_edit(edit_id: int, request: Request) -> dict[str, Any]:
        """Revise an edit (form or JSON): a new version supersedes the current one."""
        body = await read_body(request, ReviseIn)
        img = await one_image(body)
        pos = await examples(body)
        return await run_in_threadpool(
            lambda: service.revise_edit(edit_id, question=body.question, answer=body.answer,
                                        image=None if img is None else img.data, positives=pos, **tune(body)))

    @app.post("/edits/{edit_id}/rollback", tags=["edits"], dependencies=writes, response_model=EditRolledBack,
              responses=error_responses(401, 403, 404, 409, 422), **reply)
    async def rollback(edit_id: int, body: RollbackIn) -> dict[str, Any]:
        """Restore an earlier version (history stays append-only)."""
        return await run_in_threadpool(service.rollback, edit_id, body.version)

    @app.post("/generate", tags=["inference"], dependencies=reads, response_model=GenerateReply,
              responses=error_responses(*read_errors, 413, 415, 422, 503, 504),
              openapi_extra=request_body_docs(GenerateIn), **reply)
    async def generate(request: Request) -> dict[str, Any]:
        """Generate with edits injected per row (form or JSON); each row says which edit (if any) fired."""
        body = await read_body(request, GenerateIn)
        batch = await rows(body)
        opts = GenerateOptions(body.max_new_tokens, body.do_sample, body.temperature, body.top_p, body.seed)
        fut = service.submit_generate(batch, opts)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(fut), service.config.request_timeout_s)
        except TimeoutError:
            fut.cancel()
            raise HTTPException(504, "generation timed out") from None
        return {"results": results}

    @app.post("/route", tags=["inference"], dependencies=reads, response_model=RouteReply,
              responses=error_responses(*read_errors, 413, 415, 422),
              openapi_extra=request_body_docs(RouteIn), **reply)
    async def route(request: Request) -> dict[str, Any]:
        """Which edit (if any) covers each input (form or JSON), with score, threshold, margin and an
        explanation."""
        body = await read_body(request, RouteIn)
        batch = await rows(body)
        return {"results": await run_in_threadpool(service.route, batch)}

    @app.get("/health", tags=["service"], response_model=Health, **reply)
    async def health(response: Response) -> dict[str, Any]:
        """Liveness and a summary (edit count, queue, last persistence error); always open, no edit data.
        503 when a replica of a shared memory is staler than its bound (drain it)."""
        out = service.health()
        if out["status"] == "unhealthy":
            response.status_code = 503
        return out

    @app.get("/metrics", tags=["service"], response_class=Response, dependencies=reads,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {service.metrics.content_type: {"schema": {"type": "string"}}}},
                        **error_responses(*read_errors)})
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, edits, hits, batch sizes, persistence time."""
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    from .bulk_routes import register_bulk_routes  # POST /edits:batch (esg_memory.bulk)
    register_bulk_routes(app, service, writer, root)
