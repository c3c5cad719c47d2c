"""The debugger's page: its files (``static/``, package data), their strict Content-Security-Policy
(`UI_CSP`: same-origin scripts, styles and fetches only, no inline script), and the routes serving them
(`register_ui_page`: ``/ui`` and ``/ui/{file}``, open: they hold no data). No ``from __future__ import
annotations``: FastAPI reads the annotations at runtime.
"""

from importlib import resources
from typing import Any

from ...errors import InvalidInputError

__all__ = ["UI_CSP", "UI_FILES", "register_ui_page", "ui_file"]

#: The Content-Security-Policy of every /ui response: nothing but same-origin scripts, styles and fetches.
UI_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
          "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
#: The page's files (package data) and their content types.
UI_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
            "app.css": "text/css; charset=utf-8"}
_HEADERS = {"Content-Security-Policy": UI_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def ui_file(name: str) -> bytes:
    """The bytes of one of the page's files (`UI_FILES`), read from the installed package."""
    if name not in UI_FILES:
        raise InvalidInputError(f"no UI file {name!r}")
    return resources.files("esg_memory.serve.ui").joinpath("static", name).read_bytes()


def register_ui_page(app: Any) -> None:
    """Add the page (``/ui``) and its files to ``app``: open, they hold no data."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    def page(name: str) -> Response:
        return Response(ui_file(name), media_type=UI_FILES[name], headers=_HEADERS)

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def ui_index() -> Response:
        return page("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        if name not in UI_FILES:
            raise HTTPException(404, f"no UI file {name!r}")
        return page(name)
