"""``make serve`` (app/serve.py): a second instance starts nothing, the children stop in order and
out of the terminal's Ctrl-C, readiness is awaited without a stream of 503s, ports follow PORT."""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app import serve
from app.core.config import Settings
from app.heartbeats import beat
from tests.integration.servers import RedisServer


@pytest.fixture()
def clean_children() -> Iterator[None]:
    yield
    serve.stop_all()


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_second_serve_on_a_busy_port_says_so_and_starts_nothing(
    busy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    monkeypatch.setattr(serve, "start", lambda name, *a, **k: started.append(name))
    monkeypatch.setattr(serve.subprocess, "run", lambda *a, **k: started.append("publish_demo"))
    with pytest.raises(SystemExit, match=f"port {busy_port} on 127.0.0.1 is in use.*PORT={busy_port + 1}"):
        serve.main(["--port", str(busy_port), "--var", str(tmp_path / "var")])
    assert started == [] and not (tmp_path / "var" / "redis").exists()


def test_a_second_serve_on_the_same_var_folder_is_refused(tmp_path: Path) -> None:
    held = serve.lock_var(tmp_path)
    try:
        with pytest.raises(SystemExit, match=f"in use by another `make serve` \\(pid {os.getpid()}\\)"):
            serve.lock_var(tmp_path)
    finally:
        held.close()
    serve.lock_var(tmp_path).close()  # free again once the first one ends


def test_a_busy_worker_metrics_port_is_refused_before_anything_starts(busy_port: int, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = int(s.getsockname()[1])
    with pytest.raises(SystemExit, match=f"metrics port {busy_port} is in use"):
        serve.preflight("127.0.0.1", free, busy_port, tmp_path)


def test_the_worker_metrics_port_moves_with_port(settings_factory: Callable[..., Settings]) -> None:
    default = settings_factory()
    assert serve.worker_metrics_port(8000, default) == 9808
    assert serve.worker_metrics_port(8001, default) == 9809  # a second instance: no clash
    assert serve.worker_metrics_port(8000 - 9808 + 9809, default) == 9809
    assert serve.worker_metrics_port(8000, settings_factory(worker_metrics_port=9999)) == 9999
    assert serve.worker_metrics_port(8000, settings_factory(worker_metrics_port=0)) == 0


CHILD = """
import signal, sys, time
name, log = sys.argv[1], sys.argv[2]
def on_term(*_):
    with open(log, "a") as f:
        f.write("term " + name + "\\n")
    time.sleep(0.3)  # its shutdown work (the API: lifespan, webhook sender; Redis: the AOF)
    with open(log, "a") as f:
        f.write("exit " + name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(log + "." + name, "w").close()
while True:
    time.sleep(1)
"""


def test_children_stop_one_at_a_time_api_then_worker_then_redis(tmp_path: Path, clean_children: None) -> None:
    log = tmp_path / "order.log"
    for name in ("redis-server", "worker", "api"):  # the order main starts them in
        serve.start(name, [sys.executable, "-c", CHILD, name, str(log)], dict(os.environ))
    for name in ("redis-server", "worker", "api"):  # each has set its handler
        while not Path(f"{log}.{name}").exists():
            assert all(p.poll() is None for p in serve.children)
    serve.stop_all()
    assert log.read_text().split("\n")[:-1] == [
        "term api",
        "exit api",
        "term worker",
        "exit worker",
        "term redis-server",
        "exit redis-server",
    ]


def test_children_are_out_of_the_terminals_process_group(clean_children: None) -> None:
    """A Ctrl-C in the terminal signals its foreground process group: serve alone, which stops the
    children in order (Redis is not stopped under the API's feet)."""
    proc = serve.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)


class Api(http.server.BaseHTTPRequestHandler):
    """``/healthz`` 200; ``/readyz`` 200 once a worker heartbeat is live, else 503; every request counted."""

    requests: list[tuple[str, int]] = []
    r: Any = None
    on_health: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/healthz":
            status = 200
            type(self).on_health()
        else:
            status = 200 if self.r.keys("t:worker:*") else 503
        self.requests.append((self.path, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_start_up_waits_for_the_worker_in_redis_not_by_polling_readyz(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    r = redis.Redis.from_url(server.url)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    # the worker comes up 1 s after the API answers (a real one: tens of seconds, loading torch)
    Api.requests, Api.r = [], r
    Api.on_health = staticmethod(
        lambda: threading.Timer(1.0, lambda: r.set("t:worker:w@h", beat(["q"], r), ex=30)).start()
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        serve.wait_ready(url, server.url, "t", [], 30)
        assert Api.requests == [("/healthz", 200), ("/readyz", 200)]  # no "GET /readyz 503" lines
    finally:
        httpd.shutdown()
        r.close()
        server.stop()
