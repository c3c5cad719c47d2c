"""The edit debugger: the page at ``/ui`` and the endpoints it needs beyond the native API.

The page (``esg_memory/serve/ui/static/``: plain HTML, CSS and JavaScript, no CDN) is served with a strict
Content-Security-Policy (`UI_CSP`: same-origin scripts and styles only, no inline script;
`esg_memory.serve.ui.page`, whose names are re-exported here) and uses only the public HTTP API. Its extra
endpoints are ordinary API routes, protected like the native ones:

- ``GET /edits/{id}/image``: the stored image bytes with their content type (a read).
- ``GET /edits/{id}/neighbours?k=``: the edits nearest its anchor key, and the memory's neighbour relations.
- ``POST /route:explain?k=``: ``POST /route``'s rows plus the top-k candidates with a "why not" for each.
- ``POST /generate:bare``: the bare base model's answers (`EditedModel.disable_edits`), for a side-by-side.
- ``GET /scope-map``, ``POST /scope-map`` (with probed inputs): a 2-D projection of every key
  (`esg_memory.serve.ui.data.scope_map`).
- ``POST /feedback`` (a write: the bearer token): `EditMemory.feedback`, journaled.
- ``GET /audit``, ``GET /audit/images/{sha}``: an eval run's audit (`esg_memory.serve.ui.audit_routes`).

Writes take the token from the ``Authorization`` header only (never a cookie), so a cross-site page cannot
make one (no CSRF). No ``from __future__ import annotations``: FastAPI reads the annotations at runtime.
"""

import threading
from pathlib import Path
from typing import Annotated, Any

from ...errors import InvalidInputError
from ...images import image_from_bytes
from ..auth import check_bearer, resolve_image_path
from ..bodies import read_body
from ..generation import GenerateOptions
from ..service import EditService
from .data import candidates, image_media_type, key_table, neighbours, scope_map
from .page import UI_CSP, UI_FILES, register_ui_page, ui_file

__all__ = ["UI_CSP", "UI_FILES", "register_ui_page", "register_ui_routes", "ui_file"]

def _rows(body: Any, root: Path | None, limit: int) -> list[tuple[Any, str]]:
    """(PIL image | None, prompt) rows of a `RouteIn` body: one image for every prompt, or one per prompt."""
    prompts, images, paths = body.prompt, body.image or [], body.image_path or []
    if images and paths:
        raise InvalidInputError("give images as uploads or as image_path, not both")
    if len(prompts) > limit:
        raise InvalidInputError(f"at most {limit} prompts per request")
    loaded = [image_from_bytes(d, f"image {i}").image for i, d in enumerate(images)]
    loaded += [resolve_image_path(p, root).image for p in paths]
    if not loaded:
        return [(None, p) for p in prompts]
    if len(loaded) == 1:
        return [(loaded[0], p) for p in prompts]
    if len(loaded) != len(prompts):
        n, m = len(loaded), len(prompts)
        raise InvalidInputError(f"{n} images for {m} prompts: give one image, or one per prompt")
    return list(zip(loaded, prompts, strict=True))


def register_ui_routes(app: Any, service: EditService, *, token: str | None, root: Path | None,
                       protect_reads: bool, audit: Any = None) -> None:
    """Add the page and its endpoints to ``app`` (reads need ``token`` when ``protect_reads``), and the
    Audit view's over ``audit`` (an `EvalAudit`; None: ``GET /audit`` says there is no run)."""
    from fastapi import Depends, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response
    from fastapi.security import HTTPBearer
    from starlette.exceptions import HTTPException

    from ..schemas import RouteIn, error_responses, request_body_docs
    from .schemas import BareReply, ExplainReply, FeedbackIn, FeedbackReply, NeighboursReply, ScopeMapReply

    bearer = HTTPBearer(auto_error=False)

    def writer(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        check_bearer(request.headers.get("authorization"), token)

    def reader(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        if protect_reads:
            check_bearer(request.headers.get("authorization"), token)

    reads, writes = [Depends(reader)], [Depends(writer)]
    read_errors = (401, 403) if protect_reads else ()
    bare_lock = threading.Lock()  # one bare generation at a time: the batcher keeps the model busy already

    memory = service.model.memory  # the service never swaps its model's memory
    register_ui_page(app)
    from .audit_routes import register_audit_routes  # GET /audit, /audit/images/{sha}

    register_audit_routes(app, audit, reads, read_errors)

    @app.get("/edits/{edit_id}/image", tags=["debugger"], dependencies=reads, response_class=Response,
             responses={200: {"description": "The stored image bytes", "content": {"image/*": {}}},
                        **error_responses(*read_errors, 404, 422)})
    async def edit_image(edit_id: int) -> Response:
        """The edit's stored image (current version), as given when it was written."""
        edit = await run_in_threadpool(memory.get, edit_id)
        if edit.image is None:
            raise HTTPException(404, f"edit {edit_id} has no image")
        data = await run_in_threadpool(memory.image_bytes, edit.image)
        return Response(data, media_type=image_media_type(data),
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "private, max-age=3600",
                                 "Content-Security-Policy": "default-src 'none'"})

    @app.get("/edits/{edit_id}/neighbours", tags=["debugger"], dependencies=reads,
             response_model=NeighboursReply,
             responses=error_responses(*read_errors, 404, 422))
    async def edit_neighbours(edit_id: int, k: Annotated[int, Query(ge=1, le=100)] = 5) -> dict[str, Any]:
        """The ``k`` edits nearest this edit's anchor key (each on its best-margin key), plus the edits that
        constrain its scope and those it constrains."""
        return await run_in_threadpool(lambda: neighbours(memory, key_table(memory), edit_id, k))

    @app.post("/route:explain", tags=["debugger"], dependencies=reads, response_model=ExplainReply,
              responses=error_responses(*read_errors, 413, 415, 422),
              openapi_extra=request_body_docs(RouteIn))
    async def route_explain(request: Request, k: Annotated[int, Query(ge=1, le=50)] = 5) -> dict[str, Any]:
        """``POST /route`` (same body), each row with its top-``k`` candidates and why each lost."""
        body = await read_body(request, RouteIn)

        def run() -> list[dict[str, Any]]:
            rows = _rows(body, root, service.config.max_rows_per_request)
            routed = service.route(rows)  # checks the rows
            ims = None if rows[0][0] is None else [im for im, _ in rows]
            q = memory.query_keys(ims, [t for _, t in rows]).array
            table = key_table(memory)
            return [{**r, "candidates": candidates(table, q[i], k)} for i, r in enumerate(routed)]

        return {"results": await run_in_threadpool(run)}

    @app.post("/generate:bare", tags=["debugger"], dependencies=reads, response_model=BareReply,
              responses=error_responses(*read_errors, 413, 415, 422),
              openapi_extra=request_body_docs(RouteIn))
    async def generate_bare(request: Request,
                            max_new_tokens: Annotated[int, Query(ge=1)] = 16) -> dict[str, Any]:
        """The bare base model's greedy answers (every edit disabled) to ``POST /route``-style rows."""
        body = await read_body(request, RouteIn)
        GenerateOptions(max_new_tokens).check(service.config.max_new_tokens_limit)

        def run() -> list[dict[str, Any]]:
            rows = _rows(body, root, service.config.max_rows_per_request)
            service.route(rows)  # the same row checks as /route and /generate
            ims = None if rows[0][0] is None else [im for im, _ in rows]
            with bare_lock, service.model.disable_edits() as bare:
                texts = bare.answer(ims, [t for _, t in rows], max_new_tokens=max_new_tokens)
            return [{"text": t} for t in texts]

        return {"results": await run_in_threadpool(run)}

    def mapped(body: Any) -> dict[str, Any]:
        table = key_table(memory)
        if body is None:
            return scope_map(table)
        rows = _rows(body, root, service.config.max_rows_per_request)
        routed = service.route(rows)
        ims = None if rows[0][0] is None else [im for im, _ in rows]
        out = scope_map(table, memory.query_keys(ims, [t for _, t in rows]).array)
        for p, (_, text), r in zip(out["probes"], rows, routed, strict=True):
            p.update(prompt=text, edit_id=r["edit_id"])
        return out

    @app.get("/scope-map", tags=["debugger"], dependencies=reads, response_model=ScopeMapReply,
             responses=error_responses(*read_errors))
    async def scope_map_get() -> dict[str, Any]:
        """Every key of every edit in a deterministic 2-D projection (PCA), with its radius."""
        return await run_in_threadpool(mapped, None)

    @app.post("/scope-map", tags=["debugger"], dependencies=reads, response_model=ScopeMapReply,
              responses=error_responses(*read_errors, 413, 415, 422),
              openapi_extra=request_body_docs(RouteIn))
    async def scope_map_post(request: Request) -> dict[str, Any]:
        """``GET /scope-map`` with probed inputs (a ``POST /route`` body) projected into the same plane."""
        body = await read_body(request, RouteIn)
        return await run_in_threadpool(mapped, body)

    @app.post("/feedback", tags=["debugger"], dependencies=writes, response_model=FeedbackReply,
              responses=error_responses(401, 403, 404, 413, 415, 422),
              openapi_extra=request_body_docs(FeedbackIn))
    async def feedback(request: Request) -> dict[str, Any]:
        """Report where an input should route (``expected_edit_id``; null: nowhere): the edits wrongly holding
        it get it as a negative, the expected one as a positive; journaled before the reply."""
        body = await read_body(request, FeedbackIn)
        if body.image is None and not body.prompt:
            raise InvalidInputError("feedback needs a prompt, an image, or both")

        def run() -> dict[str, Any]:
            img = None if body.image is None else image_from_bytes(body.image, "image").data
            return service.feedback(img, body.prompt or None, body.expected_edit_id)

        return await run_in_threadpool(run)
