"""The request body limit: an ASGI middleware that refuses a body past ``DIFFEXP_MAX_BODY_BYTES``
with a 413 problem, before the route runs when ``Content-Length`` says so, and as soon as the bytes
received pass the limit when it does not (chunked), so a 10 MB body never ties up the API.

FastAPI's own ``max_body_size`` answers in plain text and, when ``Content-Length`` is too large,
still runs a route that does not read its body (a DELETE would delete); this one does neither.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` inside the route; the HTTPException handler answers a 413 problem."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large(limit))


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, detail = (
                (413, too_large(self.max_bytes)) if declared.isdigit() else (400, "bad Content-Length")
            )
            await problem(status, detail, instance=scope["path"])(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
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
            await problem(413, too_large(self.max_bytes), instance=scope["path"])(scope, receive, send)
