"""Metrics on the real stack: each Celery worker process serves its own /metrics, the API's /metrics
reports the whole service from Redis, and task events flow as Flower reads them."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
import redis

from app.queue import SHARD_TASK, make_celery
from tests.integration.conftest import Q_ALL, Q_ONE, Stack, wait_job
from tests.integration.servers import wait_for
from tests.utils.prom import Samples, parse, total, value

pytestmark = pytest.mark.integration


def worker_metrics(stack: Stack) -> dict[str, Samples]:
    return {name: parse(httpx.get(url, timeout=10).text) for name, url in stack.worker_metrics.items()}


def test_each_worker_serves_shard_histograms_and_the_api_the_services_counters(stack: Stack) -> None:
    c = stack.client
    model = stack.env["DIFFEXP_DEFAULT_MODEL"]
    workers_before = worker_metrics(stack)
    api_before = parse(c.get("/metrics").text)

    loc = c.post("/v1/jobs", json={"count": 6, "eta": 0.42, "steps": 4, "seed": 21}).headers["location"]
    job = wait_job(lambda: c.get(loc).json())
    assert job["status"] == "succeeded", job["error"]
    r = redis.Redis.from_url(stack.env["DIFFEXP_REDIS_URL"])
    done = [json.loads(v) for v in r.hvals(f"{stack.env['DIFFEXP_REDIS_PREFIX']}:job:{job['id']}:done")]
    assert len(done) >= 3  # 6 kept pairs in shards of 2

    def delta(before: dict[str, Samples], after: dict[str, Samples], name: str, **labels: str) -> float:
        return sum(total(after[w], name, **labels) - total(before[w], name, **labels) for w in after)

    def settled() -> tuple[dict[str, Samples], Samples] | None:
        """Once every shard run has ended (stopped ones too), both sides have counted the same pairs:
        each worker in its memory, all of them together in Redis."""
        workers, api = worker_metrics(stack), parse(c.get("/metrics").text)
        local = delta(workers_before, workers, "diffexp_worker_pairs_generated_total", model=model)
        shared = total(api, "diffexp_pairs_generated_total", model=model) - total(
            api_before, "diffexp_pairs_generated_total", model=model
        )
        return (workers, api) if local == shared and local > 0 else None

    workers_after, api = wait_for(settled, 30, "worker and Redis counters agree")

    # the shard histograms, by model and device, over both worker processes
    runs = delta(workers_before, workers_after, "diffexp_worker_shard_duration_seconds_count", model=model)
    assert runs >= len(done)  # every finished shard ran to its end once at least
    assert delta(workers_before, workers_after, "diffexp_worker_pairs_per_second_count", model=model) == runs
    assert delta(workers_before, workers_after, "diffexp_worker_shard_duration_seconds_sum", model=model) > 0
    worked = [w for w in workers_after if total(workers_after[w], "diffexp_worker_shard_runs_total") > 0]
    for w in worked:
        assert total(workers_after[w], "diffexp_worker_bundles_loaded", model=model, device="cpu") == 1
        assert total(workers_after[w], "diffexp_worker_shard_duration_seconds_bucket", le="+Inf") > 0
    local_done = delta(workers_before, workers_after, "diffexp_worker_shard_runs_total", outcome="done")
    assert local_done >= len(done)
    assert local_done == total(api, "diffexp_shard_runs_total", outcome="done") - total(
        api_before, "diffexp_shard_runs_total", outcome="done"
    )

    # the API: the whole service
    generated = sum(d["generated"] for d in done)
    kept = sum(len(d["kept"]) for d in done)
    finished = value(api, "diffexp_jobs_finished_total", model=model, status="succeeded")
    assert finished - total(api_before, "diffexp_jobs_finished_total", status="succeeded") == 1
    for name, at_least in (("generated", generated), ("kept", kept)):
        grown = total(api, f"diffexp_pairs_{name}_total") - total(api_before, f"diffexp_pairs_{name}_total")
        assert grown >= at_least  # stopped shards' pairs count too
    assert value(api, "diffexp_workers") == 2
    assert value(api, "diffexp_queue_workers", queue=Q_ALL) == 2
    assert value(api, "diffexp_queue_workers", queue=Q_ONE) == 1
    assert value(api, "diffexp_redis_up") == 1
    assert job["id"] not in c.get("/metrics").text


def test_task_events_flow_as_flower_reads_them(stack: Stack) -> None:
    """Flower is an event receiver on the broker: this one must see every shard sent by the API
    (task-sent) and run by a worker (task-started, task-succeeded)."""
    celery = make_celery(stack.settings())
    events: list[dict[str, Any]] = []
    ready = threading.Event()
    with celery.connection() as conn:
        recv = celery.events.Receiver(conn, handlers={"*": events.append})
        consume_ready = recv.on_consume_ready

        def on_ready(*args: Any, **kwargs: Any) -> None:
            consume_ready(*args, **kwargs)
            ready.set()

        recv.on_consume_ready = on_ready
        thread = threading.Thread(target=recv.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        thread.start()
        try:
            assert ready.wait(10)
            time.sleep(0.5)  # the SUBSCRIBE is on its way to Redis
            c = stack.client
            loc = c.post("/v1/jobs", json={"count": 2, "eta": 1.0, "steps": 4, "seed": 8}).headers["location"]
            job_id = loc.rsplit("/", 1)[-1]
            assert wait_job(lambda: c.get(loc).json())["status"] == "succeeded"

            def every_shard_succeeded() -> bool:
                sent = {e["uuid"] for e in list(events) if e["type"] == "task-sent" and job_id in e["args"]}
                succeeded = {e["uuid"] for e in list(events) if e["type"] == "task-succeeded"}
                return bool(sent) and sent <= succeeded

            wait_for(every_shard_succeeded, 30, "task events of every shard")
        finally:
            recv.should_stop = True
            thread.join(10)
    sent = [e for e in events if e["type"] == "task-sent" and job_id in e["args"]]
    assert {e["name"] for e in sent} == {SHARD_TASK} and {e["queue"] for e in sent} == {Q_ALL}
    started = {e["uuid"]: e["hostname"] for e in events if e["type"] == "task-started"}
    assert {started[e["uuid"]].split("@")[0] for e in sent} <= {"a", "b"}  # run by the stack's workers
