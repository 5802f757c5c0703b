"""The request body limit: an ASGI middleware that refuses a body past ``DIFFEXP_MAX_BODY_BYTES``
with a 413 problem, before the route runs when ``Content-Length`` says so, and as soon as the bytes
received pass the limit when it does not (chunked), so a 10 MB body never ties up the API.

FastAPI's own ``max_body_size`` answers in plain text and, when ``Content-Length`` is too large,
still runs a route that does not read its body (a DELETE would delete); this one does neither.

Upload routes (``uploads``: path -> limit; ``POST /v1/datasets``, DIFFEXP_MAX_UPLOAD_MB) take a
larger body, but only as ``multipart/form-data``: the form parser streams its file part to a
temporary file, while any other content type (a urlencoded form is parsed in memory) keeps the
small limit.
"""

from __future__ import annotations

import fnmatch

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` inside the route; the HTTPException handler answers a 413 problem."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


def upload_too_large(limit: int) -> str:
    return f"upload larger than DIFFEXP_MAX_UPLOAD_MB ({limit // (1 << 20)} MB)"


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        uploads: dict[str, int] | None = None,
        upload_patterns: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}
        # fnmatch patterns of upload paths with a path parameter (``/v1/models/*/versions``)
        self.upload_patterns = upload_patterns or {}

    def _upload(self, path: str) -> int | None:
        if path in self.uploads:
            return self.uploads[path]
        for pattern, limit in self.upload_patterns.items():
            if fnmatch.fnmatchcase(path, pattern):
                return limit
        return None

    def _limit(self, scope: Scope, headers: Headers) -> tuple[int, str]:
        upload = self._upload(scope["path"])
        if upload is not None and scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media == "multipart/form-data":
                return upload, upload_too_large(upload)
        return self.max_bytes, too_large(self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        max_bytes, detail = self._limit(scope, headers)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            status, message = (413, detail) if declared.isdigit() else (400, "bad Content-Length")
            await problem(status, message, instance=scope["path"])(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge(detail)
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except BodyTooLarge:  # read outside a route (no handler saw it): answer here if still possible
            if started:
                raise
            await problem(413, detail, instance=scope["path"])(scope, receive, send)
