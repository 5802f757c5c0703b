from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core.config import Settings
from app.schemas import JobStatus
from app.store import JobStore
from tests.integration.servers import RedisServer


def test_models_lists_every_bundle_with_its_metadata(client: TestClient, settings: Settings) -> None:
    body = client.get("/v1/models").json()
    assert body["default"] == settings.default_model
    (model,) = body["data"]
    assert model["name"] == settings.default_model
    assert model["resolution"] == 16 and model["eta_default"] == 1.0
    assert model["sampling_defaults"]["steps"] == 4
    assert "folder" not in model["data"]  # no server paths leak


def test_healthz_and_readyz(client: TestClient, store: JobStore, settings: Settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    resp = client.get("/readyz")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["redis"]["ok"] and checks["storage"]["ok"] and not checks["workers"]["ok"]
    store.r.set(f"{settings.redis_prefix}:worker:w1@host", "1", ex=10)  # what a worker's heartbeat writes
    resp = client.get("/readyz")
    assert (
        resp.status_code == 200 and resp.json()["checks"]["workers"]["detail"] == "1 worker"
    )  # no host names


def test_readyz_reports_a_dead_redis(settings_factory: Callable[..., Settings]) -> None:
    from app.main import create_app

    app = create_app(settings_factory(redis_url="redis://127.0.0.1:1/0"), enqueue=lambda *a: None)
    with TestClient(app) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503 and not resp.json()["checks"]["redis"]["ok"]


def test_status_enum_terminal_states() -> None:
    assert [s.value for s in JobStatus if s.is_terminal()] == ["succeeded", "failed", "canceled"]
    assert not JobStatus.QUEUED.is_terminal() and not JobStatus.RUNNING.is_terminal()


def test_settings_reject_shards_that_are_not_whole_batches(settings_factory: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError, match="multiple of batch_size"):
        settings_factory(shard_size=6, batch_size=4)


def test_settings_reject_placeholder_secret_outside_local(settings_factory: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError, match="changethis"):
        settings_factory(environment="production", storage_backend="s3", s3_secret_access_key="changethis")
    settings_factory(environment="local", storage_backend="s3", s3_secret_access_key="changethis")


def test_settings_read_the_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFEXP_SHARD_SIZE", "12")
    monkeypatch.setenv("DIFFEXP_BATCH_SIZE", "6")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.shard_size, s.batch_size) == (12, 6)


def test_api_never_imports_torch_or_models() -> None:
    import subprocess
    import sys

    code = (
        "import sys, app.main, app.serve, app.zipstream\n"
        "bad = [m for m in sys.modules if m == 'torch' or m == 'models' or m.startswith('models.')]\n"
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PATH": "", "DIFFEXP_STORAGE_DIR": "/tmp/x"}
    )


@pytest.mark.parametrize(
    ("page", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")]
)
def test_api_docs_load_nothing_from_outside(client: TestClient, page: str, asset: str) -> None:
    """/docs loaded Swagger UI from a CDN: a blank page on a machine without internet."""
    import re

    html = client.get(page).text
    assert re.findall(r'(?:src|href)=["\'](https?:)?//', html) == []  # no absolute URL to another host
    assert f"/static/docs/{asset}" in html
    resp = client.get(f"/static/docs/{asset}")
    assert resp.status_code == 200 and len(resp.content) > 100_000


def test_readyz_ignores_a_dead_workers_heartbeat_that_redis_restored_from_its_file(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    """``make serve`` restarted: Redis reloads its append-only file, and with it the heartbeat (and its
    TTL) of the worker that died; no worker is up yet, so the service is not ready."""
    from app.main import create_app
    from worker.celery_app import beat

    server = RedisServer(tmp_path / "redis", persistent=True)
    try:
        settings = settings_factory(redis_url=f"{server.url}/0")
        with TestClient(create_app(settings, enqueue=lambda *a: None)) as c:
            store: JobStore = c.app.state.store  # type: ignore[attr-defined]
            key = store.keys.worker("w1@host")
            store.r.set(key, beat([settings.celery_queue], store.r), ex=60)  # the worker's heartbeat
            assert c.get("/readyz").status_code == 200
            server.stop()  # the whole stack stops; the worker dies with it
            server.start()
            assert store.r.ttl(key) > 0  # restored, still within its TTL
            resp = c.get("/readyz")
            assert (
                resp.status_code == 503
                and resp.json()["checks"]["workers"]["detail"] == "no worker heartbeat"
            )
            assert c.get("/metrics").text.count("diffexp_workers 0.0") == 1
            store.r.set(key, beat([settings.celery_queue], store.r), ex=60)  # the new worker's first beat
            assert c.get("/readyz").status_code == 200
    finally:
        server.stop()
