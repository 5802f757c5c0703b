"""``/metrics`` of the API after real jobs: real Redis, local storage, shards run in this process with
the tiny bundle (``run_shard``, as a worker runs them), a real Celery producer for the queue depth."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app import counters
from app.core.config import Settings
from app.main import create_app
from app.queue import celery_enqueue, make_celery
from app.reconciler import sweep
from app.store import JobStore
from models.bundle import Bundle
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.integration.servers import RedisServer, wait_for
from tests.utils.prom import Samples, names, parse, value
from worker.shard import run_shard

ETA = 0.42  # the untrained tiny filter scores ~0.35-0.5: this keeps some pairs and discards others
METRICS_KEY = "metrics-key-0123456789"


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


def scrape(client: TestClient) -> tuple[str, Samples]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return resp.text, parse(resp.text)


def drain(store: JobStore, enqueued: Enqueued, get_bundle: Callable[[str], Any]) -> Counter[str]:
    """Run every enqueued shard (and those they enqueue) as a worker would; their outcomes."""
    outcomes: Counter[str] = Counter()
    while enqueued:
        job_id, shard, _ = enqueued.pop(0)
        outcomes[str(run_shard(store, get_bundle, job_id, shard))] += 1
    return outcomes


class NoModel:
    """What ``get_bundle`` returns for a bundle whose networks are broken: sampling crashes."""

    device = "cpu"


def test_metrics_after_real_jobs_count_pairs_shards_jobs_queues_and_workers(
    client: TestClient, store: JobStore, enqueued: Enqueued, settings: Settings, bundle: Bundle
) -> None:
    model = settings.default_model
    q = settings.celery_queue

    # a job that succeeds, one canceled before it ran, one whose model cannot load (its shard fails)
    done = client.post("/v1/jobs", json={"count": 3, "eta": ETA, "steps": 4, "seed": 5}).json()
    outcomes = drain(store, enqueued, lambda name: bundle)
    canceled = client.post("/v1/jobs", json={"count": 2, "steps": 4}).json()
    assert client.post(f"/v1/jobs/{canceled['id']}/cancel").status_code == 200
    outcomes += drain(store, enqueued, lambda name: bundle)  # its shard is skipped

    def broken(name: str) -> Bundle:
        raise OSError("bundle.json unreadable")

    failed = client.post("/v1/jobs", json={"count": 2, "steps": 4}).json()
    outcomes += drain(store, enqueued, broken)
    # a shard that crashes while sampling: requeued (retry), then run again with the real bundle
    retried = client.post("/v1/jobs", json={"count": 1, "eta": 1.0, "steps": 4, "seed": 2}).json()
    job_id, shard, _ = enqueued.pop(0)
    outcomes[str(run_shard(store, lambda name: NoModel(), job_id, shard))] += 1
    outcomes += drain(store, enqueued, lambda name: bundle)
    statuses = {j: client.get(f"/v1/jobs/{j}").json()["status"] for j in (done["id"], retried["id"])}
    assert statuses == {done["id"]: "succeeded", retried["id"]: "succeeded"}
    assert client.get(f"/v1/jobs/{failed['id']}").json()["status"] == "failed"
    assert {"done", "skipped", "failed", "retry"} <= set(outcomes)

    # a queued job with two shards really sent to Celery (nobody consumes this test's queue) ...
    queued = client.post("/v1/jobs", json={"count": 2, "steps": 4}).json()
    send = celery_enqueue(make_celery(settings))
    send(queued["id"], 0, q)
    send(queued["id"], 1, q)
    # ... a running one, and two live workers, one also serving another queue
    running = client.post("/v1/jobs", json={"count": 2, "steps": 4}).json()
    store.mark_running(running["id"])
    store.r.set(store.keys.worker("w1@gpu-host-a"), json.dumps({"queues": [q]}), ex=60)
    store.r.set(store.keys.worker("w2@gpu-host-b"), json.dumps({"queues": [q, "other-q"]}), ex=60)

    # the truth, from what the shards stored: J:done of each job ({"generated", "kept": [indices]})
    generated = kept = 0
    for j in (done["id"], retried["id"]):
        for raw in store.r.hvals(store.keys.job(j, "done")):
            shard_done = json.loads(raw)
            generated += shard_done["generated"]
            kept += len(shard_done["kept"])
    assert 0 < kept < generated  # the filter kept some pairs and discarded others

    text, m = scrape(client)
    assert value(m, "diffexp_redis_up") == 1
    assert value(m, "diffexp_pairs_generated_total", model=model) == generated
    assert value(m, "diffexp_pairs_kept_total", model=model) == kept
    assert value(m, "diffexp_pairs_discarded_total", model=model) == generated - kept
    for outcome, n in outcomes.items():
        assert value(m, "diffexp_shard_runs_total", model=model, outcome=outcome) == n, outcome
    for status in ("succeeded", "canceled", "failed"):
        want = {"succeeded": 2, "canceled": 1, "failed": 1}[status]
        assert value(m, "diffexp_jobs_finished_total", model=model, status=status) == want
    assert value(m, "diffexp_jobs", status="queued") == 1
    assert value(m, "diffexp_jobs", status="running") == 1
    assert value(m, "diffexp_jobs_stored") == 6
    assert value(m, "diffexp_queue_length", queue=q) == 2
    assert value(m, "diffexp_queue_length", queue="other-q") == 0
    assert value(m, "diffexp_workers") == 2
    assert value(m, "diffexp_queue_workers", queue=q) == 2
    assert value(m, "diffexp_queue_workers", queue="other-q") == 1
    # HTTP metrics, by route template: GET /v1/jobs/{id} was called, never under its id
    assert value(m, "http_requests_total", handler="/v1/jobs/{job_id}", method="GET", status="2xx") == 3
    assert value(m, "http_requests_total", handler="/v1/jobs", method="POST", status="2xx") == 6

    # no job id, key name or worker host in any label or help text
    for j in (done, canceled, failed, retried, queued, running):
        assert j["id"] not in text
    assert settings.redis_prefix not in text and "gpu-host" not in text


def test_unknown_paths_and_methods_do_not_become_label_values(client: TestClient) -> None:
    for i in range(3):
        client.get(f"/no/such/path/{i}")
        client.request("PROPFIND", f"/v1/jobs/{'ab' * 16}-{i}")
        client.request("BREW", "/healthz")
    scrape(client)
    _, m = scrape(client)  # scrapes are not counted themselves
    handlers = {dict(labels).get("handler") for name, labels in m if name == "http_requests_total"}
    methods = {dict(labels).get("method") for name, labels in m if name == "http_requests_total"}
    assert handlers == {"none", "/v1/jobs/{job_id}", "/healthz"}
    assert methods == {"GET", "OTHER"}
    assert value(m, "http_requests_total", handler="none", method="GET", status="4xx") == 3
    assert value(m, "http_requests_total", handler="/healthz", method="OTHER", status="4xx") == 3


def test_a_lost_shard_requeued_by_the_reconciler_is_counted(
    client: TestClient, store: JobStore, enqueued: Enqueued, settings: Settings
) -> None:
    job_id = client.post("/v1/jobs", json={"count": 2, "steps": 4}).json()["id"]
    store.r.set(store.keys.worker("w@h"), json.dumps({"queues": [settings.celery_queue]}), ex=30)
    _, shard, _ = enqueued.pop(0)
    # its worker took the shard and was killed (SIGKILL): the lease expires, nothing finishes it
    store.shard_started(job_id, shard)
    lease = store.keys.job(job_id, "lease", str(shard))
    store.r.set(lease, "dead-worker", px=100)
    wait_for(lambda: not store.r.exists(lease), 10, "the dead worker's lease to expire")
    assert sweep(store).requeued == [(job_id, shard)]
    _, m = scrape(client)
    assert value(m, "diffexp_shards_lost_total", model=settings.default_model) == 1


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def test_redis_down_is_a_200_with_redis_up_0_and_the_http_metrics(
    settings_factory: Callable[..., Settings], own_redis: RedisServer
) -> None:
    settings = settings_factory(redis_url=f"{own_redis.url}/0")
    with TestClient(create_app(settings, enqueue=Enqueued()), headers=ADMIN_HEADERS) as c:
        assert c.post("/v1/jobs", json={"count": 1}).status_code == 202
        _, m = scrape(c)
        assert value(m, "diffexp_redis_up") == 1 and value(m, "diffexp_jobs", status="queued") == 1
        own_redis.stop()
        assert c.get("/v1/jobs").status_code == 503  # the API itself cannot serve jobs ...
        started = time.monotonic()
        _, m = scrape(c)  # ... but /metrics answers, fast, with what it has
        assert time.monotonic() - started < 5
        assert value(m, "diffexp_redis_up") == 0
        assert not {"diffexp_jobs", "diffexp_queue_length", "diffexp_workers"} & names(m)
        assert value(m, "http_requests_total", handler="/v1/jobs", method="GET", status="5xx") == 1
        own_redis.start()
        _, m = scrape(c)
        assert value(m, "diffexp_redis_up") == 1 and value(m, "diffexp_jobs", status="queued") == 0


def test_the_metrics_key_is_enforced_when_set(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(metrics_key=METRICS_KEY)
    with TestClient(create_app(settings, enqueue=Enqueued())) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-0123456789"},
            {"Authorization": f"Basic {METRICS_KEY}"},
            {"Authorization": "Bearer ключ".encode()},
            ADMIN_HEADERS,  # the metrics key only: Prometheus never holds the admin key
        ):
            resp = c.get("/metrics", headers=headers)
            assert resp.status_code == 401, headers
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.headers["www-authenticate"].startswith("Bearer")
        resp = c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert resp.status_code == 200 and "diffexp_redis_up 1.0" in resp.text
        assert c.get("/healthz").status_code == 200  # the probes stay open
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 401
    with pytest.raises(ValidationError, match="DIFFEXP_METRICS_KEY"):
        settings_factory(metrics_key="short")


def test_openapi_documents_metrics_outside_v1_with_its_401(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert set(op["responses"]["200"]["content"]) == {"text/plain", "application/openmetrics-text"}
    assert op["responses"]["401"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    assert "security" not in op  # open unless DIFFEXP_METRICS_KEY is set


def test_openmetrics_when_asked(client: TestClient) -> None:
    resp = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.endswith("# EOF\n") and "diffexp_redis_up 1" in resp.text


def test_counter_fields_name_their_labels_and_unknown_fields_are_skipped() -> None:
    f = counters.field("jobs_finished", model="m|x", status="failed")
    assert counters.parse({f.encode(): b"3", b"junk": b"1", b'["nope",["a"]]': b"2", f + "x": b"1"}) == {
        ("jobs_finished", ("m|x", "failed")): 3
    }
    with pytest.raises(ValueError, match="labels"):
        counters.field("jobs_finished", model="m")


def test_a_keys_private_model_name_never_becomes_a_label_value(
    client: TestClient,
    store: JobStore,
    enqueued: Enqueued,
    settings: Settings,
    bundle: Bundle,
    tiny_bundle: Path,
) -> None:
    """/metrics is readable without a key: a key's model name shows there as ``other`` (the API's
    counters and a worker's own metrics alike); shared models keep their names."""
    from prometheus_client import REGISTRY, generate_latest

    from tests.app.test_auth import bearer, new_key
    from tests.app.test_registry import push
    from worker import runtime

    secret = "secret-lung-of-lab-a"
    a = bearer(new_key(client, "lab-a", max_active_jobs=5))
    assert push(client, tiny_bundle, secret, headers=a).status_code == 201
    done = client.post("/v1/jobs", headers=a, json={"count": 2, "model": secret, "steps": 4}).json()
    drain(store, enqueued, lambda name: bundle)
    canceled = client.post("/v1/jobs", headers=a, json={"count": 2, "model": secret, "steps": 4}).json()
    client.post(f"/v1/jobs/{canceled['id']}/cancel", headers=a)
    admins = client.post(
        "/v1/jobs", json={"count": 1, "model": secret, "steps": 4}
    ).json()  # the admin, on it
    client.post(f"/v1/jobs/{admins['id']}/cancel")
    shared = client.post("/v1/jobs", headers=a, json={"count": 1, "steps": 4}).json()  # the default model
    drain(store, enqueued, lambda name: bundle)
    assert {client.get(f"/v1/jobs/{j['id']}").json()["status"] for j in (done, shared)} == {"succeeded"}

    text, m = scrape(client)
    assert secret not in text
    assert value(m, "diffexp_jobs_finished_total", model="other", status="succeeded") == 1
    assert value(m, "diffexp_jobs_finished_total", model="other", status="canceled") == 2
    assert value(m, "diffexp_jobs_finished_total", model=settings.default_model, status="succeeded") == 1
    assert value(m, "diffexp_pairs_generated_total", model="other") >= 2
    assert value(m, "diffexp_shard_runs_total", model="other", outcome="done") >= 1

    # the worker's own endpoint: its histograms, counters and the bundles it holds
    worker_settings = settings.model_copy(update={"bundle_cache_dir": settings.storage_dir / "cache"})
    runtime._bundles.clear()
    try:
        runtime.get_bundle(f"{secret}@1", worker_settings, client.app.state.registry)  # type: ignore[attr-defined]
        runtime.get_bundle(f"{settings.default_model}@local", worker_settings, client.app.state.registry)  # type: ignore[attr-defined]
        worker_text = generate_latest(REGISTRY).decode()
    finally:
        runtime._bundles.clear()
    assert secret not in worker_text
    w = parse(worker_text)
    assert value(w, "diffexp_worker_bundles_loaded", model="other", version="other", device="cpu") == 1
    assert (
        value(w, "diffexp_worker_bundles_loaded", model=settings.default_model, version="local", device="cpu")
        == 1
    )
    assert value(w, "diffexp_worker_pairs_generated_total", model="other", device="cpu") >= 2
