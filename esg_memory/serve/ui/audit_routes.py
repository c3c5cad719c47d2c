"""The Audit view's endpoints over an eval run (`esg_memory.serve.ui.audit.EvalAudit`); the audit-only app.

- ``GET /audit?method=&protocol=&label=``: the run, the summary per method and protocol, the per-edit rows
  of one method and protocol with their probes, and that method's deletion audit (`AuditReply`); ``run``
  null when the server has no eval run, so the page can ask without an error.
- ``GET /audit/images/{sha}``: a probe's thumbnail (PNG) by the sha256 of its bytes; any other name is a
  422 before a path is built, an unknown one a 404.

Both are reads, protected like the service's. `register_audit_routes` adds them to the service's app
(``create_app(..., eval_dir=DIR)``); `create_audit_app` builds an app holding only the page, these and a
``/health`` — ``esg-memory ui --eval DIR`` without a memory (no model is loaded). No
``from __future__ import annotations``: FastAPI reads the annotations at runtime.
"""

import os
from pathlib import Path
from typing import Annotated, Any

from ...errors import ConfigError
from ..auth import MIN_TOKEN_CHARS, check_bearer, reads_protected
from .audit import EvalAudit

__all__ = ["create_audit_app", "register_audit_routes"]

_IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600",
                  "Content-Security-Policy": "default-src 'none'"}


def register_audit_routes(app: Any, audit: EvalAudit | None, reads: list[Any], read_errors: tuple[int, ...]
                          ) -> None:
    """Add ``GET /audit`` and ``GET /audit/images/{sha}`` over ``audit`` (None: no run) to ``app``."""
    from fastapi import Query
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    from ...eval.audit import LABELS
    from ..schemas import error_responses
    from .schemas import AuditReply

    @app.get("/audit", tags=["debugger"], dependencies=reads, response_model=AuditReply,
             responses=error_responses(*read_errors, 422))
    async def audit_get(method: Annotated[str | None, Query(max_length=100)] = None,
                        protocol: Annotated[str | None, Query(max_length=100)] = None,
                        label: Annotated[str | None, Query(max_length=100)] = None) -> dict[str, Any]:
        """The eval run's ScopeEdit audit per edit (correct / under / over / fail, or unreliable) under one
        method and protocol (defaults: ours, retention), with its probes; the summary of every method and
        protocol; and the method's deletion audit (each deleted edit's residue per probe)."""
        if audit is None:
            return {"run": None, "labels": list(LABELS)}
        return await run_in_threadpool(audit.reply, method, protocol, label)

    @app.get("/audit/images/{sha}", tags=["debugger"], dependencies=reads, response_class=Response,
             responses={200: {"description": "The thumbnail (PNG)", "content": {"image/png": {}}},
                        **error_responses(*read_errors, 404, 422)})
    async def audit_image(sha: str) -> Response:
        """A probe's thumbnail by the sha256 of its bytes (64 lower-case hex digits)."""
        if audit is None:
            raise HTTPException(404, "this server has no eval run (esg-memory ui --eval DIR)")
        data = await run_in_threadpool(audit.image, sha)
        if data is None:
            raise HTTPException(404, f"no thumbnail {sha} in this run")
        return Response(data, media_type="image/png", headers=_IMAGE_HEADERS)


def create_audit_app(eval_dir: str | os.PathLike, *, token: str | None = None, host: str | None = None,
                     protect_reads: bool | None = None) -> Any:
    """An app serving only the page, ``/audit*`` over the run in ``eval_dir`` and ``/health``: no model,
    no memory, nothing to write. Reads need ``token`` when protected (as `create_app` decides it)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.security import HTTPBearer

    from ... import __version__
    from ..http_errors import install_error_handlers
    from .page import register_ui_page
    from .schemas import AuditHealth

    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
        raise ConfigError(f"the bearer token must be a string of at least {MIN_TOKEN_CHARS} characters")
    audit = EvalAudit(Path(eval_dir))  # ConfigError before anything is served
    explicit = protect_reads
    protect = reads_protected(host, protect_reads, token)
    app = FastAPI(title="esg-memory audit", version=__version__, docs_url=None, redoc_url=None,
                  summary="An eval run's ScopeEdit and deletion audits, read-only.")
    app.state.host, app.state.protect_reads, app.state.reads_opened = host, protect, explicit is False
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False)

    def reader(request: Request, _: Annotated[Any, Depends(bearer)] = None) -> None:
        if protect:
            check_bearer(request.headers.get("authorization"), token)

    @app.get("/health", tags=["service"], response_model=AuditHealth)
    async def health() -> dict[str, Any]:
        """Liveness; this server holds an eval run only (no edits, no model)."""
        return {"status": "ok", "read_only": True, "audit_only": True, "run": audit.name}

    register_ui_page(app)
    register_audit_routes(app, audit, [Depends(reader)], (401, 403) if protect else ())
    return app
