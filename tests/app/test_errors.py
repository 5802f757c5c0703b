"""Every bad input is a 4xx problem (RFC 9457), never a 500 or a hang; outages are 503s."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.store import JobStore
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS

PROBLEM = "application/problem+json"
JOB_ROUTES = [
    ("GET", ""),
    ("POST", "/cancel"),
    ("DELETE", ""),
    ("GET", "/pairs.zip"),
    ("GET", "/download"),
    ("GET", "/events"),
]


def assert_problem(resp: Any, status: int, path: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["type"] == "about:blank" and body["status"] == status and body["instance"] == path
    assert body["title"] and isinstance(body.get("detail", ""), str)
    return body


def nothing_stored(store: JobStore, settings: Settings) -> bool:
    return store.r.keys(f"{settings.redis_prefix}:*") == [] and not settings.storage_dir.exists()


# ---- problem details: validation errors with field paths, NaN and Infinity refused, inputs never
# echoed long; HTTPExceptions keep their headers, 405 names every method; 500 and 503 name nothing internal


def test_a_validation_error_is_a_problem_naming_each_field(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json={"count": 0, "tau": 30, "colour": "red"})
    body = assert_problem(resp, 422, "/v1/jobs")
    assert body["detail"] == "3 invalid parameters; see errors"
    by_pointer = {e["pointer"]: e for e in body["errors"]}
    assert by_pointer["#/count"] == {
        "detail": "Input should be greater than or equal to 1",
        "type": "greater_than_equal",
        "loc": ["body", "count"],
        "pointer": "#/count",
        "input": 0,
    }
    assert by_pointer["#/tau"]["detail"] == "Input should be less than or equal to 20"
    assert by_pointer["#/colour"]["type"] == "extra_forbidden"


@pytest.mark.parametrize("field", ["tau", "eta", "w_cf", "w_cg"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(
    client: TestClient, store: JobStore, settings: Settings, field: str, value: str
) -> None:
    """NaN gave a 500 (the error echoed NaN, which JSON cannot hold); Infinity was stored as is."""
    resp = client.post(
        "/v1/jobs",
        content=f'{{"count": 1, "{field}": {value}}}',
        headers={"content-type": "application/json"},
    )
    body = assert_problem(resp, 422, "/v1/jobs")
    (error,) = body["errors"]
    assert error["pointer"] == f"#/{field}" and "input" not in error
    assert nothing_stored(store, settings)


def test_long_inputs_are_never_echoed(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json={"count": 1, "model": "m" * 5000, "colour": list(range(3000))})
    body = assert_problem(resp, 422, "/v1/jobs")
    by_pointer = {e["pointer"]: e for e in body["errors"]}
    assert by_pointer["#/model"]["input"] == "m" * 200 + "…"
    assert "input" not in by_pointer["#/colour"]
    assert len(resp.content) < 2000
    resp = client.post("/v1/jobs", json={"count": 10**1000})  # an integer of a thousand digits
    assert "input" not in assert_problem(resp, 422, "/v1/jobs")["errors"][0]


def test_malformed_json_is_a_422_problem(client: TestClient) -> None:
    resp = client.post("/v1/jobs", content=b'{"count": 1,', headers={"content-type": "application/json"})
    (error,) = assert_problem(resp, 422, "/v1/jobs")["errors"]
    assert error["type"] == "json_invalid" and error["detail"].startswith("Invalid JSON at character 12")


@pytest.mark.parametrize("body", [b'{"count": 1, "model": "\xff"}', b'{"count": ' + b"9" * 5000 + b"}"])
def test_an_unreadable_body_is_a_400_problem(client: TestClient, body: bytes) -> None:
    """Not UTF-8, or an integer past Python's 4300-digit limit: JSON that cannot be decoded."""
    resp = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert assert_problem(resp, 400, "/v1/jobs")["detail"] == "There was an error parsing the body"


def test_http_exceptions_become_problems_and_keep_their_headers(client: TestClient) -> None:
    app: Any = client.app

    def guarded() -> None:
        raise HTTPException(401, detail="missing bearer token", headers={"WWW-Authenticate": "Bearer"})

    def throttled() -> None:
        raise HTTPException(429, headers={"Retry-After": "7"})

    app.add_api_route("/guarded", guarded)
    app.add_api_route("/throttled", throttled)
    resp = client.get("/guarded")
    assert assert_problem(resp, 401, "/guarded")["detail"] == "missing bearer token"
    assert resp.headers["www-authenticate"] == "Bearer"
    resp = client.get("/throttled")
    body = resp.json()
    assert (
        resp.status_code == 429
        and resp.headers["retry-after"] == "7"
        and resp.headers["content-type"] == PROBLEM
    )
    assert body["title"] == "Too Many Requests" and "detail" not in body  # no repeat of the title


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/jobs/" + "a" * 32, "DELETE, GET"),
        ("PATCH", "/v1/jobs/" + "a" * 32, "DELETE, GET"),
        ("GET", "/v1/jobs/" + "a" * 32 + "/cancel", "POST"),
        ("POST", "/healthz", "GET"),
        ("OPTIONS", "/v1/models", "GET, POST"),  # POST: a training (app.trainings)
    ],
)
def test_405_names_every_allowed_method(client: TestClient, method: str, path: str, allow: str) -> None:
    """Starlette's Allow named only the first route of the path (POST for /v1/jobs)."""
    resp = client.request(method, path)
    assert_problem(resp, 405, path)
    assert resp.headers["allow"] == allow


def test_an_unknown_route_is_a_404_problem(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing"), 404, "/v1/nothing")


def test_an_unexpected_error_is_a_500_problem_naming_nothing_internal(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    app: Any = client.app

    def broken() -> None:
        raise RuntimeError("cannot reach s3://secret-bucket at 10.0.0.7")

    app.add_api_route("/broken", broken)
    with (
        TestClient(app, raise_server_exceptions=False, headers=ADMIN_HEADERS) as c,
        caplog.at_level(logging.ERROR),
    ):
        resp = c.get("/broken")
    body = resp.json()
    assert resp.status_code == 500 and resp.headers["content-type"] == PROBLEM
    assert body == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "internal error; it has been logged",
        "instance": "/broken",
    }
    assert "secret-bucket" not in resp.text
    assert any(r.exc_info and "secret-bucket" in str(r.exc_info[1]) for r in caplog.records)


def test_redis_down_is_a_503_with_retry_after(settings_factory: Callable[..., Settings]) -> None:
    app = create_app(settings_factory(redis_url="redis://127.0.0.1:1/0"), enqueue=Enqueued())
    with TestClient(app, headers=ADMIN_HEADERS) as c:
        for method, path, body in [("GET", "/v1/jobs", None), ("POST", "/v1/jobs", {"count": 1})]:
            resp = c.request(method, path, json=body)
            problem = assert_problem(resp, 503, "/v1/jobs")
            assert resp.headers["retry-after"] == "5"
            assert "127.0.0.1" not in resp.text and "Error" not in problem["detail"]


def test_storage_down_is_a_503(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        storage_backend="s3",
        s3_endpoint_url="http://127.0.0.1:1",
        s3_bucket="secret-bucket",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    with TestClient(create_app(settings, enqueue=Enqueued()), headers=ADMIN_HEADERS) as c:
        resp = c.get(f"/v1/jobs/{'a' * 32}")  # not in Redis: the record is looked for in storage
    assert_problem(resp, 503, f"/v1/jobs/{'a' * 32}")
    assert resp.headers["retry-after"] == "5"
    assert "127.0.0.1" not in resp.text and "secret-bucket" not in resp.text


# ---- job ids: 32 lowercase hex digits on every route, anything else is a 404 that reaches nothing;
# list offsets bounded


@pytest.mark.parametrize(("method", "suffix"), JOB_ROUTES)
@pytest.mark.parametrize(
    "job_id",
    ["0" * 10_000, "0123456789ABCDEF" * 2, "0123456789abcdef" * 2 + "0", "%2e%2e", "x y", "a" * 32 + "%0A"],
    ids=["10000-chars", "upper-case", "33-chars", "encoded-dotdot", "space", "newline"],
)
def test_ids_not_of_the_job_id_format_are_404(
    client: TestClient, store: JobStore, settings: Settings, method: str, suffix: str, job_id: str
) -> None:
    """A 10 000-character id gave a 500 (file name too long in local storage)."""
    path = f"/v1/jobs/{job_id}{suffix}"
    resp = client.request(method, path)
    assert resp.status_code == 404 and resp.headers["content-type"] == PROBLEM
    assert resp.json()["detail"] == "job not found (ids are 32 lowercase hex digits)"
    assert nothing_stored(store, settings)


@pytest.mark.parametrize(("method", "suffix"), JOB_ROUTES)
@pytest.mark.parametrize("part", ["prog", "pairs", "done", "lock", "lease:0"])
def test_ids_cannot_reach_another_redis_key(
    client: TestClient, store: JobStore, method: str, suffix: str, part: str
) -> None:
    """``ID:prog`` named the job's progress hash: a WRONGTYPE 500, or worse, another key."""
    job = client.post("/v1/jobs", json={"count": 2}).json()
    store.shard_progress(job["id"], 0, 2, 1)
    store.put_pair(job["id"], name="p", index=0, seed=1, dice_loss=0.0, image_png=b"i", mask_png=b"m")
    resp = client.request(method, f"/v1/jobs/{job['id']}:{part}{suffix}")
    assert resp.status_code == 404 and resp.headers["content-type"] == PROBLEM
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # untouched


def test_an_offset_past_64_bits_is_a_422_not_a_500(client: TestClient) -> None:
    resp = client.get("/v1/jobs", params={"offset": 9223372036854775808})
    (error,) = assert_problem(resp, 422, "/v1/jobs")["errors"]
    assert error["parameter"] == "offset" and error["loc"] == ["query", "offset"]
    assert client.get("/v1/jobs", params={"offset": 1_000_000}).status_code == 200
    assert client.get("/v1/jobs", params={"offset": 1_000_001}).status_code == 422


# ---- the body limit (413) and the content type (415)


def test_a_body_over_the_limit_is_413_with_content_length(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    assert settings.max_body_bytes == 65_536  # the default
    body = b'{"count": 1, "pad": "' + b"x" * 70_000 + b'"}'
    assert_problem(
        client.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 413, "/v1/jobs"
    )
    assert nothing_stored(store, settings)
    # just under the limit is read (whitespace is valid JSON)
    ok = b'{"count": 1}' + b" " * (65_536 - 12)
    assert (
        client.post("/v1/jobs", content=ok, headers={"content-type": "application/json"}).status_code == 202
    )


def test_a_body_over_the_limit_is_refused_before_a_route_that_ignores_it(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"count": 1}).json()
    resp = client.request("DELETE", f"/v1/jobs/{job['id']}", content=b"x" * 100_000)
    assert_problem(resp, 413, f"/v1/jobs/{job['id']}")
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200  # the DELETE did not run


def test_a_chunked_body_over_the_limit_is_413(
    client: TestClient, store: JobStore, settings: Settings
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"count": 1, "pad": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    resp = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_problem(resp, 413, "/v1/jobs")
    assert nothing_stored(store, settings)


def test_an_endless_stream_is_cut_at_the_limit(settings_factory: Callable[..., Settings]) -> None:
    """At the ASGI level: the API stops reading once the limit is passed, whatever comes next."""
    app = create_app(settings_factory(max_body_bytes=10_000), enqueue=Enqueued())
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        assert read < 1000, "the API kept reading past the limit"
        return {"type": "http.request", "body": b" " * 1024, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    assert read == 10  # 10 KiB read, the eleventh chunk was never asked for... nor more
    assert sent[0]["status"] == 413
    assert dict(sent[0]["headers"])[b"content-type"] == PROBLEM.encode()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
def test_a_body_that_is_not_json_is_415(
    client: TestClient, store: JobStore, settings: Settings, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = client.post("/v1/jobs", content=b'{"count": 1}', headers=headers)
    assert_problem(resp, 415, "/v1/jobs")
    assert resp.headers["accept-post"] == "application/json"
    assert nothing_stored(store, settings)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_are_accepted(client: TestClient, content_type: str) -> None:
    resp = client.post("/v1/jobs", content=b'{"count": 1}', headers={"content-type": content_type})
    assert resp.status_code == 202


# ---- the OpenAPI document states all of this


def test_openapi_documents_the_problems_of_every_route(client: TestClient, settings: Settings) -> None:
    doc = client.get("/openapi.json").json()
    expected = {
        ("post", "/v1/jobs"): {"400", "409", "413", "415", "422", "429", "503"},
        ("get", "/v1/jobs"): {"422", "503"},
        ("get", "/v1/jobs/{job_id}"): {"404", "503"},
        ("post", "/v1/jobs/{job_id}/cancel"): {"404", "409", "503"},
        ("delete", "/v1/jobs/{job_id}"): {"404", "503"},
        ("get", "/v1/jobs/{job_id}/pairs.zip"): {"404", "409", "422", "503"},
        ("get", "/v1/jobs/{job_id}/download"): {"404", "409", "422", "503"},
        ("get", "/v1/models"): {"503"},  # the registry's index is in Redis, its manifests in storage
        ("get", "/v1/models/{name}"): {"404", "503"},
        ("get", "/v1/models/{name}/{version}"): {"404", "503"},
        ("delete", "/v1/models/{name}"): {"404", "409", "503"},
        ("delete", "/v1/models/{name}/{version}"): {"404", "409", "503"},
        ("post", "/v1/models/{name}/versions"): {"400", "409", "413", "415", "422", "503"},
        ("post", "/v1/keys"): {"400", "403", "409", "413", "415", "422", "429", "503"},
        ("get", "/v1/keys"): {"403", "503"},
        ("delete", "/v1/keys/{name}"): {"403", "404", "422", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = doc["paths"][path][method]["responses"]
        errors = {s for s in responses if s >= "400"}
        assert errors == statuses | {"401", "429"}, (method, path, errors)  # every /v1 route needs a key
        for status in errors:
            assert responses[status]["content"] == {
                PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert {"type", "title", "status", "detail", "instance", "errors"} <= set(
        schemas["Problem"]["properties"]
    )
    job_id = doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]
    assert job_id["name"] == "job_id" and job_id["schema"]["pattern"] == "^[0-9a-f]{32}$"
    # the bounds the running service enforces, from its settings and bundles
    props = schemas["JobCreate"]["properties"]
    assert props["count"]["maximum"] == settings.max_count == 50
    assert {"type": "integer", "minimum": 1, "maximum": 50}.items() <= props["steps"]["anyOf"][0].items()
    assert props["max_attempts"]["anyOf"][0]["maximum"] == 20 * 50
    # examples, not an enum: a key's own models and NAME@VERSION are valid too
    assert props["model"]["anyOf"][0]["examples"] == [settings.default_model]
    assert "enum" not in props["model"]["anyOf"][0]
    assert props["tau"]["anyOf"][0]["minimum"] == 0.05
    assert json.dumps(doc).count("application/problem+json") >= 20


# ---- /readyz names no host, bucket or exception text


def test_readyz_names_no_host_when_redis_is_down(settings_factory: Callable[..., Settings]) -> None:
    app = create_app(settings_factory(redis_url="redis://127.0.0.1:1/0"), enqueue=Enqueued())
    with TestClient(app, headers=ADMIN_HEADERS) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["redis"] == {"ok": False, "detail": "unreachable"}
    assert checks["workers"] == {"ok": False, "detail": "unreachable"}
    assert "127.0.0.1" not in resp.text and "Error" not in resp.text


def test_readyz_names_no_endpoint_when_storage_is_down(settings_factory: Callable[..., Settings]) -> None:
    """It answered repr(exc), which named the S3 endpoint."""
    settings = settings_factory(
        storage_backend="s3",
        s3_endpoint_url="http://127.0.0.1:1",
        s3_bucket="secret-bucket",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    with TestClient(create_app(settings, enqueue=Enqueued()), headers=ADMIN_HEADERS) as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage"] == {"ok": False, "detail": "unreachable"}
    assert "127.0.0.1" not in ready.text and "secret-bucket" not in ready.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs?limt=5",
        "/v1/datasets?bogus=1",
        "/v1/jobs/" + "a" * 32 + "/pairs.zip?fromat=nnunet",
        "/v1/models?=x",
    ],
)
def test_an_unknown_query_parameter_is_a_422_naming_it(client: TestClient, path: str) -> None:
    """A typo like ``?fromat=nnunet`` used to be ignored silently (and the plain zip downloaded)."""
    resp = client.get(path)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert errors[0]["type"] == "extra_forbidden" and "unknown query parameter" in errors[0]["detail"]


def test_the_openapi_document_is_served_while_redis_is_down(settings_factory: Any) -> None:
    """It lists the shared models from the registry's Redis index: with Redis down it was a 503, and
    /docs was blank."""
    app = create_app(settings_factory(redis_url="redis://127.0.0.1:1/0"), enqueue=lambda *a: None)
    resp = TestClient(app).get("/openapi.json")  # no lifespan: nothing else touches Redis
    assert resp.status_code == 200 and "/v1/jobs" in resp.json()["paths"]
