"""The service's OpenAPI page works offline: Swagger UI's files come from the installed wheel, not a CDN."""

from __future__ import annotations

import fastapi  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import httpx
import swagger_ui_bundle  # noqa: F401  (an [all] extra: missing means failing, never skipping)
import uvicorn  # noqa: F401  (an [all] extra: missing means failing, never skipping)
from _serve_fixtures import TOKEN, running

from esg_memory.serve import create_app


def test_docs_page_and_its_assets_are_served_locally(serve_base, tmp_path):
    from esg_memory.model import EditedModel

    model, processor, encoder = serve_base
    em = EditedModel.wrap(model, processor, encoder=encoder)
    app = create_app(em, tmp_path / "mem", token=TOKEN)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "cdn" not in page.text.lower()
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert f"/docs-assets/{asset}" in page.text
            r = c.get(f"/docs-assets/{asset}")
            assert r.status_code == 200 and len(r.content) > 10_000
        assert "/edits" in c.get("/openapi.json").json()["paths"]
