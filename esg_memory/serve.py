"""``esg-memory serve``: an HTTP service (FastAPI + uvicorn, the ``serve`` extra) over an `EditedModel`.

Writes (``POST/PATCH/DELETE /edits...``) need ``Authorization: Bearer <token>`` and are persisted
before the reply; ``POST /generate`` requests are micro-batched; ``GET /metrics`` is Prometheus
text. The transport-free logic lives in `esg_memory.serve_core`, the endpoints in
`esg_memory.serve_routes`, the command-line glue in `esg_memory.serve_cli` (re-exported here);
this module builds the app. FastAPI is imported lazily so the core library never needs it.

    ESG_MEMORY_TOKEN=$(openssl rand -hex 24) esg-memory serve --memory ./mem --port 8000
    curl -H "Authorization: Bearer $ESG_MEMORY_TOKEN" -F image=@cat.png -F question="what is it?" \\
         -F answer="a lynx" http://127.0.0.1:8000/edits
    curl -F image=@cat.png -F prompt="what is it?" http://127.0.0.1:8000/generate
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .errors import (
    ConfigError,
    DuplicateEditError,
    EncoderMismatchError,
    EsgMemoryError,
    FormatError,
    ImageError,
    InvalidInputError,
    LockError,
    UnknownEditError,
    VersionError,
)
from .serve_batch import DirectoryLock, OverloadedError
from .serve_cli import add_serve_arguments, load_token, main, run_from_args, running_server, serve
from .serve_core import (
    DEFAULT_MAX_UPLOAD_BYTES,
    MIN_TOKEN_CHARS,
    TOKEN_ENV,
    EditService,
    ReadOnlyError,
    ServiceConfig,
)
from .serve_metrics import Metrics

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "add_serve_arguments",
    "create_app",
    "error_status",
    "load_token",
    "main",
    "run_from_args",
    "running_server",
    "serve",
]

logger = logging.getLogger(__name__)


# Most specific first: ImageError is an InvalidInputError.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ReadOnlyError, 403),
    (UnknownEditError, 404),
    (DuplicateEditError, 409),
    (VersionError, 409),
    (LockError, 409),
    (ImageError, 422),
    (InvalidInputError, 422),
    (ConfigError, 400),
    (EncoderMismatchError, 500),
    (FormatError, 500),
)


def error_status(exc: BaseException) -> int:
    """HTTP status for an esg-memory error (500 for anything unexpected)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class _PathForbidden(EsgMemoryError):
    """An image path outside the allowed root, or paths disabled (403, not a validation error)."""


def _error_body(kind: str, detail: Any, status: int) -> dict[str, Any]:
    return {"error": kind, "detail": detail, "status": status}


# ---------------------------------------------------------------------------------------- ASGI helpers


class _Early:
    path = "refused_before_routing"


_EARLY = _Early()


class _Limits:
    """Pure-ASGI middleware: body-size limit (413), early auth of writes, request metrics.

    Writes (every non-GET under ``/edits``) are checked for the bearer token *before* their body is
    read, so an anonymous client cannot make the server buffer uploads; the route dependencies
    check again (defence in depth).
    """

    def __init__(self, app: Any, limit: int, metrics: Metrics, token: str | None) -> None:
        self.app, self.limit, self.metrics, self.token = app, limit, metrics, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.token is not None and scope.get("method") not in ("GET", "HEAD", "OPTIONS") \
                    and str(scope.get("path", "")).startswith("/edits"):
                from starlette.exceptions import HTTPException

                try:
                    check_bearer(headers.get(b"authorization", b"").decode("latin-1") or None, self.token)
                except HTTPException as e:
                    scope["route"] = _EARLY
                    await self._reply(send_wrapper, e.status_code, "Unauthorized" if e.status_code == 401
                                      else "Forbidden", str(e.detail), e.headers or {})
                    return
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                detail = f"request body is over the {self.limit}-byte limit"
                await self._reply(send_wrapper, 413, "PayloadTooLarge", detail, {"connection": "close"})
                return
            seen = 0

            async def limited_receive() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        from starlette.exceptions import HTTPException

                        raise HTTPException(413, f"request body is over the {self.limit}-byte limit")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "?")
            self.metrics.inc("http_requests_total", endpoint=endpoint, method=method,
                             status=str(status["code"]))
            self.metrics.observe("http_request_seconds", time.perf_counter() - t0, endpoint=endpoint,
                                 method=method)

    @staticmethod
    async def _reply(send: Any, status: int, kind: str, detail: str, extra: dict[str, str]) -> None:
        body = json.dumps(_error_body(kind, detail, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- the app


def create_app(
    model: Any,
    memory_dir: str | os.PathLike | None,
    *,
    token: str | None = None,
    allowed_root: str | os.PathLike | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    insecure_local: bool = False,
    read_only: bool = False,
    protect_reads: bool = False,
    config: ServiceConfig | None = None,
) -> Any:
    """A FastAPI app serving ``model`` (an `EditedModel`) and persisting its edits to ``memory_dir``.

    ``token``: bearer token every write needs (and every read with ``protect_reads``). A writable
    app without a token is refused unless ``insecure_local``. ``allowed_root``: directory that
    ``image_path`` fields may point into (symlinks and ``..`` resolved); None disables paths.
    A writable app takes an exclusive lock on ``memory_dir`` until it shuts down.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    cfg = config or ServiceConfig()
    if read_only:
        cfg.read_only = True
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
        raise ConfigError(f"the bearer token must be a string of at least {MIN_TOKEN_CHARS} characters")
    if not cfg.read_only and token is None and not insecure_local:
        raise ConfigError(
            f"refusing to serve writable without a bearer token: set ${TOKEN_ENV} or --token-file, "
            "or pass --insecure-local (binds 127.0.0.1 only) or --read-only"
        )
    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1024:
        raise ConfigError("max_upload_bytes must be an int >= 1024")
    root = None if allowed_root is None else Path(allowed_root).resolve()
    if root is not None and not root.is_dir():
        raise ConfigError(f"allowed root {str(root)!r} is not a directory")
    lock = None if cfg.read_only else DirectoryLock(memory_dir).acquire()
    metrics = Metrics()
    metrics.counter("http_requests_total", "HTTP requests by endpoint template, method and status.")
    metrics.histogram("http_request_seconds", "HTTP request latency by endpoint template and method.")
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
        version=_version(),
        lifespan=lifespan,
        docs_url=None if mount_docs is not None else "/docs",
    )
    if mount_docs is not None:
        mount_docs(app)
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(_Limits, limit=max_upload_bytes, metrics=metrics, token=token)

    @app.exception_handler(EsgMemoryError)
    async def _esg_error(request: Request, exc: EsgMemoryError) -> JSONResponse:
        status = 403 if isinstance(exc, _PathForbidden) else error_status(exc)
        if status >= 500:
            logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(_error_body(type(exc).__name__, str(exc), status), status_code=status)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, exc: OverloadedError) -> JSONResponse:
        return JSONResponse(_error_body("Overloaded", str(exc), 503), status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is left out: it can be an upload's bytes
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in exc.errors()]
        return JSONResponse(_error_body("ValidationError", errs, 422), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 413: "PayloadTooLarge"}.get(
            exc.status_code, "HTTPError")
        return JSONResponse(_error_body(kind, exc.detail, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(_error_body("InternalError", f"{type(exc).__name__}", 500), status_code=500)

    from .serve_routes import register_routes

    register_routes(app, service, token=token, root=root, protect_reads=protect_reads)
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



def _version() -> str:
    from . import __version__

    return __version__


def check_bearer(header: str | None, token: str | None) -> None:
    """401 without credentials, 403 with wrong ones; constant-time comparison."""
    from starlette.exceptions import HTTPException

    if token is None:
        return
    if not header:
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        raise HTTPException(401, "expected 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(cred.strip().encode(), token.encode()):
        raise HTTPException(403, "invalid bearer token")


def resolve_image_path(path: str, root: Path | None) -> Any:
    """Load an image from a client-given path, refusing anything outside ``root`` (403)."""
    from .images import load_image

    if root is None:
        raise _PathForbidden("image_path is disabled on this server (start it with --allowed-root DIR)")
    p = Path(path)
    try:
        full = (p if p.is_absolute() else root / p).resolve()
    except (OSError, RuntimeError) as e:
        raise _PathForbidden(f"image path {path!r} cannot be resolved ({e})") from None
    if full != root and root not in full.parents:
        raise _PathForbidden(f"image path {path!r} resolves outside the allowed root")
    return load_image(full, allowed_root=root)


if __name__ == "__main__":
    raise SystemExit(main())

