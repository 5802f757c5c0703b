"""The service driven as a user would: HTTP to uvicorn, real Celery workers, Redis and SeaweedFS."""

from __future__ import annotations

import csv
import io
import json
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import ADMIN_HEADERS
from tests.integration.conftest import Q_ALL, Q_ONE, Stack, settings_from, stack_env, wait_job
from tests.integration.servers import CeleryWorker, RedisServer, SeaweedS3, wait_for
from tests.utils.prom import parse, value
from tests.utils.receiver import Receiver

pytestmark = pytest.mark.integration
ETA = 0.42


def unzip(content: bytes) -> tuple[zipfile.ZipFile, list[dict[str, str]]]:
    zf = zipfile.ZipFile(io.BytesIO(content))
    assert zf.testzip() is None
    return zf, list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))


def pair_bytes(zf: zipfile.ZipFile) -> dict[str, bytes]:
    return {n: zf.read(n) for n in zf.namelist() if n.startswith(("images/", "masks/"))}


def test_lifecycle_post_poll_download_delete(stack: Stack) -> None:
    c = stack.client
    resp = c.post("/v1/jobs", json={"count": 5, "eta": ETA, "steps": 4, "seed": 1234})
    assert resp.status_code == 202
    loc = resp.headers["location"]
    job = wait_job(lambda: c.get(loc).json())
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["kept"] >= 5 and job["progress"]["target"] == 5  # kept: by every shard that ran
    assert job["started_at"] and job["completed_at"]
    assert c.get("/v1/jobs", params={"limit": 1}).json()["data"][0]["id"] == job["id"]

    zf, rows = unzip(c.get(job["links"]["pairs_zip"]).content)
    assert len(rows) == 5 and len({r["name"] for r in rows}) == 5
    assert sorted(zf.namelist()) == sorted(
        ["manifest.csv", "job.json"] + [f"{d}/{r['name']}.png" for r in rows for d in ("images", "masks")]
    )
    assert all(float(r["dice_loss"]) <= ETA for r in rows)
    assert [int(r["index"]) for r in rows] == sorted(int(r["index"]) for r in rows)
    for r in rows:
        mask = np.array(Image.open(io.BytesIO(zf.read(f"masks/{r['name']}.png"))))
        image = np.array(Image.open(io.BytesIO(zf.read(f"images/{r['name']}.png"))))
        assert mask.shape == image.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
        assert r["seed"] == "1234" and r["steps"] == "4" and r["eta"] == str(ETA)

    # S3: /download redirects to a presigned URL of the same zip, served by SeaweedFS itself
    dl = c.get(job["links"]["download"])
    assert dl.status_code == 307 and "X-Amz-Signature" in dl.headers["location"]
    presigned = httpx.get(dl.headers["location"])
    assert pair_bytes(unzip(presigned.content)[0]) == pair_bytes(zf)
    assert presigned.content == c.get(job["links"]["pairs_zip"]).content  # the same bytes every time

    # ?format=nnunet from S3: the same bytes on every download, labels 0/1, one training case per pair
    nn = [c.get(job["links"]["pairs_zip"], params={"format": "nnunet"}).content for _ in range(2)]
    assert nn[0] == nn[1]
    nz = zipfile.ZipFile(io.BytesIO(nn[0]))
    assert json.loads(nz.read("dataset.json"))["numTraining"] == 5
    for r in rows:
        label = np.array(Image.open(io.BytesIO(nz.read(f"labelsTr/{r['name']}.png"))))
        assert (
            set(np.unique(label)) <= {0, 1}
            and label.sum() * 255 == np.array(Image.open(io.BytesIO(zf.read(f"masks/{r['name']}.png")))).sum()
        )
        assert nz.read(f"imagesTr/{r['name']}_0000.png") == zf.read(f"images/{r['name']}.png")

    assert c.delete(loc).status_code == 204
    assert c.get(loc).status_code == 404
    assert (
        stack.s3.client.list_objects_v2(Bucket=stack.s3.bucket, Prefix=f"jobs/{job['id']}/")["KeyCount"] == 0
    )


def run_job(client: Any, body: dict[str, Any]) -> tuple[dict[str, Any], zipfile.ZipFile]:
    loc = client.post("/v1/jobs", json=body).headers["location"]
    job = wait_job(lambda: client.get(loc).json())
    assert job["status"] == "succeeded", job["error"]
    return job, unzip(client.get(f"{loc}/pairs.zip").content)[0]


@pytest.fixture()
def api(stack: Stack) -> Iterator[Any]:
    """An API on the stack with other settings (queue, shard size), through TestClient."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        c = TestClient(create_app(stack.settings(**overrides)), headers=ADMIN_HEADERS)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def test_same_seed_same_bytes_with_one_or_two_workers_and_any_shard_size(stack: Stack, api: Any) -> None:
    body = {"count": 4, "eta": ETA, "steps": 3, "seed": 777}
    one, zip_one = run_job(api(celery_queue=Q_ONE, shard_size=2), body)  # worker a only
    two, zip_two = run_job(api(celery_queue=Q_ALL, shard_size=2), body)  # workers a and b
    big, zip_big = run_job(api(celery_queue=Q_ALL, shard_size=4), body)
    assert one["params"]["shard_size"] == 2 and big["params"]["shard_size"] == 4
    ref = pair_bytes(zip_one)
    assert len(ref) == 8
    assert pair_bytes(zip_two) == ref
    assert pair_bytes(zip_big) == ref
    for job in (one, two, big):  # counts cover every shard that ran: they depend on the split
        p = job["progress"]
        assert p["target"] == 4 and p["kept"] >= 4 and p["discarded"] == p["generated"] - p["kept"]


def test_cancel_mid_job_keeps_finished_pairs(stack: Stack, api: Any) -> None:
    c = api(celery_queue=Q_ONE)
    loc = c.post("/v1/jobs", json={"count": 40, "steps": 40, "seed": 5}).headers["location"]
    wait_job(lambda: c.get(loc).json(), 60, until=lambda j: j["progress"]["kept"] >= 2)
    resp = c.post(f"{loc}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert c.post(f"{loc}/cancel").status_code == 409
    assert c.get(f"{loc}/pairs.zip").status_code == 409

    def stored() -> int:
        return len(unzip(c.get(f"{loc}/pairs.zip", params={"partial": "true"}).content)[1])

    at_cancel = stored()
    # the shard in flight stops at its next check and gives its lease back (at most its batch in flight
    # may still land); the job's later shards are skipped without taking one: nothing lands after that
    r = redis.Redis.from_url(stack.settings().redis_url)
    leases = f"{stack.env['DIFFEXP_REDIS_PREFIX']}:job:{loc.rsplit('/', 1)[-1]}:lease:*"
    wait_for(lambda: not list(r.scan_iter(leases)), 30, "the canceled job's shard to stop")
    settled = stored()
    assert at_cancel >= 2 and settled - at_cancel <= 2
    assert stored() == settled < 40
    job = c.get(loc).json()
    assert job["status"] == "canceled" and job["progress"]["kept"] == settled


def test_idempotency_bad_bodies_and_unknown_jobs(stack: Stack) -> None:
    c = stack.client
    before = c.get("/v1/jobs").json()["count"]
    for body, field in [
        ({"count": 0}, "count"),
        ({"count": 51}, "count"),
        ({"count": 2, "tau": 0}, "tau"),
        ({"count": 2, "eta": 1.5}, "eta"),
        ({"count": 2, "steps": 61}, "steps"),
        ({"count": 2, "model": "nope"}, "model"),
    ]:
        resp = c.post("/v1/jobs", json=body)
        assert resp.status_code == 422, body
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert field in [e["loc"][-1] for e in resp.json()["errors"]]
    assert c.get("/v1/jobs").json()["count"] == before  # nothing stored

    headers = {"Idempotency-Key": "integration-key"}
    first = c.post("/v1/jobs", json={"count": 1, "steps": 2}, headers=headers)
    second = c.post("/v1/jobs", json={"count": 1, "steps": 2}, headers=headers)
    assert first.json()["id"] == second.json()["id"]
    assert c.post("/v1/jobs", json={"count": 2, "steps": 2}, headers=headers).status_code == 409
    assert wait_job(lambda: c.get(first.headers["location"]).json())["status"] == "succeeded"
    assert c.get("/v1/jobs/ffffffffffffffffffffffffffffffff").status_code == 404
    assert c.get("/v1/jobs/ffffffffffffffffffffffffffffffff/pairs.zip").status_code == 404


def test_worker_killed_mid_job_the_job_still_succeeds(
    tmp_path: Path, redis_server: RedisServer, seaweed: SeaweedS3, tiny_bundle: Path
) -> None:
    # Own Redis database and queue. The visibility timeout is long: the reconciler, not Celery, brings
    # the killed worker's shard back once its lease expires.
    env = stack_env(
        f"{redis_server.url}/1", seaweed, tiny_bundle, "kill",
        DIFFEXP_CELERY_QUEUE="q-kill", DIFFEXP_VISIBILITY_TIMEOUT_S="600", DIFFEXP_LEASE_TTL_S="3",
    )  # fmt: skip
    workers = [CeleryWorker(tmp_path, env, name) for name in ("k1", "k2")]
    try:
        for w in workers:
            w.wait_ready(90)
        settings = settings_from(env)
        with TestClient(create_app(settings), headers=ADMIN_HEADERS) as c:
            loc = c.post("/v1/jobs", json={"count": 8, "steps": 30, "seed": 99}).headers["location"]
            victim = workers[1]
            job_id = loc.rsplit("/", 1)[-1]
            r = redis.Redis.from_url(settings.redis_url)

            def victim_mid_shard() -> bool:  # the victim holds a shard's lease: it is sampling it
                leases = r.scan_iter(f"kill:job:{job_id}:lease:*")
                return any((r.get(k) or b"").startswith(f"{victim.proc.pid}:".encode()) for k in leases)

            wait_job(lambda: c.get(loc).json(), 60, until=lambda j: victim_mid_shard())
            victim.stop(sig=signal.SIGKILL)
            job = wait_job(lambda: c.get(loc).json(), 120)
            assert job["status"] == "succeeded", job["error"]
            zf, rows = unzip(c.get(f"{loc}/pairs.zip").content)
            lost = parse(c.get("/metrics").text)  # the reconciler's requeue, counted for operators
            assert value(lost, "diffexp_shards_lost_total", model=settings.default_model) >= 1
        assert [int(r["index"]) for r in rows] == list(range(8))  # eta 1: the first 8, each once
        assert len(zf.namelist()) == len(set(zf.namelist())) == 2 + 16
        attempts = [int(v) for v in r.hvals(f"kill:job:{job['id']}:attempts")]
        assert max(attempts) >= 2  # the killed worker's shard was delivered again
    finally:
        for w in workers:
            w.stop(sig=signal.SIGKILL)


def test_a_webhook_reaches_its_receiver_signed_when_the_job_ends(stack: Stack) -> None:
    receiver = Receiver()
    try:
        job = stack.client.post("/v1/jobs", json={"count": 2, "seed": 5, "callback_url": receiver.url}).json()
        done = wait_job(
            lambda: stack.client.get(f"/v1/jobs/{job['id']}").json(),
            until=lambda j: (j.get("webhook") or {}).get("status") == "delivered",
        )
        assert done["status"] == "succeeded" and len(receiver.requests) == 1
        headers, body = receiver.requests[0]
        assert verify(job["callback_secret"], headers[SIGNATURE_HEADER], body)
        sent = json.loads(body)
        assert sent["status"] == "succeeded" and sent["progress"] == done["progress"]
    finally:
        receiver.close()
