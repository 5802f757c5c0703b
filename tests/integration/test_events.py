"""``GET /v1/jobs/{id}/events`` on the real service: uvicorn, Celery workers sampling the tiny
bundle, Redis and SeaweedFS. The stream is read over HTTP as a client would, line by line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack, wait_job
from tests.utils.sse import read_events

pytestmark = pytest.mark.integration


def events(stack: Stack, job_id: str, headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The job's events as they come; the iteration ends when the server ends the stream."""
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        yield from read_events(resp.iter_lines())


def submit(stack: Stack, **body: Any) -> str:
    resp = stack.client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_the_stream_shows_a_job_progress_then_its_end(stack: Stack) -> None:
    job_id = submit(stack, count=4, steps=30, seed=31)  # two shards of one batch each (2 workers)
    got = list(events(stack, job_id))  # the whole stream: it ends by itself
    names = [e["event"] for e in got]
    assert names[-1] == "succeeded" and set(names[:-1]) == {"progress"} and len(names) >= 3
    ids = [e["id"] for e in got]
    assert ids == sorted(set(ids))  # increasing
    progress = [e["data"]["progress"] for e in got]
    # sampling shows (the filter's few milliseconds may fall between two polls of the stream)
    assert {"mask", "image"} & {p["phase"] for p in progress[:-1]}
    generated = [p["generated"] for p in progress]
    assert generated == sorted(generated) and generated[-1] >= 4  # counts never go back
    final = got[-1]["data"]
    assert final["status"] == "succeeded" and final["progress"]["phase"] is None
    assert final["progress"]["eta_seconds"] == 0.0 and final["progress"]["pairs_per_second"] > 0
    assert final == stack.client.get(f"/v1/jobs/{job_id}").json()  # the same job as polling shows


def test_last_event_id_resumes_without_repeats(stack: Stack) -> None:
    job_id = submit(stack, count=6, steps=8, seed=32)
    first: list[dict[str, Any]] = []
    for event in events(stack, job_id):  # a client that drops the connection after two events
        first.append(event)
        if len(first) == 2 or event["event"] != "progress":
            break
    last_id = first[-1]["id"]
    rest = list(events(stack, job_id, {"Last-Event-ID": str(last_id)}))
    assert all(e["id"] > last_id for e in rest) and rest[-1]["event"] == "succeeded"
    ids = [e["id"] for e in first + rest]
    assert ids == sorted(set(ids))
    # resumed after its end: the terminal event once more, then the end
    again = list(events(stack, job_id, {"Last-Event-ID": str(rest[-1]["id"])}))
    assert [(e["event"], e["id"]) for e in again] == [("succeeded", rest[-1]["id"])]


def test_a_canceled_job_ends_its_stream_with_canceled(stack: Stack) -> None:
    job_id = submit(stack, count=40, steps=40, seed=33)
    names: list[str] = []
    canceled = False
    for event in events(stack, job_id):
        names.append(event["event"])
        if not canceled and event["data"]["progress"]["phase"] is not None:  # a shard is sampling
            assert stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
            canceled = True
    assert names[-1] == "canceled" and names.count("canceled") == 1 and "succeeded" not in names
    job = wait_job(lambda: stack.client.get(f"/v1/jobs/{job_id}").json())
    assert job["status"] == "canceled"


def test_another_keys_job_is_a_404_and_a_deleted_job_ends_the_stream(stack: Stack) -> None:
    resp = stack.client.post("/v1/keys", json={"name": f"sse{int(time.time() * 1000) % 10**9}"})
    assert resp.status_code == 201, resp.text
    other = {"Authorization": f"Bearer {resp.json()['key']}"}
    job_id = submit(stack, count=40, steps=40, seed=34)
    stranger = httpx.get(f"{stack.url}/v1/jobs/{job_id}/events", headers=other, timeout=10)
    assert stranger.status_code == 404 and stranger.headers["content-type"] == "application/problem+json"
    started = time.monotonic()
    names = []
    for event in events(stack, job_id):
        names.append(event["event"])
        if len(names) == 1:
            assert stack.client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert set(names) == {"progress"} and time.monotonic() - started < 20  # ended, no terminal event
    assert stack.client.get(f"/v1/jobs/{job_id}/events").status_code == 404
