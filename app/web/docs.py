"""``/docs``: Swagger UI served from the app's own files, so it works with no network.

FastAPI's default page loads Swagger UI from a CDN; on an air-gapped host, or behind a proxy
that blocks it, that page is blank. The assets are Swagger UI 5 (``static/swagger-ui``, see its
README): version 5 is the first to render OpenAPI 3.1, which FastAPI generates.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
SWAGGER_UI_DIR = Path(__file__).resolve().parent / "static" / "swagger-ui"


def install(app: FastAPI) -> None:
    """Serve ``/docs`` (and its OAuth2 redirect page) with assets under ``/docs-assets``."""
    app.mount(ASSETS, StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API documentation",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
