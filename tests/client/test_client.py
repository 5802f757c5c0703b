"""The client's behaviour over real HTTP against a scripted server: retries, the Idempotency-Key,
the event stream with Last-Event-ID resumption and its polling fallback, paging. The same calls
against the real service are in tests/integration/test_client.py."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest

from diffuseexpand import (
    AsyncClient,
    Client,
    JobFailed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    Unreachable,
    WaitTimeout,
)
from tests.client.scripted import Scripted, drop, job_json, json_reply, problem, sse
from tests.integration.servers import free_port

JOB = "c" * 32
JOB_PATH = f"/v1/jobs/{JOB}"
EVENTS = f"{JOB_PATH}/events"


def client(server: Scripted, **kw: object) -> Client:
    return Client(server.url, api_key="key-1", backoff=0.01, **kw)  # type: ignore[arg-type]


def test_get_retries_503_then_succeeds_and_sends_the_key(scripted: Scripted) -> None:
    busy = problem(503, "a backing service is unavailable", {"Retry-After": "0"})
    scripted.on("GET", JOB_PATH, busy, busy, json_reply(200, job_json(JOB, "running", 1)))
    with client(scripted) as c:
        job = c.get(JOB)
    assert job.id == JOB and job.progress.kept == 1
    seen = scripted.seen("GET", JOB_PATH)
    assert len(seen) == 3 and seen[0].headers["authorization"] == "Bearer key-1"


def test_503_gives_up_after_the_retries(scripted: Scripted) -> None:
    scripted.on("GET", JOB_PATH, problem(503, "down", {"Retry-After": "0"}))
    with client(scripted, retries=2) as c, pytest.raises(ServiceUnavailable, match="503 x: down") as exc:
        c.get(JOB)
    assert exc.value.retry_after == 0 and len(scripted.seen("GET", JOB_PATH)) == 3


def test_submit_retried_after_a_lost_answer_sends_the_same_idempotency_key(scripted: Scripted) -> None:
    scripted.on("POST", "/v1/jobs", drop(), json_reply(202, job_json(JOB, "queued", 0)))
    with client(scripted) as c:
        job = c.submit(4, tau=1.0, seed=3)
    assert job.status == "queued"
    first, second = scripted.seen("POST", "/v1/jobs")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert len(first.headers["idempotency-key"]) == 32
    assert first.body == second.body == b'{"count":4,"tau":1.0,"seed":3}'


def test_submit_uses_the_given_idempotency_key_and_refuses_unknown_parameters(scripted: Scripted) -> None:
    scripted.on("POST", "/v1/jobs", json_reply(202, job_json(JOB, "queued", 0)))
    with client(scripted) as c:
        c.submit(2, idempotency_key="mine", size="32x24")
    sent = scripted.seen("POST", "/v1/jobs")[0]
    assert sent.headers["idempotency-key"] == "mine" and sent.body == b'{"count":2,"size":"32x24"}'
    with pytest.raises(TypeError, match="colour"):
        asyncio.run(_async_submit(scripted.url, colour="red"))


def test_submit_sends_the_mask_source_sync_and_async(scripted: Scripted) -> None:
    scripted.on("POST", "/v1/jobs", json_reply(202, job_json(JOB, "queued", 0)), json_reply(202, job_json(JOB, "queued", 0)))  # fmt: skip
    with client(scripted) as c:
        c.submit(2, mask_source="mixed", real_share=0.25, clean_masks=True)
    asyncio.run(_async_submit(scripted.url, mask_source="real"))
    sync, async_ = scripted.seen("POST", "/v1/jobs")
    assert sync.body == b'{"count":2,"mask_source":"mixed","real_share":0.25,"clean_masks":true}'
    assert async_.body == b'{"count":2,"mask_source":"real"}'


async def _async_submit(url: str, **params: Any) -> None:
    async with AsyncClient(url) as c:
        await c.submit(2, **params)


def test_cancel_is_not_repeated_after_a_lost_answer(scripted: Scripted) -> None:
    scripted.on("POST", f"{JOB_PATH}/cancel", drop())
    with client(scripted) as c, pytest.raises(Unreachable, match="cannot reach"):
        c.cancel(JOB)
    assert len(scripted.seen("POST", f"{JOB_PATH}/cancel")) == 1


def test_delete_whose_answer_was_lost_counts_a_404_on_the_retry_as_done(scripted: Scripted) -> None:
    scripted.on("DELETE", JOB_PATH, drop(), problem(404, f"job {JOB} not found"))
    with client(scripted) as c:
        c.delete(JOB)
        scripted.on("DELETE", JOB_PATH, problem(404, f"job {JOB} not found"))
        with pytest.raises(NotFound):  # a first 404 is still an error
            c.delete(JOB)


def test_an_unreachable_service_is_one_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, backoff=0.01, retries=1) as c, pytest.raises(Unreachable, match=f"cannot reach {url}"):
        c.models()


def test_bad_urls_are_refused_up_front() -> None:
    for url in ("localhost:8000", "ftp://host", "http://"):
        with pytest.raises(ValueError, match="invalid service URL"):
            Client(url)


def test_wait_follows_the_event_stream_and_resumes_with_last_event_id(scripted: Scripted) -> None:
    scripted.on(
        "GET",
        EVENTS,
        sse(
            [(1, "progress", job_json(JOB, "running", 1)), (2, "progress", job_json(JOB, "running", 2))],
            cut=True,
        ),
        sse([(3, "progress", job_json(JOB, "running", 3)), (4, "succeeded", job_json(JOB, "succeeded", 4))]),
    )
    bar = io.StringIO()
    with client(scripted) as c:
        job = c.wait(JOB, progress=True, file=bar)
    assert job.status == "succeeded" and job.progress.kept == 4
    first, second = scripted.seen("GET", EVENTS)
    assert "last-event-id" not in first.headers and second.headers["last-event-id"] == "2"
    assert first.headers["accept"] == "text/event-stream"
    assert scripted.seen("GET", JOB_PATH) == []  # no polling
    assert "4/4" in bar.getvalue()


def test_wait_polls_when_the_service_has_no_event_stream(scripted: Scripted) -> None:
    scripted.on(  # EVENTS is not scripted: 404
        "GET",
        JOB_PATH,
        json_reply(200, job_json(JOB, "queued", 0)),
        json_reply(200, job_json(JOB, "succeeded", 4)),
    )
    with client(scripted) as c:
        job = c.wait(JOB, progress=False, poll_interval=0.01)
    assert job.status == "succeeded"
    assert len(scripted.seen("GET", EVENTS)) == 1 and len(scripted.seen("GET", JOB_PATH)) == 2


def test_wait_polls_when_the_stream_keeps_failing(scripted: Scripted) -> None:
    scripted.on("GET", EVENTS, drop())
    scripted.on("GET", JOB_PATH, json_reply(200, job_json(JOB, "succeeded", 4)))
    with client(scripted, retries=2) as c:
        assert c.wait(JOB, progress=False).status == "succeeded"
    assert len(scripted.seen("GET", EVENTS)) == 3


def test_a_quiet_stream_is_reopened_not_given_up_for_polling(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("diffuseexpand.client.STREAM_READ_TIMEOUT_S", 0.2)
    first = sse([(1, "progress", job_json(JOB, "running", 1))], cut=True, hang=0.6)
    quiet = sse([], cut=True, hang=0.6)  # only a keep-alive comment, then silence
    done = sse([(2, "succeeded", job_json(JOB, "succeeded", 4))])
    scripted.on("GET", EVENTS, first, quiet, quiet, quiet, done)
    with client(scripted, retries=1) as c:  # JOB_PATH is not scripted: polling would be a NotFound
        assert c.wait(JOB, progress=False).status == "succeeded"
    assert [r.headers.get("last-event-id") for r in scripted.seen("GET", EVENTS)] == [
        None,
        "1",
        "1",
        "1",
        "1",
    ]


def test_wait_raises_the_stream_s_auth_error_instead_of_polling(scripted: Scripted) -> None:
    scripted.on("GET", EVENTS, problem(401, "invalid or revoked key"))
    with client(scripted) as c, pytest.raises(Unauthorized, match="invalid or revoked key"):
        c.wait(JOB, progress=False)
    assert scripted.seen("GET", JOB_PATH) == []


def test_wait_on_a_failed_job_raises_job_failed(scripted: Scripted) -> None:
    scripted.on("GET", EVENTS, sse([(1, "failed", job_json(JOB, "failed", 1))]))
    with client(scripted) as c, pytest.raises(JobFailed, match=f"job {JOB} failed: boom") as exc:
        c.wait(JOB, progress=False)
    assert exc.value.job.status == "failed"


def test_wait_timeout(scripted: Scripted) -> None:
    scripted.on("GET", JOB_PATH, json_reply(200, job_json(JOB, "running", 1)))
    start = time.monotonic()
    with client(scripted, events=False) as c, pytest.raises(WaitTimeout) as exc:
        c.wait(JOB, progress=False, timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - start < 5 and exc.value.job is not None and exc.value.job.progress.kept == 1


def test_jobs_follows_next_cursor_across_pages(scripted: Scripted) -> None:
    ids = [f"{i:032x}" for i in range(3)]
    page1 = {"data": [job_json(i, "succeeded", 4) for i in ids[:2]], "count": 3, "limit": 2, "offset": 0,
             "next_cursor": "CUR"}  # fmt: skip
    page2 = {
        "data": [job_json(ids[2], "queued", 0)],
        "count": 3,
        "limit": 2,
        "offset": 0,
        "next_cursor": None,
    }
    scripted.on("GET", "/v1/jobs", json_reply(200, page1), json_reply(200, page2))
    with client(scripted) as c:
        assert [j.id for j in c.jobs()] == ids
    assert [r.query for r in scripted.seen("GET", "/v1/jobs")] == ["limit=100", "limit=100&cursor=CUR"]


def test_pairs_and_models_parse_the_contract(scripted: Scripted) -> None:
    links = {"image": "/i", "mask": "/m", "preview": "/p"}
    pair = {"name": "p0003", "index": 3, "seed": 9, "dice_loss": 0.01, "links": links,
            "mask_source": "real:case07", "cleaned": False}  # fmt: skip
    scripted.on("GET", f"{JOB_PATH}/pairs", json_reply(200, {"data": [pair], "count": 1, "offset": 2,
                                                            "limit": 5, "final": True}))  # fmt: skip
    model = {"name": "tiny", "resolution": 16, "sampling_defaults": {"tau": 1.0}, "eta_default": 0.065,
             "training_masks": True}  # fmt: skip
    scripted.on("GET", "/v1/models", json_reply(200, {"data": [model], "default": "tiny"}))
    with client(scripted) as c:
        page = c.pairs(JOB, offset=2, limit=5)
        models = c.models()
    assert page.final and page.count == 1 and page.data[0].name == "p0003" and page.data[0].links == links
    assert scripted.seen("GET", f"{JOB_PATH}/pairs")[0].query == "offset=2&limit=5"
    assert models[0].name == "tiny" and models[0].default and models[0].eta_default == 0.065
    assert page.data[0].mask_source == "real:case07" and not page.data[0].cleaned and models[0].training_masks


def test_job_ids_cannot_reach_another_route(scripted: Scripted) -> None:
    with client(scripted) as c, pytest.raises(NotFound):
        c.get("../models")
    assert scripted.requests[-1].path == "/v1/jobs/..%2Fmodels"


def test_async_client_follows_the_stream_too(scripted: Scripted) -> None:
    scripted.on(
        "GET",
        EVENTS,
        sse([(1, "progress", job_json(JOB, "running", 2))], cut=True),
        sse([(2, "canceled", job_json(JOB, "canceled", 2))]),
    )
    scripted.on("GET", JOB_PATH, json_reply(200, job_json(JOB, "canceled", 2)))

    async def run() -> None:
        async with AsyncClient(scripted.url, backoff=0.01) as c:
            assert (await c.get(JOB)).status == "canceled"
            with pytest.raises(JobFailed, match="was canceled"):
                await c.wait(JOB)

    asyncio.run(run())
    assert scripted.seen("GET", EVENTS)[1].headers["last-event-id"] == "1"
