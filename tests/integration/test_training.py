"""A training on real servers (uvicorn, redis-server, SeaweedFS, Celery workers of the train queue):
its worker is SIGKILLed mid-Stage I, another worker resumes it from the checkpoint in S3, and the
bundle it publishes has the weights of an uninterrupted run's."""

from __future__ import annotations

import io
import json
import signal
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

from app.storage import S3Storage
from models.cli_remote import app as remote_app
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY
from tests.integration.conftest import stack_env, wait_job
from tests.integration.servers import (
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    free_port,
    kill,
    spawn,
    wait_for,
    worker_env,
)
from tests.utils.archives import shapes_members, zip_bytes

pytestmark = pytest.mark.integration

WEIGHTS = (
    "dpm/diffusion_pytorch_model.safetensors",
    "segmenter/diffusion_pytorch_model.safetensors",
    "filter/model.safetensors",
)
BODY = {
    "resolution": 16,
    "train_steps": 60,
    "segmenter_steps": 6,
    "filter_steps": 6,
    "batch_size": 2,
    "checkpoint_every": 5,
}
KILL_AT = 15  # the first worker is killed once Stage I has passed this step (3 checkpoints uploaded)


@pytest.fixture()
def env(redis_server: RedisServer, seaweed: SeaweedS3, tiny_bundle: Path) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return stack_env(
        f"{redis_server.url}/0",
        seaweed,
        tiny_bundle,
        f"tr{tag}",
        # its own queues: the session's stack workers (on q-all) must not take this API's shards
        DIFFEXP_CELERY_QUEUE=f"q-{tag}",
        DIFFEXP_TRAIN_QUEUE=f"train-{tag}",
        DIFFEXP_TRAIN_CHECKPOINT_S="0",
        DIFFEXP_TRAIN_SAMPLE_PAIRS="2",
        DIFFEXP_DEVICE="cpu",
    )


@pytest.fixture()
def api(env: dict[str, str], tmp_path: Path) -> Iterator[httpx.Client]:
    port = free_port()
    log = tmp_path / "api.log"
    proc = spawn(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        log=log,
        env=worker_env(env),
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=ADMIN_HEADERS)
    try:
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, "uvicorn", proc, log)
        yield client
    finally:
        client.close()
        kill(proc)


def s3(seaweed: SeaweedS3) -> S3Storage:
    return S3Storage(
        seaweed.bucket,
        endpoint_url=seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )


def weights(storage: S3Storage, name: str) -> dict[str, Any]:
    # the registry's layout: models/NAME/VERSION/ (app.registry)
    return {rel: load_safetensors(storage.get(f"models/{name}/1/{rel}")) for rel in WEIGHTS}


def test_a_training_whose_worker_is_killed_mid_stage_one_resumes_and_equals_an_uninterrupted_run(
    api: httpx.Client, env: dict[str, str], seaweed: SeaweedS3, tmp_path: Path
) -> None:
    queue = env["DIFFEXP_TRAIN_QUEUE"]
    resp = api.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(shapes_members(8, size=16)))})
    assert resp.status_code == 201, resp.text
    dataset = resp.json()["id"]
    first = CeleryWorker(tmp_path, env, "train-a", queues=queue)
    second: CeleryWorker | None = None
    # the journey's last step expands on a worker that never had the model on disk: started now, on the
    # API's job queue only, so that its start-up overlaps the trainings
    no_bundles = {
        **env,
        "DIFFEXP_BUNDLES_DIR": str(tmp_path / "no-bundles"),
        "DIFFEXP_BUNDLE_CACHE_DIR": str(tmp_path / "cache"),
    }
    expander = CeleryWorker(tmp_path, no_bundles, "expand", queues=env["DIFFEXP_CELERY_QUEUE"])
    try:
        first.wait_ready(90)
        rec = api.post("/v1/models", json={"dataset": dataset, "name": "killed", **BODY}).json()

        def get() -> dict[str, Any]:
            training: dict[str, Any] = api.get(f"/v1/trainings/{rec['id']}").json()
            return training

        def mid_stage_one(t: dict[str, Any]) -> bool:  # (or past it: then the test says so)
            p = t["progress"] or {}
            return (
                t["status"] not in ("queued", "running")
                or p.get("stage", "dpm") != "dpm"
                or (p.get("step", 0) >= KILL_AT)
            )

        seen = wait_job(get, 180, until=mid_stage_one)
        assert seen["progress"]["stage"] == "dpm", f"stage I ended before the kill: {seen}"
        first.stop(sig=signal.SIGKILL)
        second = CeleryWorker(tmp_path, env, "train-b", queues=queue)
        second.wait_ready(90)
        done = wait_job(get, 300)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2

        # the reference run, through the CLI: pack the folder, upload, train, follow, print the name
        folder = tmp_path / "shapes"
        for member, data in shapes_members(8, size=16).items():
            (folder / member).parent.mkdir(parents=True, exist_ok=True)
            (folder / member).write_bytes(data)
        options = [f"--{k.replace('_', '-')}={v}" for k, v in BODY.items()]
        args = ["train", str(folder), "--url", str(api.base_url), "--api-key", ADMIN_KEY, "--name", "whole"]
        result = CliRunner().invoke(remote_app, args + options)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().splitlines()[-1] == "whole@1"
        assert "stage I step" in result.stderr and "filter held-out Dice" in result.stderr

        # the journey's last step: expand with the trained model on a worker that never had it on disk
        expander.wait_ready(90)
        job = api.post("/v1/jobs", json={"model": "whole", "count": 2, "eta": 1.0, "seed": 3}).json()
        assert job["params"]["model_version"] == "1", job
        finished = wait_job(lambda: api.get(f"/v1/jobs/{job['id']}").json(), 180)
        assert finished["status"] == "succeeded", finished
        members = zipfile.ZipFile(io.BytesIO(api.get(f"/v1/jobs/{job['id']}/pairs.zip").content)).namelist()
        assert len([m for m in members if m.startswith("images/")]) == 2
        assert (tmp_path / "cache").is_dir() and not (tmp_path / "no-bundles").exists()
    finally:
        first.stop(sig=signal.SIGKILL)
        if second is not None:
            second.stop()
        expander.stop()
    storage = s3(seaweed)
    meta = json.loads(storage.get("models/killed/1/bundle.json"))
    # from S3, not from scratch: at least the checkpoint before the step the poll saw
    assert meta["training"]["dpm"]["resumed_from"] >= KILL_AT - BODY["checkpoint_every"]
    ours, theirs = weights(storage, "killed"), weights(storage, "whole")
    for rel in WEIGHTS:
        assert ours[rel].keys() == theirs[rel].keys()
        assert all(ours[rel][k].equal(theirs[rel][k]) for k in ours[rel]), rel
    assert not list(storage.list_keys(f"trainings/{rec['id']}/checkpoints/"))
