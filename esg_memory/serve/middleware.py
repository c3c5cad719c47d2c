"""`RequestLimits`: the pure-ASGI guard in front of every route (body limit, early auth, request metrics)."""

from __future__ import annotations

import json
import time
from typing import Any

from .auth import check_bearer
from .http_errors import error_body
from .metrics import Metrics
from .openai_api import is_openai_path, openai_error_body

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "RequestLimits"]

#: Request bodies above this are refused with 413 before they are read.
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024


class _Early:
    path = "refused_before_routing"


# what a refused request's "route" is, so the request metrics label it without a route template
_EARLY = _Early()


class RequestLimits:
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
                await self._reply(send_wrapper, 413, "PayloadTooLarge", detail, {"connection": "close"},
                                  str(scope.get("path", "")))
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
    async def _reply(send: Any, status: int, kind: str, detail: str, extra: dict[str, str],
                     path: str = "") -> None:
        # the OpenAI-compatible paths (/v1/...) answer in OpenAI's error shape
        code = "request_too_large" if status == 413 else None
        body = json.dumps(openai_error_body(status, detail, code=code) if is_openai_path(path)
                          else error_body(kind, detail, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
