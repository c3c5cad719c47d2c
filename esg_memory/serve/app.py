"""`create_app`: the FastAPI app of ``esg-memory serve``, assembled from the service and its HTTP pieces.

It checks the options, takes the directory lock of a writable app, builds the `EditService`, and wires
the `RequestLimits` middleware, the error handlers (`esg_memory.serve.http_errors`), the routes
(`esg_memory.serve.routes`) and offline API docs. FastAPI is imported when an app is built, so the
core library never needs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import ServiceConfig
from ..errors import ConfigError
from .auth import MIN_TOKEN_CHARS, TOKEN_ENV, reads_protected
from .directory import DirectoryLock
from .http_errors import install_error_handlers
from .metrics import Metrics
from .middleware import DEFAULT_MAX_UPLOAD_BYTES, RequestLimits
from .routes import register_routes
from .service import EditService

__all__ = ["create_app"]


def create_app(
    model: Any,
    memory_dir: str | os.PathLike | None,
    *,
    token: str | None = None,
    allowed_root: str | os.PathLike | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    insecure_local: bool = False,
    read_only: bool = False,
    protect_reads: bool | None = None,
    config: ServiceConfig | None = None,
    host: str | None = None,
    eval_dir: str | os.PathLike | None = None,
) -> Any:
    """A FastAPI app serving ``model`` (an `EditedModel`) and persisting its edits to ``memory_dir``.

    ``token``: bearer token every write needs. A writable app without a token is refused unless
    ``insecure_local``. Reads (``GET /edits*``, ``/generate``, ``/route``, ``/metrics``, the OpenAI
    routes) need it too when protected: ``protect_reads`` True / False forces that; None (the default)
    decides from ``host``, the address the app will be bound to: protected beyond loopback
    (`esg_memory.serve.auth.reads_protected`; None: an in-process app, treated as loopback, which
    `running_server` then refuses to bind elsewhere). Protected reads without a token are refused
    (`ConfigError`). ``/health`` and the API docs stay open. ``allowed_root``: directory that
    ``image_path`` fields may point into (symlinks and ``..`` resolved); None disables paths.
    ``eval_dir``: an ``esg-memory eval --out`` directory whose audit ``GET /audit`` serves (the page's
    Audit view; `esg_memory.serve.ui.audit_routes`). A writable app takes an exclusive lock on
    ``memory_dir`` until it shuts down.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    cfg = config or ServiceConfig()
    if read_only:
        cfg = dataclasses.replace(cfg, read_only=True)
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
        raise ConfigError(f"the bearer token must be a string of at least {MIN_TOKEN_CHARS} characters")
    if not cfg.read_only and token is None and not insecure_local:
        raise ConfigError(
            f"refusing to serve writable without a bearer token: set ${TOKEN_ENV} or --token-file, "
            "or pass --insecure-local (binds 127.0.0.1 only) or --read-only"
        )
    explicit_reads = protect_reads
    protect_reads = reads_protected(host, protect_reads, token)  # the resolved flag every route set gets
    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1024:
        raise ConfigError("max_upload_bytes must be an int >= 1024")
    root = None if allowed_root is None else Path(allowed_root).resolve()
    if root is not None and not root.is_dir():
        raise ConfigError(f"allowed root {str(root)!r} is not a directory")
    audit = None
    if eval_dir is not None:  # read (and refused) before the directory lock is taken
        from .ui.audit import EvalAudit

        audit = EvalAudit(eval_dir)
    # a shared (postgresql://) memory has no directory: the store serialises its writers instead
    lock = None if cfg.read_only or memory_dir is None else DirectoryLock(memory_dir).acquire()
    metrics = Metrics()
    metrics.counter("http_requests_total", "HTTP requests by endpoint template, method and status.",
                    labels=("endpoint", "method", "status"))
    metrics.histogram("http_request_seconds", "HTTP request latency by endpoint template and method.",
                      labels=("endpoint", "method"))
    try:
        service = EditService(model, memory_dir, cfg, metrics)
    except BaseException:
        if lock is not None:
            lock.release()
        raise

    @asynccontextmanager
    async def lifespan(app: Any):
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)
            if lock is not None:
                lock.release()

    mount_docs = _offline_docs_mounter()
    app = FastAPI(
        title="esg-memory",
        summary="Scoped, instantly editable memory of corrections for a frozen multimodal LLM.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None if mount_docs is not None else "/docs",
    )
    if mount_docs is not None:
        mount_docs(app)
    app.state.service = service
    app.state.metrics = metrics
    app.state.host = host
    app.state.protect_reads = protect_reads
    app.state.reads_opened = explicit_reads is False  # open by choice, not by a loopback default
    app.add_middleware(RequestLimits, limit=max_upload_bytes, metrics=metrics, token=token)
    install_error_handlers(app)
    register_routes(app, service, token=token, root=root, protect_reads=protect_reads)
    from .openai_api import register_openai_routes  # /v1: OpenAI-compatible endpoints and error bodies

    register_openai_routes(app, service, token=token, root=root, protect_reads=protect_reads)
    from .ui.routes import register_ui_routes  # /ui: the edit debugger's page and endpoints

    register_ui_routes(app, service, token=token, root=root, protect_reads=protect_reads, audit=audit)
    return app


def _offline_docs_mounter() -> Any:
    """Serve Swagger UI's files from the ``swagger-ui-bundle`` wheel: FastAPI's default ``/docs`` page
    loads them from a CDN, so it is blank on the offline machines this service often runs on."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    assets = Path(swagger_ui_bundle.swagger_ui_path)
    if not (assets / "swagger-ui-bundle.js").is_file():
        return None

    def mount(app: Any) -> None:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> Any:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url,
                title=f"{app.title} - API docs",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon-32x32.png",
            )

    return mount
