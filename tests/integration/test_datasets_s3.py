"""A dataset uploaded to the API under uvicorn, stored in SeaweedFS (S3, auth on), read and deleted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.storage import S3Storage
from tests.conftest import ADMIN_HEADERS
from tests.integration.conftest import stack_env
from tests.integration.servers import RedisServer, SeaweedS3, free_port, kill, spawn, wait_for, worker_env
from tests.utils.archives import folder_members, zip_bytes

pytestmark = pytest.mark.integration

CXR = Path(__file__).resolve().parents[2] / "examples" / "cxr-mini"


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, seaweed: SeaweedS3
) -> Iterator[httpx.Client]:
    """The API alone (uploads need no worker), on S3; cxr-mini's 6 pairs are enough here."""
    work = tmp_path_factory.mktemp("datasets-api")
    env = stack_env(
        f"{redis_server.url}/0",
        seaweed,
        work / "no-bundles" / "none",
        "dsint",
        DIFFEXP_MIN_DATASET_PAIRS="6",
        DIFFEXP_MAX_UPLOAD_MB="1",
        DIFFEXP_RECONCILE_INTERVAL_S="0",
    )
    port = free_port()
    log = work / "api.log"
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


@pytest.fixture()
def s3(seaweed: SeaweedS3) -> S3Storage:
    return S3Storage(
        seaweed.bucket,
        endpoint_url=seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    )


def test_upload_list_get_delete_through_s3(api: httpx.Client, s3: S3Storage) -> None:
    archive = zip_bytes(folder_members(CXR))
    resp = api.post("/v1/datasets", files={"file": ("cxr-mini.zip", archive, "application/zip")})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    prefix = f"datasets/{ds['id']}/"
    names = sorted(p.name for p in (CXR / "images").glob("*.png"))
    assert list(s3.list_keys(prefix)) == sorted(
        [prefix + k for k in ("SOURCE.md", "dataset.json", "pairs.csv")]
        + [f"{prefix}{d}/{n}" for d in ("images", "masks") for n in names]
    )
    assert s3.get(f"{prefix}masks/{names[0]}") == (CXR / "masks" / names[0]).read_bytes()
    assert api.get(f"/v1/datasets/{ds['id']}").json() == ds
    assert ds["id"] in [d["id"] for d in api.get("/v1/datasets").json()["data"]]
    assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert list(s3.list_keys(prefix)) == []
    assert api.get(f"/v1/datasets/{ds['id']}").status_code == 404


def test_a_bad_upload_stores_nothing_in_s3(api: httpx.Client, s3: S3Storage) -> None:
    members = folder_members(CXR)
    del members[next(k for k in members if k.startswith("images/"))]
    resp = api.post("/v1/datasets", files={"file": ("bad.zip", zip_bytes(members), "application/zip")})
    assert resp.status_code == 422 and resp.json()["errors"][0]["type"] == "mask_without_image"
    assert list(s3.list_keys("datasets/")) == []


def test_a_chunked_upload_past_the_limit_is_cut_at_the_limit(api: httpx.Client) -> None:
    """No Content-Length (chunked): uvicorn hands the body over as it comes, the API counts it and
    answers 413 once DIFFEXP_MAX_UPLOAD_MB (1 MB here) is passed."""
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(24):  # 1.5 MB
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = api.post(
        "/v1/datasets",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413 and "DIFFEXP_MAX_UPLOAD_MB" in resp.json()["detail"]
