"""The whole service on real servers: redis-server, SeaweedFS (S3, auth on), Celery worker processes
on the tiny bundle, and the API under uvicorn, driven over HTTP."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY
from tests.integration.servers import (
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    free_port,
    kill_all,
    spawn,
    wait_for,
    worker_env,
)

Q_ONE, Q_ALL = "q-one", "q-all"  # worker A serves both queues, worker B only Q_ALL


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


def stack_env(redis_url: str, s3: SeaweedS3, bundle: Path, prefix: str, **extra: str) -> dict[str, str]:
    env = {
        "DIFFEXP_REDIS_URL": redis_url,
        "DIFFEXP_REDIS_PREFIX": prefix,
        "DIFFEXP_STORAGE_BACKEND": "s3",
        "DIFFEXP_S3_ENDPOINT_URL": s3.endpoint,
        "DIFFEXP_S3_BUCKET": s3.bucket,
        "DIFFEXP_S3_ACCESS_KEY_ID": s3.access_key,
        "DIFFEXP_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "DIFFEXP_BUNDLES_DIR": str(bundle.parent),
        "DIFFEXP_DEFAULT_MODEL": bundle.name,
        "DIFFEXP_SHARD_SIZE": "2",
        "DIFFEXP_BATCH_SIZE": "2",
        "DIFFEXP_MAX_COUNT": "50",
        "DIFFEXP_MAX_STEPS": "60",
        "DIFFEXP_CELERY_QUEUE": Q_ALL,
        "DIFFEXP_LEASE_TTL_S": "5",
        "DIFFEXP_VISIBILITY_TIMEOUT_S": "120",
        "DIFFEXP_RECONCILE_INTERVAL_S": "1",
        "DIFFEXP_RECONCILE_GRACE_S": "3",
        "DIFFEXP_ADMIN_KEY": ADMIN_KEY,
        "DIFFEXP_WEBHOOK_ALLOW_PRIVATE": "true",  # the test's receiver listens on loopback
        # no worker metrics endpoint unless a test gives its worker a port: two workers on one host
        # would both ask for the default one
        "DIFFEXP_WORKER_METRICS_PORT": "0",
    }
    env.update(extra)
    return env


def settings_from(env: dict[str, str], **overrides: Any) -> Settings:
    values = {k.removeprefix("DIFFEXP_").lower(): v for k, v in env.items()}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    client: httpx.Client
    workers: dict[str, CeleryWorker]
    s3: SeaweedS3
    worker_metrics: dict[str, str] = field(default_factory=dict)  # worker name -> its /metrics URL

    def settings(self, **overrides: Any) -> Settings:
        return settings_from(self.env, **overrides)


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, seaweed: SeaweedS3, tiny_bundle: Path
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    env = stack_env(f"{redis_server.url}/0", seaweed, tiny_bundle, "int")
    queues = {"a": f"{Q_ONE},{Q_ALL}", "b": Q_ALL}
    taken: set[int] = set()
    ports = {name: free_port(taken=taken) for name in queues}  # one metrics port per worker process
    workers = {
        name: CeleryWorker(work, {**env, "DIFFEXP_WORKER_METRICS_PORT": str(ports[name])}, name, queues=q)
        for name, q in queues.items()
    }
    worker_metrics = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
    port = free_port()
    api_log = work / "api.log"
    api = spawn(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        log=api_log,
        env=worker_env(env),
    )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30, headers=ADMIN_HEADERS)
    try:
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, "uvicorn", api, api_log)
        for w in workers.values():
            w.wait_ready(90)
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "readyz", api, api_log)
        yield Stack(
            env=env, url=url, client=client, workers=workers, s3=seaweed, worker_metrics=worker_metrics
        )
    finally:
        client.close()
        kill_all([api, *(w.proc for w in workers.values())])


def wait_job(
    get: Callable[[], dict[str, Any]],
    timeout: float = 120,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    until = until or (lambda j: j["status"] in ("succeeded", "failed", "canceled"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get()
        if until(job):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job not done after {timeout}s: {job}")
