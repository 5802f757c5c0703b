"""A real HTTP server on 127.0.0.1 that answers from a script, for what the real service cannot be
made to do on demand: drop a connection after reading a request, answer 503, cut an event stream.
Each ``(method, path)`` has a list of replies used in order, the last one repeating; every request
is recorded."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Reply = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class Scripted:
    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[Seen] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.requests.append(Seen(self.command, url.path, url.query, headers, body))
                replies = owner.script.get((self.command, url.path))
                if not replies:
                    return json_reply(404, {"status": 404, "title": "Not Found", "detail": "Not Found"})(self)
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                reply(self)

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.script[(method, path)] = list(replies)

    def seen(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def raw(status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Reply:
    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    return reply


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    kind = "application/problem+json" if status >= 400 else "application/json"
    return raw(status, json.dumps(body).encode(), kind, headers)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(
        status, {"type": "about:blank", "title": "x", "status": status, "detail": detail}, headers
    )


def drop() -> Reply:
    """Close the connection without an answer (the request was read: it may have had its effect)."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    return reply


def sse(events: list[tuple[int, str, dict[str, Any]]], *, cut: bool = False, hang: float = 0.0) -> Reply:
    """An event stream of ``(id, event, data)``, chunked; ``cut`` drops the connection mid-stream
    (no final chunk) instead of ending it, after ``hang`` seconds of silence."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for chunk in [b": ping\r\n\r\n"] + [
            f"id: {i}\r\nevent: {ev}\r\ndata: {json.dumps(data)}\r\n\r\n".encode() for i, ev, data in events
        ]:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.flush()
        time.sleep(hang)
        h.close_connection = True
        if cut:
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            h.wfile.write(b"0\r\n\r\n")

    return reply


def job_json(job_id: str, status: str, kept: int, target: int = 4, **progress: Any) -> dict[str, Any]:
    """A job as the service answers it (the JobPublic contract)."""
    return {
        "id": job_id,
        "owner": "admin",
        "status": status,
        "input": {"count": target},
        "params": {"count": target, "steps": 4},
        "progress": {"target": target, "generated": kept, "kept": kept, "discarded": 0, **progress},
        "error": "boom" if status == "failed" else None,
        "created_at": "2026-01-02T03:04:05.678Z",
        "started_at": None,
        "completed_at": None,
        "links": {"self": f"/v1/jobs/{job_id}"},
    }
