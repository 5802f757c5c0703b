"""``GET /v1/jobs/{id}/events`` through the app (real Redis; the worker's writes made by hand, from
another thread while the stream is read). The same against uvicorn and real workers:
tests/integration/test_events.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.events import next_event
from app.main import create_app
from app.schemas import JobPublic, JobStatus
from app.store import JobStore
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.utils.sse import read_events

RUNNING, CANCELED = JobStatus.RUNNING, JobStatus.CANCELED


# ---- the pure rule: which event, with which id
@pytest.mark.parametrize(
    ("status", "version", "seen", "last_sent", "event"),
    [
        (RUNNING, 3, None, None, ("progress", 3)),  # a new stream: the job as it is
        (RUNNING, 3, 3, 3, None),  # nothing changed since the client's last event
        (RUNNING, 5, 3, 3, ("progress", 5)),  # changed (versions 4 and 5 in between: one event)
        (RUNNING, None, None, None, None),  # no version in Redis (being rebuilt): nothing to number
        (RUNNING, 2, 57, 57, ("progress", 58)),  # Redis lost the version: ids still grow
        (RUNNING, 3, 2, 58, ("progress", 59)),
        (CANCELED, 6, 5, 5, ("canceled", 6)),  # finished: the terminal event
        (CANCELED, 6, 6, 6, ("canceled", 6)),  # resumed after it: sent again, same id
        (JobStatus.SUCCEEDED, 2, 57, 57, ("succeeded", 57)),
        (JobStatus.FAILED, None, None, None, ("failed", 0)),  # a finished job only storage knows
    ],
)
def test_next_event(
    status: JobStatus,
    version: int | None,
    seen: int | None,
    last_sent: int | None,
    event: tuple[str, int] | None,
) -> None:
    assert next_event(status, version, seen, last_sent) == event


# ---- the route
@pytest.fixture()
def sse_client(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(
        create_app(settings_factory(events_max_s=30.0), enqueue=Enqueued()), headers=ADMIN_HEADERS
    ) as c:
        yield c


def store_of(c: TestClient) -> JobStore:
    app: Any = c.app
    return app.state.store  # type: ignore[no-any-return]


def later(*steps: Callable[[], object], every: float = 0.3) -> threading.Thread:
    """Run ``steps`` one by one from another thread, ``every`` seconds apart (the worker's part)."""

    def run() -> None:
        for step in steps:
            time.sleep(every)
            step()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stream(c: TestClient, job_id: str, **headers: str) -> list[dict[str, Any]]:
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-store"
        return list(read_events(resp.iter_lines()))


def test_progress_events_then_one_terminal_event_then_the_end(sse_client: TestClient) -> None:
    store = store_of(sse_client)
    job = sse_client.post("/v1/jobs", json={"count": 4}).json()
    job_id = job["id"]
    t = later(
        lambda: store.mark_running(job_id),
        lambda: store.shard_progress(job_id, 0, 0, 0, "mask", 0),
        lambda: store.shard_progress(job_id, 0, 0, 0, "image", 0),
        lambda: store.shard_progress(job_id, 0, 2, 1, "mask", 2),
        lambda: store.cancel(job_id),
    )
    events = stream(sse_client, job_id)
    t.join()
    names = [e["event"] for e in events]
    assert names[0] == "progress" and names[-1] == "canceled" and names.count("canceled") == 1
    assert set(names[:-1]) == {"progress"}
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)) and ids[0] == 1 and ids[-1] == store.version(job_id)
    assert len(events) >= 4  # the changes 0.3 s apart, a poll every 0.05 s: none merged
    phases = [e["data"]["progress"]["phase"] for e in events]
    assert "image" in phases and phases[-1] is None
    assert events[0]["data"]["status"] == "queued" and events[-1]["data"]["status"] == "canceled"
    assert events[-1]["data"]["progress"]["generated"] == 2 and events[-1]["data"]["id"] == job_id


def test_last_event_id_resumes_after_it(sse_client: TestClient) -> None:
    store = store_of(sse_client)
    job_id = sse_client.post("/v1/jobs", json={"count": 4}).json()["id"]
    store.mark_running(job_id)
    seen = store.version(job_id)
    assert seen == 2
    t = later(lambda: store.shard_progress(job_id, 0, 2, 2, "mask", 2), lambda: store.cancel(job_id))
    events = stream(sse_client, job_id, **{"Last-Event-ID": str(seen)})
    t.join()
    assert [(e["event"], e["id"]) for e in events] == [("progress", 3), ("canceled", 4)]
    # a finished job: its terminal event again, whatever the client saw, and the end
    assert [(e["event"], e["id"]) for e in stream(sse_client, job_id, **{"Last-Event-ID": "4"})] == [
        ("canceled", 4)
    ]
    assert [(e["event"], e["id"]) for e in stream(sse_client, job_id)] == [("canceled", 4)]


def test_a_deleted_job_ends_the_stream(sse_client: TestClient) -> None:
    job_id = sse_client.post("/v1/jobs", json={"count": 4}).json()["id"]
    t = later(lambda: sse_client.delete(f"/v1/jobs/{job_id}"))
    started = time.monotonic()
    events = stream(sse_client, job_id)
    t.join()
    assert [e["event"] for e in events] == ["progress"] and time.monotonic() - started < 10
    assert sse_client.get(f"/v1/jobs/{job_id}/events").status_code == 404


def test_a_stream_lasts_events_max_s_then_the_client_resumes(
    settings_factory: Callable[..., Settings],
) -> None:
    app = create_app(settings_factory(events_max_s=0.5, events_ping_s=0.1), enqueue=Enqueued())
    with TestClient(app, headers=ADMIN_HEADERS) as c:
        job_id = c.post("/v1/jobs", json={"count": 4}).json()["id"]
        started = time.monotonic()
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
            lines = list(resp.iter_lines())
        assert 0.5 <= time.monotonic() - started < 5
        assert any(line.startswith(": ping") for line in lines)  # keep-alive comments
        assert [e["id"] for e in read_events(lines)] == [1]
        store_of(c).mark_running(job_id)
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "1"}) as resp:
            assert [(e["event"], e["id"]) for e in read_events(resp.iter_lines())] == [("progress", 2)]


@pytest.mark.parametrize("value", ["abc", "-1", "9007199254740992", "1.5", "null"])
def test_a_malformed_last_event_id_is_a_422(client: TestClient, value: str) -> None:
    job_id = client.post("/v1/jobs", json={"count": 1}).json()["id"]
    resp = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": value})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["errors"][0]["header"] == "Last-Event-ID"


def test_the_openapi_document_says_what_the_stream_sends(sse_client: TestClient) -> None:
    """Each event's ``data`` is a JobPublic object (as one line of JSON), its ``event`` one of four
    names; ``Last-Event-ID`` is an integer or absent, never ``null`` (``null`` is a 422 above)."""
    doc = sse_client.get("/openapi.json").json()
    for path, model in (
        ("/v1/jobs/{job_id}/events", "JobPublic"),
        ("/v1/trainings/{training_id}/events", "TrainingPublic"),
    ):
        op = doc["paths"][path]["get"]
        content = op["responses"]["200"]["content"]["text/event-stream"]
        item = content["x-itemSchema"]["properties"]
        assert item["data"]["contentMediaType"] == "application/json"
        assert item["data"]["contentSchema"] == {"$ref": f"#/components/schemas/{model}"}
        assert model in doc["components"]["schemas"]
        (header,) = [p for p in op["parameters"] if p["in"] == "header" and p["name"] == "Last-Event-ID"]
        assert header["schema"]["type"] == "integer" and "anyOf" not in header["schema"]
        assert not header.get("required", False)
    for ops in doc["paths"].values():  # no parameter anywhere is documented as nullable
        for op in ops.values():
            assert all("null" not in str(p["schema"]) for p in op.get("parameters", []))
    # and the stream sends that: each event's data validates as a JobPublic
    job_id = sse_client.post("/v1/jobs", json={"count": 4}).json()["id"]
    store_of(sse_client).cancel(job_id)
    events = stream(sse_client, job_id)
    assert [e["event"] for e in events] == ["canceled"]
    names = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"][
        "text/event-stream"
    ]
    assert events[0]["event"] in names["x-itemSchema"]["properties"]["event"]["enum"]
    JobPublic.model_validate(events[0]["data"])
