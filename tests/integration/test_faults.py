"""Operator faults on real servers: Redis killed with SIGKILL and restarted, the object store stopped
mid-job. Each job must end exactly as it would have without the fault (or fail with a reason), with
nothing stored lost."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import ADMIN_HEADERS
from tests.integration.conftest import settings_from, stack_env, wait_job
from tests.integration.servers import CeleryWorker, RedisServer, SeaweedS3, wait_for
from tests.integration.test_service import unzip

pytestmark = pytest.mark.integration


def tolerant(get: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """A poll that reads errors while a server is down as 'not yet'."""

    def poll() -> dict[str, Any]:
        try:
            resp = get()
            body: dict[str, Any] = resp.json()
            return body if resp.status_code == 200 else {"status": f"http {resp.status_code}"}
        except Exception as exc:
            return {"status": f"error {exc!r}"}

    return poll


def noticed(worker: CeleryWorker, *lines: str, count: int = 1) -> bool:
    """Whether the worker's log holds ``count`` lines with one of ``lines`` (the fault was seen)."""
    seen = [line for line in worker.log.read_text().splitlines() if any(x in line for x in lines)]
    return len(seen) >= count


def running_with_progress(job: dict[str, Any]) -> bool:
    return job.get("status") == "running" and job["progress"]["kept"] >= 1


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis-aof").mkdir()
    server = RedisServer(tmp_path / "redis-aof", persistent=True)
    yield server
    server.stop()


def test_redis_killed_and_restarted_mid_job_the_job_finishes_exactly(
    tmp_path: Path, own_redis: RedisServer, seaweed: SeaweedS3, tiny_bundle: Path
) -> None:
    env = stack_env(
        f"{own_redis.url}/0", seaweed, tiny_bundle, "rk", DIFFEXP_CELERY_QUEUE="q-rk",
        DIFFEXP_LEASE_TTL_S="3", DIFFEXP_RECONCILE_INTERVAL_S="1", DIFFEXP_RECONCILE_GRACE_S="3",
    )  # fmt: skip
    worker = CeleryWorker(tmp_path, env, "rk")
    try:
        worker.wait_ready(90)
        with TestClient(create_app(settings_from(env)), headers=ADMIN_HEADERS) as c:
            body = {"count": 6, "steps": 30, "seed": 5, "eta": 1.0}
            loc = c.post("/v1/jobs", json=body).headers["location"]
            wait_job(tolerant(lambda: c.get(loc)), 60, until=running_with_progress)
            own_redis.stop(sig=signal.SIGKILL)
            # down until the worker has run into it (its shard's outage, or its broker connection)
            wait_for(lambda: noticed(worker, "outage", "Connection to broker lost"), 60, "the outage")
            own_redis.start()
            job = wait_job(tolerant(lambda: c.get(loc)), 180)
            assert job["status"] == "succeeded", job
            zf, rows = unzip(c.get(f"{loc}/pairs.zip").content)
        assert [int(r["index"]) for r in rows] == list(range(6))  # eta 1: the first six, each once
        assert len(zf.namelist()) == len(set(zf.namelist())) == 2 + 12
    finally:
        worker.stop(sig=signal.SIGKILL)


def test_object_store_stopped_mid_job_the_job_finishes_and_nothing_is_lost(
    tmp_path: Path, redis_server: RedisServer, seaweed: SeaweedS3, tiny_bundle: Path
) -> None:
    env = stack_env(
        f"{redis_server.url}/2", seaweed, tiny_bundle, "s3down", DIFFEXP_CELERY_QUEUE="q-s3down",
        DIFFEXP_LEASE_TTL_S="3", DIFFEXP_RECONCILE_INTERVAL_S="1", DIFFEXP_OUTAGE_LIMIT_S="180",
    )  # fmt: skip
    worker = CeleryWorker(tmp_path, env, "s3")
    try:
        worker.wait_ready(90)
        with TestClient(create_app(settings_from(env)), headers=ADMIN_HEADERS) as c:
            body = {"count": 6, "steps": 30, "seed": 8, "eta": 1.0}
            loc = c.post("/v1/jobs", json=body).headers["location"]
            first = wait_job(tolerant(lambda: c.get(loc)), 60, until=running_with_progress)
            seaweed.stop(sig=signal.SIGKILL)
            # down until the worker has run into it twice (it waited out one backoff holding its shard),
            # then up again: with the restart, the outage outlasts the 3 s lease, which it must keep
            wait_for(lambda: noticed(worker, "outage", count=2), 90, "two outage retries")
            seaweed.start()
            job = wait_job(tolerant(lambda: c.get(loc)), 240)
            assert job["status"] == "succeeded", job
            assert job["progress"]["kept"] == 6 and first["progress"]["kept"] >= 1
            zf, rows = unzip(c.get(f"{loc}/pairs.zip").content)
        assert [int(r["index"]) for r in rows] == list(range(6))
        assert len(zf.namelist()) == len(set(zf.namelist())) == 2 + 12
        assert all(zf.read(n)[:8] == b"\x89PNG\r\n\x1a\n" for n in zf.namelist() if n.endswith(".png"))
        assert "outage" in worker.log.read_text()  # the worker did run into the stopped store
    finally:
        worker.stop(sig=signal.SIGKILL)
