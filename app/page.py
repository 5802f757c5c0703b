"""The web page: ``/`` and its script and style under ``/static/page/``, plain files of ``app/static``
(no build step, nothing from another origin).

Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only (no
inline code), images from here or ``blob:`` (the page fetches pair images with the API key and shows
them as blob URLs), requests to this origin only. An injected script or style would not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC = Path(__file__).parent / "static"
ASSETS = "/static/page"
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class PageFiles(StaticFiles):
    """The page's assets, with the security headers (a file opened on its own is as strict)."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        # revalidate each load: a new version of the script must never meet an old page
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def install_page(app: FastAPI) -> None:
    app.mount(ASSETS, PageFiles(directory=STATIC), name="page-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )
