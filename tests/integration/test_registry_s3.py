"""The registry through SeaweedFS (S3): a bundle pushed with the CLI through uvicorn is expanded by a
real worker process that never had it on disk; deleting a model while a job runs is refused; a
bundle changed in the bucket after publishing is refused by the worker."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.main import create_app
from app.storage import make_storage
from models.cli import app as cli_app
from tests.app.test_registry import variant
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY
from tests.integration.conftest import Stack, wait_job
from tests.integration.servers import CeleryWorker

pytestmark = pytest.mark.integration
Q_REG = "q-reg"


@pytest.fixture(scope="module")
def bare_worker(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CeleryWorker, Path]]:
    """A worker on its own queue whose DIFFEXP_BUNDLES_DIR is empty: bundles only from the registry."""
    work = tmp_path_factory.mktemp("bare")
    (work / "no-bundles").mkdir()
    env = {
        **stack.env,
        "DIFFEXP_BUNDLES_DIR": str(work / "no-bundles"),
        "DIFFEXP_BUNDLE_CACHE_DIR": str(work / "cache"),
        "DIFFEXP_CELERY_QUEUE": Q_REG,
        "DIFFEXP_WORKER_METRICS_PORT": "0",
    }
    worker = CeleryWorker(work, env, "bare", queues=Q_REG)
    try:
        worker.wait_ready(90)
        yield worker, work / "cache"
    finally:
        worker.stop()


@pytest.fixture()
def api(stack: Stack) -> Iterator[TestClient]:
    """An API on the stack whose jobs go to the bare worker's queue."""
    with TestClient(create_app(stack.settings(celery_queue=Q_REG)), headers=ADMIN_HEADERS) as c:
        yield c


def push(stack: Stack, folder: Path, name: str) -> str:
    result = CliRunner().invoke(
        cli_app, ["push", str(folder), "--name", name, "--url", stack.url, "--api-key", ADMIN_KEY]
    )
    assert result.exit_code == 0, result.output
    ref: str = result.output.split()[0]
    return ref


def run(api: TestClient, body: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    resp = api.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    loc = resp.headers["location"]
    return wait_job(lambda: api.get(loc).json(), timeout)


def test_a_pushed_bundle_expands_on_a_worker_that_never_had_it(
    stack: Stack, bare_worker: tuple[CeleryWorker, Path], api: TestClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    worker, cache = bare_worker
    assert push(stack, variant(tiny_bundle, tmp_path / "b", "s3"), "reg-tiny") == "reg-tiny@1"
    listed = {m["name"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed["reg-tiny"]["versions"] == ["1"] and listed["reg-tiny"]["status"] == "ready"

    job = run(api, {"count": 3, "model": "reg-tiny", "steps": 3, "eta": 1.0, "seed": 5})
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["model_version"] == "1"
    zf = zipfile.ZipFile(io.BytesIO(api.get(job["links"]["pairs_zip"]).content))
    assert len([n for n in zf.namelist() if n.startswith("images/")]) == 3
    assert [p.name.split("-")[0] for p in (cache / "reg-tiny").iterdir()] == ["1"]  # fetched, cached
    assert "reg-tiny@1" in worker.log.read_text()

    # DELETE is refused while a job using the model runs, and accepted once it has ended
    loc = api.post("/v1/jobs", json={"count": 40, "model": "reg-tiny@1", "steps": 40}).headers["location"]
    wait_job(lambda: api.get(loc).json(), 60, until=lambda j: j["status"] == "running")
    resp = api.delete("/v1/models/reg-tiny")
    assert resp.status_code == 409 and "queued or running" in resp.json()["detail"]
    api.post(f"{loc}/cancel")
    assert api.delete("/v1/models/reg-tiny").status_code == 204
    assert api.get("/v1/models/reg-tiny").status_code == 404
    assert not list(make_storage(stack.settings()).list_keys("models/reg-tiny/1/"))


def test_a_bundle_changed_in_the_bucket_is_refused_by_the_worker(
    stack: Stack, bare_worker: tuple[CeleryWorker, Path], api: TestClient, tiny_bundle: Path, tmp_path: Path
) -> None:
    ref = push(stack, variant(tiny_bundle, tmp_path / "b", "tampered"), "reg-tampered")
    name, version = ref.split("@")
    storage = make_storage(stack.settings())
    key = f"models/{name}/{version}/dpm/config.json"
    config = json.loads(storage.get(key))
    storage.put(key, json.dumps(config, indent=1).encode())  # same settings, other bytes
    job = run(api, {"count": 2, "model": ref, "steps": 2, "eta": 1.0})
    assert job["status"] == "failed" and "digest" in job["error"], job
