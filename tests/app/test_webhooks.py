"""Webhooks: signed POSTs of a job that ended, retried with backoff, never into the internal network.

The receiver is a real HTTP server on loopback (so the service runs with webhook_allow_private)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.reconciler import sweep
from app.store import JobStore
from app.webhooks import (
    SIGNATURE_HEADER,
    WebhookError,
    WebhookSender,
    after_attempt,
    backoff_s,
    check_url,
    resolve_target,
    sign,
    verify,
)
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.utils.receiver import Receiver

SECRET = "s" * 32


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture()
def hooks_client(settings_factory: Callable[..., Settings], enqueued: Enqueued) -> Iterator[TestClient]:
    app = create_app(settings_factory(webhook_allow_private=True, webhook_retry_s=60), enqueue=enqueued)
    with TestClient(app, headers=ADMIN_HEADERS) as c:
        yield c


def state(client: TestClient) -> JobStore:
    app: Any = client.app
    return app.state.store  # type: ignore[no-any-return]


def finish(store: JobStore, job_id: str) -> None:
    store.put_pair(job_id, name="p-000000", index=0, seed=1, dice_loss=0.01, image_png=b"i", mask_png=b"m")
    store.finish_shard(job_id, 0, 2, [0])


# ---- the pure parts


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"x"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    header = sign(SECRET, body, 1_700_000_000)
    assert header == f"t=1700000000,sha256={expected}"
    assert verify(SECRET, header, body, now=1_700_000_100)
    assert not verify(SECRET, header, body + b" ", now=1_700_000_100)  # tampered body
    assert not verify("other" * 4, header, body, now=1_700_000_100)  # wrong secret
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # a replay, too old
    assert not verify(SECRET, "garbage", body)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(30) == 600


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http:///nohost", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com/#frag", "fragment"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://localhost:8000/", "private"),
        ("http://127.0.0.1/", "private"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "private"),  # cloud metadata
        ("http://[::1]/", "private"),
        ("http://[::ffff:127.0.0.1]/", "private"),
        # IPv6 literals carrying an internal IPv4 address (is_global calls some of them global)
        ("http://[::127.0.0.1]/", "private"),  # IPv4-compatible
        ("http://[::ffff:0:7f00:1]/", "private"),  # IPv4-translated (SIIT)
        ("http://[64:ff9b::7f00:1]/", "private"),  # NAT64 of 127.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/", "private"),  # NAT64 of the metadata address
        ("http://[64:ff9b:1::7f00:1]/", "private"),  # local-use NAT64 prefix
        ("http://[64:ff9b:1:abcd::808:808]/", "private"),
        ("http://[2002:7f00:1::]/", "private"),  # 6to4 of 127.0.0.1
        ("http://[2002:a9fe:a9fe::1]/", "private"),  # 6to4 of the metadata address
        ("http://[2001:0:7f00:1:0:0:f5ff:fffe]/", "private"),  # Teredo, client 10.0.0.1
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "private"),  # Teredo, public server
        ("http://0.0.0.0/", "private"),
        ("http://" + "a" * 2100 + ".com/", "longer than"),
    ],
)
def test_urls_that_are_refused(url: str, why: str) -> None:
    with pytest.raises(WebhookError, match=why):
        check_url(url, allow_private=False)


def test_private_addresses_are_allowed_only_when_configured() -> None:
    assert check_url("http://127.0.0.1:9000/h", allow_private=True) == ("http", "127.0.0.1", 9000)
    assert check_url("https://example.com/h", allow_private=False) == ("https", "example.com", 443)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2a00:1450:4001:81c::200e", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_and_public_embedded_ipv4_are_accepted(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    assert check_url(f"http://{host}/h", allow_private=False)[1] == address


@pytest.mark.parametrize(
    "address", ["::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2001:0:7f00:1::1"]
)
def test_a_host_name_resolving_to_an_ipv6_form_of_an_internal_ipv4_is_refused_at_delivery(
    address: str,
) -> None:
    with pytest.raises(WebhookError, match="private"):
        resolve_target("https://hooks.example.com/x", allow_private=False, resolver=lambda h, p: [address])


def test_a_host_name_is_refused_when_any_address_it_resolves_to_is_private() -> None:
    """DNS names pointing inside (or rebinding to) the network are refused at delivery time."""

    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.5"]

    with pytest.raises(WebhookError, match="10.0.0.5"):
        resolve_target("https://hooks.example.com/x", allow_private=False, resolver=resolver)
    target = resolve_target("https://hooks.example.com:8443/x?a=1", allow_private=True, resolver=resolver)
    # the request goes to the address that was checked, under the host's name
    assert target.request_url() == "https://93.184.216.34:8443/x?a=1"
    assert target.host_header() == "hooks.example.com:8443"


def test_after_attempt_delivers_retries_then_gives_up() -> None:
    hook = {"url": "u", "secret": "s", "status": "pending", "attempts": [], "attempt_count": 0}
    ok = {"at": 100.0, "status_code": 204, "error": None}
    bad = {"at": 100.0, "status_code": 500, "error": "HTTP 500"}
    assert after_attempt(hook, ok, ended_at=100, retry_s=60)["status"] == "delivered"
    retry = after_attempt(hook, bad, ended_at=100, retry_s=60)
    assert retry["status"] == "pending" and retry["next_attempt_at"] == 105.0 and retry["attempt_count"] == 1
    late = after_attempt(hook, {**bad, "at": 158.0}, ended_at=100, retry_s=60)
    assert late["status"] == "failed" and late["next_attempt_at"] is None


# ---- through the API, to a real receiver


def test_a_finished_job_is_posted_signed_and_the_delivery_is_in_the_job(
    hooks_client: TestClient, receiver: Receiver
) -> None:
    created = hooks_client.post("/v1/jobs", json={"count": 1, "callback_url": receiver.url})
    assert created.status_code == 202
    job = created.json()
    secret = job["callback_secret"]
    assert secret and len(secret) >= 32
    assert job["webhook"]["status"] == "waiting" and job["webhook"]["url"] == receiver.url
    store = state(hooks_client)
    sender = WebhookSender(store)
    assert sender.tick() == 0  # nothing due while the job runs

    finish(store, job["id"])
    assert sender.tick() == 1
    headers, body = receiver.requests[0]
    assert verify(secret, headers[SIGNATURE_HEADER], body)
    assert headers["X-DiffuseExpand-Event"] == "job.succeeded"
    assert headers["Host"] == receiver.url.split("/")[2]
    sent = json.loads(body)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded"
    assert "secret" not in body.decode() and secret not in body.decode()

    now = hooks_client.get(f"/v1/jobs/{job['id']}").json()
    assert now["webhook"]["status"] == "delivered" and now["webhook"]["attempt_count"] == 1
    assert now["webhook"]["attempts"][0]["status_code"] == 204
    assert sender.tick() == 0  # delivered once


def test_the_secret_is_shown_once_and_never_stored_in_the_input(
    hooks_client: TestClient, receiver: Receiver
) -> None:
    given = "my-own-secret-of-32-characters!!"
    job = hooks_client.post(
        "/v1/jobs", json={"count": 1, "callback_url": receiver.url, "callback_secret": given}
    ).json()
    assert job["callback_secret"] == given
    for seen in (
        hooks_client.get(f"/v1/jobs/{job['id']}").text,
        hooks_client.get("/v1/jobs").text,
    ):
        assert given not in seen and "callback_secret" not in seen
    finish(state(hooks_client), job["id"])
    WebhookSender(state(hooks_client)).tick()
    headers, body = receiver.requests[0]
    assert verify(given, headers[SIGNATURE_HEADER], body)


def test_failed_deliveries_are_retried_with_backoff_then_given_up(
    hooks_client: TestClient, receiver: Receiver
) -> None:
    receiver.answers = [(500, {}), (302, {"Location": "http://169.254.169.254/"})] + [(503, {})] * 10
    job = hooks_client.post("/v1/jobs", json={"count": 1, "callback_url": receiver.url}).json()
    store = state(hooks_client)
    finish(store, job["id"])
    sender = WebhookSender(store)
    assert sender.tick() == 1
    hook = hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert hook["status"] == "pending" and hook["attempts"][-1]["error"] == "HTTP 500"
    assert sender.tick() == 0  # not due yet: 5 s of backoff
    assert sender.tick(now=hook["next_attempt_at"] + 0.1) == 1
    hook = hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert hook["attempts"][-1]["status_code"] == 302  # a redirect is not followed
    assert len(receiver.requests) == 2
    # retried until webhook_retry_s (60 s) after the job ended, then failed
    while hook["status"] == "pending":
        assert store.deliver_webhook(job["id"], sender._attempt, now=hook["next_attempt_at"] + 0.1)
        hook = hooks_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
    assert hook["status"] == "failed" and hook["next_attempt_at"] is None
    assert hook["attempt_count"] == len(receiver.requests) >= 4
    assert store.due_webhooks(time.time() + 10_000) == []


def test_a_canceled_job_is_posted_as_canceled(hooks_client: TestClient, receiver: Receiver) -> None:
    job = hooks_client.post("/v1/jobs", json={"count": 3, "callback_url": receiver.url}).json()
    hooks_client.post(f"/v1/jobs/{job['id']}/cancel")
    WebhookSender(state(hooks_client)).tick()
    headers, body = receiver.requests[0]
    assert headers["X-DiffuseExpand-Event"] == "job.canceled" and json.loads(body)["status"] == "canceled"


def test_a_deleted_job_sends_nothing(hooks_client: TestClient, receiver: Receiver) -> None:
    job = hooks_client.post("/v1/jobs", json={"count": 1, "callback_url": receiver.url}).json()
    store = state(hooks_client)
    finish(store, job["id"])
    assert hooks_client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert WebhookSender(store).tick() == 0 and receiver.requests == []


def test_a_pending_webhook_survives_the_loss_of_redis(hooks_client: TestClient, receiver: Receiver) -> None:
    job = hooks_client.post("/v1/jobs", json={"count": 1, "callback_url": receiver.url}).json()
    store = state(hooks_client)
    finish(store, job["id"])
    store.r.flushdb()  # Redis lost everything: the record in storage still says "pending"
    sweep(store)
    assert WebhookSender(store).tick() == 1 and len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"callback_url": "http://127.0.0.1:9/x"}, "callback_url"),
        ({"callback_url": "http://169.254.169.254/"}, "callback_url"),
        ({"callback_url": "gopher://example.com/"}, "callback_url"),
        ({"callback_url": "https://example.com/", "callback_secret": "short"}, "callback_secret"),
        ({"callback_secret": "x" * 20}, "callback_secret"),
        ({"callback_url": 5}, "callback_url"),
    ],
)
def test_bad_callbacks_are_422_naming_the_field_and_nothing_is_stored(
    client: TestClient, enqueued: Enqueued, body: dict[str, Any], field: str
) -> None:
    resp = client.post("/v1/jobs", json={"count": 1, **body})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert any(e.get("pointer") == f"#/{field}" for e in resp.json()["errors"]), resp.json()
    assert enqueued == [] and client.get("/v1/jobs").json()["count"] == 0
