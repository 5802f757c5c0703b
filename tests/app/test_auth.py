"""API keys: bearer auth on /v1, the admin key, ownership, quotas, revocation, CORS, and the start-up
checks. Real redis-server and local storage in tmp, as everywhere in tests/app."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core.config import Settings
from app.main import UnsafeConfig, create_app
from app.store import JobStore
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY
from tests.integration.servers import wait_for

ZERO_ID = "0123456789abcdef0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(admin: TestClient, name: str, **limits: int) -> str:
    resp = admin.post("/v1/keys", json={"name": name, **limits})
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key


@pytest.fixture()
def anon(client: TestClient) -> Iterator[TestClient]:
    """The same app as ``client``, sending no key unless a request says so."""
    with TestClient(client.app) as c:
        yield c


def flush_prefix(store: JobStore, settings: Settings) -> int:
    keys = list(store.r.scan_iter(f"{settings.redis_prefix}:*"))
    if keys:
        store.r.delete(*keys)
    return len(keys)


# ---- authentication


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{ZERO_ID}"), ("GET", "/v1/models"),
     ("GET", "/v1/keys"), ("POST", "/v1/keys"), ("DELETE", "/v1/keys/a")],
)  # fmt: skip
def test_v1_needs_a_valid_bearer_key(client: TestClient, anon: TestClient, method: str, path: str) -> None:
    revoked = new_key(client, "gone")
    assert client.delete("/v1/keys/gone").status_code == 204
    for headers in (
        {},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        bearer("dx_garbage"),
        bearer(ADMIN_KEY + "x"),
        bearer(revoked),
        {"Authorization": "Bearer ключ".encode()},  # type: ignore[dict-item]
    ):
        resp = anon.request(method, path, headers=headers, json={"count": 1, "name": "x"})
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.headers["www-authenticate"].startswith("Bearer"), headers


def test_health_probes_need_no_key(anon: TestClient) -> None:
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/readyz").status_code == 503  # no worker here; but not 401


def test_only_the_admin_manages_keys(client: TestClient, anon: TestClient) -> None:
    a = bearer(new_key(client, "a"))
    assert anon.get("/v1/models", headers=a).status_code == 200  # the key works
    assert anon.get("/v1/keys", headers=a).status_code == 403
    assert anon.post("/v1/keys", headers=a, json={"name": "b"}).status_code == 403
    assert anon.delete("/v1/keys/a", headers=a).status_code == 403
    assert [k["name"] for k in client.get("/v1/keys").json()["data"]] == ["a"]


def test_keys_are_shown_once_and_stored_as_hashes(
    client: TestClient, anon: TestClient, settings: Settings
) -> None:
    resp = client.post(
        "/v1/keys",
        json={"name": "lab-1", "max_active_jobs": 3, "pairs_per_day": 40, "requests_per_second": 5},
    )
    assert resp.status_code == 201
    created = resp.json()
    key = created["key"]
    assert key.startswith("dx_") and len(key) >= 40
    assert created["name"] == "lab-1" and created["max_active_jobs"] == 3 and created["pairs_per_day"] == 40
    digest = hashlib.sha256(key.encode()).hexdigest()
    stored = (settings.storage_dir / "keys/lab-1/key.json").read_text()
    assert json.loads(stored)["hash"] == digest and key not in stored

    listing = client.get("/v1/keys")
    (item,) = listing.json()["data"]
    assert item == {
        "name": "lab-1",
        "max_active_jobs": 3,
        "pairs_per_day": 40,
        "requests_per_second": 5,
        "id": created["id"],
        "created_at": created["created_at"],
    }
    assert key not in listing.text and digest not in listing.text
    assert anon.get("/v1/jobs", headers=bearer(key)).status_code == 200
    # defaults for limits left out
    assert client.post("/v1/keys", json={"name": "lab-2"}).json()["max_active_jobs"] >= 1


@pytest.mark.parametrize("name", ["A", "-a", "_a", "a b", "a.b", "a" * 65, "admin", "", "ä"])
def test_bad_key_names_are_refused(client: TestClient, name: str) -> None:
    assert client.post("/v1/keys", json={"name": name}).status_code == 422
    assert client.get("/v1/keys").json()["data"] == []


def test_duplicate_names_409_and_unknown_names_404(client: TestClient, anon: TestClient) -> None:
    first = new_key(client, "dup")
    assert client.post("/v1/keys", json={"name": "dup"}).status_code == 409
    assert anon.get("/v1/models", headers=bearer(first)).status_code == 200  # the first key still works
    assert client.delete("/v1/keys/nobody").status_code == 404
    assert client.delete("/v1/keys/..").status_code in (404, 422)


def test_a_revoked_key_fails_at_once_on_every_api_process(
    client: TestClient, settings: Settings, enqueued: Enqueued
) -> None:
    key = new_key(client, "a")
    with TestClient(create_app(settings, enqueue=enqueued), headers=bearer(key)) as other:
        assert other.get("/v1/jobs").status_code == 200  # its cache is warm
        assert client.delete("/v1/keys/a").status_code == 204
        assert other.get("/v1/jobs").status_code == 401
    assert client.get("/v1/keys").json()["data"] == []
    assert not (settings.storage_dir / "keys/a").exists()


def test_revoking_a_key_cancels_its_queued_and_running_jobs(
    client: TestClient, anon: TestClient, store: JobStore
) -> None:
    a = bearer(new_key(client, "a", max_active_jobs=5))
    queued = anon.post("/v1/jobs", headers=a, json={"count": 2}).json()["id"]
    running = anon.post("/v1/jobs", headers=a, json={"count": 2}).json()["id"]
    store.mark_running(running)
    finished = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()["id"]
    store.put_pair(finished, name="p0", index=0, seed=1, dice_loss=0.1, image_png=b"i", mask_png=b"m")
    store.finish_shard(finished, 0, 1, [0])
    mine = client.post("/v1/jobs", json={"count": 2}).json()["id"]  # the admin's job

    assert client.delete("/v1/keys/a").status_code == 204
    for job_id in (queued, running):
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
        assert store.stop_reason(job_id) == "canceled"  # the workers stop
    assert client.get(f"/v1/jobs/{finished}").json()["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{mine}").json()["status"] == "queued"
    assert anon.get("/v1/jobs", headers=a).status_code == 401


def test_keys_survive_a_redis_flush(
    client: TestClient, anon: TestClient, store: JobStore, settings: Settings
) -> None:
    a = bearer(new_key(client, "a"))
    b = bearer(new_key(client, "b"))
    assert anon.get("/v1/models", headers=a).status_code == 200
    assert flush_prefix(store, settings) > 0
    assert store.r.keys(f"{settings.redis_prefix}:*") == []
    assert anon.get("/v1/models", headers=a).status_code == 200  # reloaded from storage
    assert anon.get("/v1/models", headers=bearer("dx_garbage")).status_code == 401
    assert client.delete("/v1/keys/b").status_code == 204  # revocation works on the rebuilt cache
    assert anon.get("/v1/models", headers=b).status_code == 401
    assert anon.get("/v1/models", headers=a).status_code == 200
    assert [k["name"] for k in client.get("/v1/keys").json()["data"]] == ["a"]


def test_a_stale_cache_entry_never_authenticates_a_revoked_key(
    client: TestClient, anon: TestClient, store: JobStore, settings: Settings
) -> None:
    old = new_key(client, "a")
    digest = hashlib.sha256(old.encode()).hexdigest()
    assert client.delete("/v1/keys/a").status_code == 204
    new = new_key(client, "a")  # the same name again, another key
    store.r.hset(f"{settings.redis_prefix}:auth:hash", digest, "a")  # a stale hash -> name entry
    assert anon.get("/v1/models", headers=bearer(old)).status_code == 401
    assert anon.get("/v1/models", headers=bearer(new)).status_code == 200


# ---- ownership

JOB_ROUTES = [
    ("GET", ""),
    ("POST", "/cancel"),
    ("DELETE", ""),
    ("GET", "/pairs.zip?partial=true"),
    ("GET", "/download"),
    ("GET", "/events"),
]


@pytest.fixture()
def two_keys(client: TestClient) -> tuple[dict[str, str], dict[str, str]]:
    return bearer(new_key(client, "a", max_active_jobs=5)), bearer(new_key(client, "b", max_active_jobs=5))


@pytest.mark.parametrize(("method", "path"), JOB_ROUTES)
def test_another_keys_job_is_404_on_every_route(
    client: TestClient,
    anon: TestClient,
    store: JobStore,
    two_keys: tuple[dict[str, str], dict[str, str]],
    method: str,
    path: str,
) -> None:
    a, b = two_keys
    job = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()
    assert job["owner"] == "a"
    store.put_pair(job["id"], name="p0", index=0, seed=1, dice_loss=0.1, image_png=b"i", mask_png=b"m")
    store.finish_shard(job["id"], 0, 1, [0])  # a finished job: every route has something to answer
    url = f"/v1/jobs/{job['id']}{path}"

    resp = anon.request(method, url, headers=b)
    assert resp.status_code == 404
    assert resp.json()["detail"] == f"job {job['id']} not found"  # the same answer as for no such job
    assert anon.request(method, f"/v1/jobs/{ZERO_ID}{path}", headers=b).json()["detail"] == (
        f"job {ZERO_ID} not found"
    )
    assert store.get(job["id"])["status"] == "succeeded"  # B's cancel or delete did nothing

    expected = {"GET": 200, "POST": 409, "DELETE": 204}[method]  # cancel: 409, the job is finished
    if path == "/download":
        expected = 307
    owner = anon.request(method, url, headers=a, follow_redirects=False)
    assert owner.status_code == expected, owner.text
    if method == "DELETE":  # once more, as the admin, on a fresh job of A
        job = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()
        url = f"/v1/jobs/{job['id']}{path}"
        expected = 204
    elif method == "POST":
        job = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()
        url = f"/v1/jobs/{job['id']}{path}"
        expected = 200  # the admin may cancel A's queued job
    assert client.request(method, url, follow_redirects=False).status_code == expected


def test_lists_show_a_key_its_own_jobs_and_the_admin_all(
    client: TestClient, anon: TestClient, two_keys: tuple[dict[str, str], dict[str, str]]
) -> None:
    a, b = two_keys
    ja = [anon.post("/v1/jobs", headers=a, json={"count": 1}).json()["id"] for _ in range(2)]
    jb = anon.post("/v1/jobs", headers=b, json={"count": 1}).json()["id"]
    jadmin = client.post("/v1/jobs", json={"count": 1}).json()["id"]

    def ids(headers: dict[str, str]) -> tuple[list[str], int]:
        body = anon.get("/v1/jobs", headers=headers).json()
        return [j["id"] for j in body["data"]], body["count"]

    assert ids(a) == (ja[::-1], 2)
    assert ids(b) == ([jb], 1)
    assert ids(bearer(ADMIN_KEY)) == ([jadmin, jb, *ja[::-1]], 4)
    owners = {j["id"]: j["owner"] for j in client.get("/v1/jobs").json()["data"]}
    assert owners == {ja[0]: "a", ja[1]: "a", jb: "b", jadmin: "admin"}
    page = anon.get("/v1/jobs", headers=a, params={"limit": 1, "offset": 1}).json()
    assert [j["id"] for j in page["data"]] == [ja[0]] and page["count"] == 2
    assert anon.delete(f"/v1/jobs/{ja[0]}", headers=a).status_code == 204
    assert ids(a) == ([ja[1]], 1)


def test_idempotency_keys_are_per_api_key(
    anon: TestClient, two_keys: tuple[dict[str, str], dict[str, str]]
) -> None:
    a, b = two_keys
    body = {"count": 1, "seed": 3}
    ja = anon.post("/v1/jobs", headers={**a, "Idempotency-Key": "same"}, json=body).json()
    jb = anon.post("/v1/jobs", headers={**b, "Idempotency-Key": "same"}, json=body).json()
    assert ja["id"] != jb["id"] and (ja["owner"], jb["owner"]) == ("a", "b")
    again = anon.post("/v1/jobs", headers={**a, "Idempotency-Key": "same"}, json=body).json()
    assert again["id"] == ja["id"]


# ---- quotas


def assert_429(resp: Any, limit: str) -> int:
    assert resp.status_code == 429, resp.text
    assert limit in resp.json()["detail"]
    retry_after = int(resp.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def test_max_active_jobs(client: TestClient, anon: TestClient, store: JobStore) -> None:
    a = bearer(new_key(client, "a", max_active_jobs=2, pairs_per_day=100))
    first = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()["id"]
    second = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()["id"]
    store.mark_running(second)
    assert_429(anon.post("/v1/jobs", headers=a, json={"count": 1}), "max_active_jobs")
    assert anon.get("/v1/jobs", headers=a).json()["count"] == 2  # the refused job was not stored
    # another key and the admin are not held back by A's jobs
    assert client.post("/v1/jobs", json={"count": 1}).status_code == 202
    assert anon.post("/v1/jobs", headers=bearer(new_key(client, "b")), json={"count": 1}).status_code == 202
    # a finished job frees a place: canceled here, succeeded below
    assert anon.post(f"/v1/jobs/{first}/cancel", headers=a).status_code == 200
    third = anon.post("/v1/jobs", headers=a, json={"count": 1})
    assert third.status_code == 202
    assert_429(anon.post("/v1/jobs", headers=a, json={"count": 1}), "max_active_jobs")
    store.put_pair(second, name="p0", index=0, seed=1, dice_loss=0.1, image_png=b"i", mask_png=b"m")
    store.finish_shard(second, 0, 1, [0])
    assert anon.post("/v1/jobs", headers=a, json={"count": 1}).status_code == 202


def test_pairs_per_day(client: TestClient, anon: TestClient) -> None:
    a = bearer(new_key(client, "a", max_active_jobs=10, pairs_per_day=5))
    assert anon.post("/v1/jobs", headers=a, json={"count": 3}).status_code == 202
    retry = assert_429(anon.post("/v1/jobs", headers=a, json={"count": 3}), "pairs_per_day")
    assert retry <= 86_401  # at most until the next UTC midnight
    assert anon.post("/v1/jobs", headers=a, json={"count": 2}).status_code == 202  # refused pairs not counted
    assert_429(anon.post("/v1/jobs", headers=a, json={"count": 1}), "pairs_per_day")
    too_big = anon.post("/v1/jobs", headers=bearer(new_key(client, "b", pairs_per_day=5)), json={"count": 6})
    assert too_big.status_code == 422 and "pairs_per_day" in too_big.json()["detail"]


def test_a_replayed_idempotent_request_is_not_charged(client: TestClient, anon: TestClient) -> None:
    a = bearer(new_key(client, "a", max_active_jobs=1, pairs_per_day=4))
    headers = {**a, "Idempotency-Key": "retry-me"}
    first = anon.post("/v1/jobs", headers=headers, json={"count": 3})
    for _ in range(3):  # at both limits now, yet the replay answers the same job
        again = anon.post("/v1/jobs", headers=headers, json={"count": 3})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert anon.post("/v1/jobs", headers=headers, json={"count": 2}).status_code == 409
    assert_429(anon.post("/v1/jobs", headers=a, json={"count": 1}), "max_active_jobs")


def test_requests_per_second(client: TestClient, anon: TestClient) -> None:
    a = bearer(new_key(client, "a", requests_per_second=3))
    codes = []
    for _ in range(20):  # a fixed one-second window: 20 quick requests span a few windows at most
        resp = anon.get("/v1/models", headers=a)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            assert assert_429(resp, "requests_per_second") == 1
    assert codes.count(429) >= 1 and set(codes) == {200, 429}, codes
    # the next window lets requests through again (polled: the current one ends within a second)
    wait_for(lambda: anon.get("/v1/models", headers=a).status_code == 200, 5, "the next one-second window")
    # the admin has no limits
    assert all(client.get("/v1/models").status_code == 200 for _ in range(12))


# ---- settings and start-up


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "api.example.org"])
def test_auth_off_is_refused_off_loopback(settings_factory: Callable[..., Settings], host: str) -> None:
    with pytest.raises(UnsafeConfig, match="loopback"):
        create_app(settings_factory(auth="off", host=host), enqueue=lambda *a: None)
    create_app(settings_factory(auth="required", host=host), enqueue=lambda *a: None)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_auth_off_on_loopback_needs_no_key(settings_factory: Callable[..., Settings], host: str) -> None:
    app = create_app(settings_factory(auth="off", host=host, admin_key=None), enqueue=lambda *a: None)
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"count": 1}).json()
        assert job["owner"] == "admin"
        assert c.get("/v1/jobs").json()["count"] == 1


def test_admin_key_from_a_file(settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    path.write_text("from-a-file-0123456789\n")
    app = create_app(settings_factory(admin_key=None, admin_key_file=path), enqueue=lambda *a: None)
    with TestClient(app) as c:
        assert c.get("/v1/keys", headers=bearer("from-a-file-0123456789")).status_code == 200
        assert c.get("/v1/keys", headers=bearer(ADMIN_KEY)).status_code == 401
    with pytest.raises(UnsafeConfig, match="not both"):
        create_app(settings_factory(admin_key_file=path), enqueue=lambda *a: None)
    with pytest.raises(UnsafeConfig, match="at least 16"):
        create_app(settings_factory(admin_key="short"), enqueue=lambda *a: None)
    with pytest.raises(UnsafeConfig, match="ADMIN_KEY_FILE"):
        create_app(
            settings_factory(admin_key=None, admin_key_file=tmp_path / "nope"), enqueue=lambda *a: None
        )


def test_without_an_admin_key_stored_keys_still_work(
    client: TestClient, settings: Settings, settings_factory: Callable[..., Settings]
) -> None:
    key = new_key(client, "a")
    app = create_app(
        settings_factory(admin_key=None, redis_prefix=settings.redis_prefix), enqueue=lambda *a: None
    )
    with TestClient(app) as c:
        assert c.get("/v1/models", headers=bearer(key)).status_code == 200
        assert c.get("/v1/keys", headers=bearer(ADMIN_KEY)).status_code == 401


def test_presigned_urls_live_minutes(settings_factory: Callable[..., Settings]) -> None:
    assert settings_factory().s3_presign_expiry_s == 300
    assert settings_factory(s3_presign_expiry_s=3600).s3_presign_expiry_s == 3600
    with pytest.raises(ValidationError, match="less than or equal to 3600"):
        settings_factory(s3_presign_expiry_s=3601)


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_no_cors_headers_unless_origins_are_configured(client: TestClient) -> None:
    origin = {"Origin": "https://a.example"}
    assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
    assert (
        "access-control-allow-origin"
        not in client.options("/v1/jobs", headers={**origin, **PREFLIGHT}).headers
    )


def test_cors_for_the_configured_origins(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(cors_origins="https://a.example, https://b.example")
    with TestClient(create_app(settings, enqueue=lambda *a: None)) as c:
        pre = c.options("/v1/jobs", headers={"Origin": "https://b.example", **PREFLIGHT})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://b.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        evil = c.options("/v1/jobs", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert "access-control-allow-origin" not in evil.headers
        # a real request still needs its key; the browser may read the 401
        resp = c.get("/v1/models", headers={"Origin": "https://a.example"})
        assert resp.status_code == 401 and resp.headers["access-control-allow-origin"] == "https://a.example"
        ok = c.get("/v1/models", headers={"Origin": "https://a.example", **bearer(ADMIN_KEY)})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://a.example"


# ---- make serve


def test_make_serve_writes_an_admin_key_once(
    settings_factory: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.serve import admin_key_setup

    monkeypatch.chdir(tmp_path)
    env: dict[str, str] = {}
    line = admin_key_setup(settings_factory(admin_key=None), "127.0.0.1", tmp_path / "var", env)
    path = tmp_path / "var" / "admin.key"
    key = path.read_text().strip()
    assert len(key) >= 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "var/admin.key" in line
    assert env == {"DIFFEXP_HOST": "127.0.0.1", "DIFFEXP_ADMIN_KEY_FILE": str(path)}
    admin_key_setup(settings_factory(admin_key=None), "127.0.0.1", tmp_path / "var", env)
    assert path.read_text().strip() == key  # kept across runs
    # the API takes it from there
    settings = settings_factory(admin_key=None, admin_key_file=Path(env["DIFFEXP_ADMIN_KEY_FILE"]))
    with TestClient(create_app(settings, enqueue=lambda *a: None)) as c:
        assert c.get("/v1/keys", headers=bearer(key)).status_code == 200


def test_make_serve_with_a_configured_key_or_auth_off(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    from app.serve import admin_key_setup

    env: dict[str, str] = {}
    assert "DIFFEXP_ADMIN_KEY" in admin_key_setup(settings_factory(), "127.0.0.1", tmp_path, env)
    assert env == {"DIFFEXP_HOST": "127.0.0.1"} and not (tmp_path / "admin.key").exists()
    off = settings_factory(auth="off", admin_key=None)
    assert "auth is OFF" in admin_key_setup(off, "127.0.0.1", tmp_path, {})
    with pytest.raises(SystemExit, match="refused"):
        admin_key_setup(off, "0.0.0.0", tmp_path, {})


def test_a_keys_jobs_are_its_own_again_after_redis_lost_its_data(
    client: TestClient, anon: TestClient, store: JobStore, settings: Settings
) -> None:
    from app.reconciler import sweep

    a = bearer(new_key(client, "a", max_active_jobs=1))
    b = bearer(new_key(client, "b"))
    job = anon.post("/v1/jobs", headers=a, json={"count": 1}).json()["id"]
    flush_prefix(store, settings)
    sweep(store)  # rebuilds the job lists from the records in storage
    assert [j["id"] for j in anon.get("/v1/jobs", headers=a).json()["data"]] == [job]
    assert anon.get("/v1/jobs", headers=b).json()["count"] == 0
    assert anon.get(f"/v1/jobs/{job}", headers=b).status_code == 404
    assert_429(anon.post("/v1/jobs", headers=a, json={"count": 1}), "max_active_jobs")  # still counted


# ---- identities outlive names (issue 20, item 3)


def dataset_zip() -> bytes:
    from tests.utils.archives import shapes_members, zip_bytes

    return zip_bytes(shapes_members(8, size=16))


def test_a_new_key_under_a_revoked_keys_name_owns_nothing_of_it(
    client: TestClient, anon: TestClient, tiny_bundle: Path
) -> None:
    from tests.app.test_registry import push

    old = bearer(new_key(client, "a", max_active_jobs=5))
    job = anon.post("/v1/jobs", headers=old, json={"count": 1}).json()["id"]
    resp = anon.post("/v1/datasets", headers=old, files={"file": ("d.zip", dataset_zip())})
    assert resp.status_code == 201, resp.text
    dataset = resp.json()["id"]
    assert push(anon, tiny_bundle, "mine", headers=old).status_code == 201
    assert client.delete("/v1/keys/a").status_code == 204

    new = bearer(new_key(client, "a"))
    ids = {k["name"]: k["id"] for k in client.get("/v1/keys").json()["data"]}
    assert ids["a"].startswith("k.") and client.get(f"/v1/jobs/{job}").json()["owner"] == "a"
    assert anon.get(f"/v1/jobs/{job}", headers=new).status_code == 404
    assert anon.get("/v1/jobs", headers=new).json()["count"] == 0
    assert anon.get(f"/v1/datasets/{dataset}", headers=new).status_code == 404
    assert anon.get("/v1/datasets", headers=new).json()["count"] == 0
    assert anon.get("/v1/models/mine", headers=new).status_code == 404
    assert push(anon, tiny_bundle, "mine", headers=new).status_code == 409  # the old key's name
    # the admin still sees what the old key made, under its name
    assert client.get(f"/v1/jobs/{job}").json()["owner"] == "a"
    assert client.get(f"/v1/datasets/{dataset}").json()["owner"] == "a"
    # the new key's own things are its own
    mine = anon.post("/v1/jobs", headers=new, json={"count": 1}).json()["id"]
    assert [j["id"] for j in anon.get("/v1/jobs", headers=new).json()["data"]] == [mine]


def test_records_from_before_key_ids_stay_their_keys(
    client: TestClient, anon: TestClient, store: JobStore, settings: Settings
) -> None:
    """A key stored before ids has its name as its id: its records (``owner`` only) stay its own; a
    key made later under that name, after a revocation, does not get them."""
    from app.params import JobParams

    key = new_key(client, "legacy")
    path = settings.storage_dir / "keys/legacy/key.json"
    rec = json.loads(path.read_text())
    del rec["id"]
    path.write_text(json.dumps(rec))  # as stored by the version before ids
    store.r.delete(f"{settings.redis_prefix}:auth:key:legacy")  # the cache reads it again
    params = client.post("/v1/jobs", json={"count": 1}).json()["params"]
    job, _ = store.create(body={"count": 1}, params=JobParams.model_validate(params), owner="legacy")
    stored = json.loads((settings.storage_dir / f"jobs/{job['id']}/job.json").read_text())
    stored.pop("owner_id", None)  # a record from before ids names its owner only
    store._save(stored)
    assert anon.get(f"/v1/jobs/{job['id']}", headers=bearer(key)).status_code == 200
    assert client.get("/v1/keys").json()["data"][0]["id"] == "legacy"  # its name is its id
    assert [j["id"] for j in anon.get("/v1/jobs", headers=bearer(key)).json()["data"]] == [job["id"]]
    assert client.delete("/v1/keys/legacy").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"  # revocation reached it
    again = bearer(new_key(client, "legacy"))
    assert anon.get(f"/v1/jobs/{job['id']}", headers=again).status_code == 404
    assert anon.get("/v1/jobs", headers=again).json()["count"] == 0


def test_revoking_a_key_cancels_its_trainings(settings: Settings, enqueued: Enqueued) -> None:
    sent: list[tuple[str, str]] = []
    app = create_app(settings, enqueue=enqueued, train_enqueue=lambda i, q: sent.append((i, q)))
    with TestClient(app, headers=ADMIN_HEADERS) as client:
        a = bearer(new_key(client, "a"))
        resp = client.post("/v1/datasets", headers=a, files={"file": ("d.zip", dataset_zip())})
        dataset = resp.json()["id"]
        body = {"dataset": dataset, "name": "a-model", "resolution": 16, "train_steps": 2}
        resp = client.post("/v1/models", headers=a, json=body)
        assert resp.status_code == 202, resp.text
        training = resp.json()["id"]
        mine = client.post("/v1/datasets", files={"file": ("d.zip", dataset_zip())}).json()["id"]
        theirs = client.post("/v1/models", json={**body, "dataset": mine, "name": "admin-model"}).json()
        assert client.delete("/v1/keys/a").status_code == 204
        got = client.get(f"/v1/trainings/{training}").json()
        assert got["status"] == "canceled" and "revoked" in got["error"]
        assert app.state.trainings.stopped(training)  # its worker stops
        assert client.get(f"/v1/trainings/{theirs['id']}").json()["status"] == "queued"
        assert client.delete(f"/v1/datasets/{dataset}").status_code == 204  # released


# ---- failed authentication, limited per address (issue 20, item 6)


def test_failed_authentication_is_limited_per_client_address(
    settings_factory: Callable[..., Settings], enqueued: Enqueued
) -> None:
    settings = settings_factory(auth_fail_burst=3, auth_fail_rate=0.01, auth_fail_hold_s=0.2)
    app = create_app(settings, enqueue=enqueued)
    with (
        TestClient(app, headers=ADMIN_HEADERS) as admin,
        TestClient(app, client=("203.0.113.7", 4000)) as attacker,
        TestClient(app, client=("198.51.100.9", 4000)) as elsewhere,
    ):
        known = bearer(new_key(admin, "known"))
        assert attacker.get("/v1/jobs", headers=known).status_code == 200  # authenticated once here
        fresh = bearer(new_key(admin, "fresh"))  # never used from the attacker's address
        bogus = ["dx_" + "A" * 43, "nonsense", None]
        for key in bogus:  # a wrong key of the right shape, a malformed one, none at all
            resp = attacker.get("/v1/jobs", headers=bearer(key) if key else {})
            assert resp.status_code == 401, resp.text
        started = time.monotonic()
        resp = attacker.get("/v1/jobs", headers=bearer("dx_" + "B" * 43))
        assert time.monotonic() - started >= 0.2  # held: a client that ignores Retry-After slows down
        assert resp.status_code == 429 and resp.headers["content-type"] == "application/problem+json"
        assert int(resp.headers["retry-after"]) >= 1 and "failed authentications" in resp.json()["detail"]
        assert attacker.post("/v1/jobs", json={"count": 1}).status_code == 429  # no key: blocked too
        # the address's known-good keys and the admin key still pass; a key new to it waits
        assert attacker.get("/v1/jobs", headers=known).status_code == 200
        assert attacker.get("/v1/jobs", headers=ADMIN_HEADERS).status_code == 200
        assert attacker.get("/v1/jobs", headers=fresh).status_code == 429
        # other addresses are not concerned
        assert elsewhere.get("/v1/jobs", headers=fresh).status_code == 200
        assert elsewhere.get("/v1/jobs", headers=bearer("dx_" + "C" * 43)).status_code == 401
        assert attacker.get("/healthz").status_code == 200  # outside /v1: no key, no limit


def test_a_malformed_key_is_refused_without_a_lookup(client: TestClient, anon: TestClient) -> None:
    keys: Any = client.app.state.keys  # type: ignore[attr-defined]
    looked_up: list[str] = []
    real = keys.lookup
    keys.lookup = lambda key: looked_up.append(key) or real(key)
    try:
        for key in ("x", "dx_short", "dx_" + "!" * 43, "dx_" + "A" * 44):
            assert anon.get("/v1/models", headers=bearer(key)).status_code == 401
        assert looked_up == []
        assert anon.get("/v1/models", headers=bearer("dx_" + "A" * 43)).status_code == 401
        assert looked_up == ["dx_" + "A" * 43]
    finally:
        keys.lookup = real


def test_the_failure_buckets_refill_and_group_ipv6_by_64() -> None:
    from app.authlimit import FailureLimiter, client_address

    limiter = FailureLimiter(2, 0.5, max_addresses=3)
    for _ in range(2):
        assert limiter.retry_after("a", now=0.0) is None
        limiter.fail("a", now=0.0)
    assert limiter.retry_after("a", now=0.0) == 2  # one token in 2 s
    assert limiter.retry_after("a", now=1.0) == 1
    assert limiter.retry_after("a", now=2.0) is None
    for address in ("b", "c", "d"):  # past max_addresses: refilled then oldest buckets go
        limiter.fail(address, now=100.0)
    assert len(limiter._buckets) <= 3
    same = {client_address({"client": (f"2001:db8:1:2::{i}", 1)}) for i in range(1, 5)}
    assert same == {"2001:db8:1:2::/64"}
    assert client_address({"client": ("2001:db8:1:3::1", 1)}) != same.pop()
    assert client_address({"client": ("::ffff:192.0.2.1", 1)}) == "192.0.2.1"
    assert client_address({"client": ("192.0.2.1", 1)}) == "192.0.2.1"
    assert client_address({}) == "unknown"
