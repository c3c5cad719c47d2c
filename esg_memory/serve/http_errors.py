"""How errors become HTTP replies: the status of each esg-memory error, the JSON error body, the handlers.

Every refusal, from the middleware or from a route, has the body ``{"error", "detail", "status"}``.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import (
    ConfigError,
    DuplicateEditError,
    EncoderMismatchError,
    EsgMemoryError,
    FormatError,
    ImageError,
    InvalidInputError,
    LockError,
    StaleStateError,
    StoreUnavailableError,
    UnknownEditError,
    VersionError,
)
from .auth import PathForbiddenError
from .batch import OverloadedError
from .service import ReadOnlyError

__all__ = ["error_body", "error_status", "install_error_handlers"]

# the flat layout's logger name (esg_memory/serve.py): logging configurations keep matching
logger = logging.getLogger("esg_memory.serve")

# Most specific first: ImageError is an InvalidInputError.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PathForbiddenError, 403),
    (ReadOnlyError, 403),
    (UnknownEditError, 404),
    (DuplicateEditError, 409),
    (VersionError, 409),
    (LockError, 409),
    (StaleStateError, 409),
    (StoreUnavailableError, 503),  # the shared store is down: the write was not applied, retry later
    (ImageError, 422),
    (InvalidInputError, 422),
    (ConfigError, 400),
    (EncoderMismatchError, 500),
    (FormatError, 500),
)

_HTTP_KINDS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 413: "PayloadTooLarge",
               415: "UnsupportedMediaType", 504: "Timeout"}


def error_status(exc: BaseException) -> int:
    """HTTP status for an esg-memory error (500 for anything unexpected)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(kind: str, detail: Any, status: int) -> dict[str, Any]:
    """The JSON body of every error reply."""
    return {"error": kind, "detail": detail, "status": status}


def install_error_handlers(app: Any) -> None:
    """Register the exception handlers that turn every error into `error_body` JSON on the FastAPI ``app``."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(EsgMemoryError)
    async def _esg_error(request: Request, exc: EsgMemoryError) -> JSONResponse:
        status = error_status(exc)
        if status >= 500:
            logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(error_body(type(exc).__name__, str(exc), status), status_code=status)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, exc: OverloadedError) -> JSONResponse:
        return JSONResponse(error_body("Overloaded", str(exc), 503), status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is left out: it can be an upload's bytes
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in exc.errors()]
        return JSONResponse(error_body("ValidationError", errs, 422), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "HTTPError")
        return JSONResponse(error_body(kind, exc.detail, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("InternalError", f"{type(exc).__name__}", 500), status_code=500)
