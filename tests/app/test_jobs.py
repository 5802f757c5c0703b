from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.store import JobStore
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS


def stored_keys(settings: Settings) -> list[str]:
    root = settings.storage_dir
    return (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


def test_solver_karras_and_early_rejection_go_into_the_job(client: TestClient, enqueued: Enqueued) -> None:
    body = {"count": 2, "solver": "unipc", "karras": True, "early_reject": False}
    sampling = client.post("/v1/jobs", json=body).json()["params"]["sampling"]
    assert (sampling["solver"], sampling["karras"], sampling["early_reject"]) == ("unipc", True, False)
    sampling = client.post("/v1/jobs", json={"count": 2}).json()["params"]["sampling"]
    assert (sampling["solver"], sampling["karras"], sampling["early_reject"]) == ("dpmpp", False, True)


def test_size_goes_into_the_job(client: TestClient, enqueued: Enqueued) -> None:
    job = client.post("/v1/jobs", json={"count": 2, "size": "32x24"}).json()
    assert job["params"]["size"] == "32x24" and job["input"]["size"] == "32x24"
    assert client.post("/v1/jobs", json={"count": 2}).json()["params"]["size"] is None  # square R x R


def test_mask_source_and_clean_masks_go_into_the_job(client: TestClient, enqueued: Enqueued) -> None:
    assert client.post("/v1/jobs", json={"count": 2}).json()["params"]["masks"] == {
        "source": "generated", "real_share": 0.5, "clean": False,
    }  # fmt: skip
    body = {"count": 2, "mask_source": "mixed", "real_share": 0.25, "clean_masks": True}
    job = client.post("/v1/jobs", json=body).json()
    assert job["params"]["masks"] == {"source": "mixed", "real_share": 0.25, "clean": True}
    assert job["input"] == body
    job = client.post("/v1/jobs", json={"count": 2, "mask_source": "real"}).json()
    assert job["params"]["masks"]["source"] == "real"
    models = client.get("/v1/models").json()["data"]
    assert all(m["training_masks"] for m in models)  # the tiny bundle carries masks.npz


@pytest.mark.parametrize(
    ("body", "field"),
    [({"mask_source": "real"}, "mask_source"), ({"mask_source": "mixed"}, "mask_source"),
     ({"clean_masks": True}, "clean_masks")],
)  # fmt: skip
def test_a_model_without_training_masks_refuses_real_masks_and_clean_up_with_422(
    tmp_path: Path, tiny_bundle: Path, settings_factory: Any, body: dict[str, Any], field: str
) -> None:
    old = tmp_path / "bundles" / "old"
    shutil.copytree(tiny_bundle, old)
    (old / "masks.npz").unlink()  # a bundle trained before masks.npz
    settings = settings_factory(bundles_dir=old.parent, default_model="old")
    enqueued = Enqueued()
    with TestClient(create_app(settings, enqueue=enqueued), headers=ADMIN_HEADERS) as client:
        assert client.get("/v1/models/old").json()["training_masks"] is False
        resp = client.post("/v1/jobs", json={"count": 2, **body})
        assert resp.status_code == 422, resp.text
        (error,) = [e for e in resp.json()["errors"] if e["pointer"] == f"#/{field}"]
        assert "carries no training masks (masks.npz)" in error["detail"]
        assert client.post("/v1/jobs", json={"count": 2}).status_code == 202  # generated masks still work
    assert len(enqueued) == 1


def test_create_job_answers_202_with_location_and_the_values_used(
    client: TestClient, enqueued: Enqueued, settings: Settings
) -> None:
    resp = client.post("/v1/jobs", json={"count": 3, "tau": 0.25})
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["input"] == {"count": 3, "tau": 0.25}
    p = job["params"]
    assert p["model"] == settings.default_model
    assert p["sampling"]["tau"] == 0.25 and p["sampling"]["steps"] == 4  # request over the bundle defaults
    assert p["eta"] == 1.0 and isinstance(p["seed"], int)
    assert p["max_attempts"] == 20 * 3 and p["batch_size"] == 2 and p["shard_size"] == 2
    assert job["progress"] == {
        "target": 3,
        "generated": 0,
        "kept": 0,
        "discarded": 0,
        "pairs_per_second": None,
        "eta_seconds": None,
        "phase": None,
    }
    # the record is committed (Redis and storage) before the first shards are enqueued
    assert enqueued == [(job["id"], 0, settings.celery_queue), (job["id"], 1, settings.celery_queue)]
    assert json.loads((settings.storage_dir / f"jobs/{job['id']}/job.json").read_text())["status"] == "queued"
    assert client.get(resp.headers["location"]).json()["params"] == p


BAD_BODIES: list[tuple[dict[str, Any], str, str]] = [
    ({}, "count", "Field required"),
    ({"count": 0}, "count", "greater than or equal to 1"),
    ({"count": 51}, "count", "less than or equal to 50"),
    ({"count": "many"}, "count", "valid integer"),
    ({"count": "2"}, "count", "valid integer"),  # numbers are JSON numbers
    ({"count": True}, "count", "valid integer"),
    ({"count": 2.5}, "count", "valid integer"),
    ({"count": 2, "seed": False}, "seed", "valid integer"),  # was taken as seed 0
    ({"count": 2, "tau": "0.5"}, "tau", "valid number"),
    ({"count": 2, "w_cf": True}, "w_cf", "valid number"),
    ({"count": 2, "tau": 0}, "tau", "greater than or equal to 0.05"),
    ({"count": 2, "tau": -1.5}, "tau", "greater than or equal to 0.05"),
    ({"count": 2, "tau": 5e-324}, "tau", "greater than or equal to 0.05"),  # gave solid black pairs
    ({"count": 2, "tau": 20.5}, "tau", "less than or equal to 20"),
    ({"count": 2, "w_cf": 21}, "w_cf", "less than or equal to 20"),
    ({"count": 2, "w_cg": 1e308}, "w_cg", "less than or equal to 50"),  # gave solid black pairs
    ({"count": 2, "eta": 0}, "eta", "greater than 0"),
    ({"count": 2, "eta": 1.01}, "eta", "less than or equal to 1"),
    ({"count": 2, "steps": 0}, "steps", "greater than or equal to 1"),
    ({"count": 2, "steps": 51}, "steps", "less than or equal to 50"),
    ({"count": 2, "w_cg": -1}, "w_cg", "greater than or equal to 0"),
    ({"count": 2, "guidance": "loud"}, "guidance", "'tau' or 'scale'"),
    ({"count": 2, "solver": "euler"}, "solver", "'dpmpp' or 'unipc'"),
    ({"count": 2, "karras": "yes"}, "karras", "valid boolean"),
    ({"count": 2, "early_reject": 1}, "early_reject", "valid boolean"),
    ({"count": 2, "seed": -1}, "seed", "greater than or equal to 0"),
    ({"count": 2, "seed": 2**53}, "seed", "less than or equal to 9007199254740991"),
    ({"count": 2, "max_attempts": 50 * 20 + 1}, "max_attempts", "between count (2) and 1000"),
    ({"count": 2, "model": "m" * 129}, "model", "at most 128 characters"),
    ({"count": 4, "max_attempts": 3}, "max_attempts", "between count (4)"),
    ({"count": 2, "model": "no-such-model"}, "model", "Unknown model 'no-such-model'"),
    ({"count": 2, "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"count": 2, "size": "256×192"}, "size", "'256×192' is not WIDTHxHEIGHT"),  # not an ASCII x
    ({"count": 2, "size": "0x10"}, "size", "'0x10': sides must be whole numbers from 1 to 4096"),
    ({"count": 2, "size": "-4x10"}, "size", "is not WIDTHxHEIGHT"),
    ({"count": 2, "size": "abc"}, "size", "'abc' is not WIDTHxHEIGHT"),
    ({"count": 2, "size": "100000x10"}, "size", "at most 4096"),
    ({"count": 2, "size": 256}, "size", "valid string"),
    ({"count": 2, "mask_source": "painted"}, "mask_source", "'generated', 'real' or 'mixed'"),
    ({"count": 2, "mask_source": "mixed", "real_share": 1.5}, "real_share", "less than or equal to 1"),
    ({"count": 2, "mask_source": "mixed", "real_share": -0.1}, "real_share", "greater than or equal to 0"),
    ({"count": 2, "real_share": 0.3}, "real_share", "mask_source mixed only"),
    ({"count": 2, "mask_source": "real", "real_share": 0.3}, "real_share", "mask_source mixed only"),
    ({"count": 2, "clean_masks": "yes"}, "clean_masks", "valid boolean"),
]


@pytest.mark.parametrize(
    ("body", "field", "bound"), BAD_BODIES, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_BODIES)]
)
def test_bad_bodies_get_422_naming_the_field_and_nothing_is_stored(
    client: TestClient,
    enqueued: Enqueued,
    store: JobStore,
    settings: Settings,
    body: dict[str, Any],
    field: str,
    bound: str,
) -> None:
    resp = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-bad"})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    errors = resp.json()["errors"]
    mine = [e for e in errors if e["pointer"] == f"#/{field}" and e["loc"] == ["body", field]]
    assert mine, errors
    assert any(bound in e["detail"] for e in mine), mine
    assert enqueued == [] and stored_keys(settings) == []
    assert store.list_jobs(limit=10, offset=0) == ([], 0, None)
    assert store.r.keys(f"{settings.redis_prefix}:*") == []  # not even the idempotency key


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", ""), ("post", "/cancel"), ("delete", ""), ("get", "/pairs.zip"), ("get", "/download")],
)
def test_unknown_job_is_404(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method.upper(), f"/v1/jobs/{'0123456789abcdef' * 2}{path}")
    assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["detail"] == f"job {'0123456789abcdef' * 2} not found"


def test_idempotency_key_returns_the_same_job_or_409(client: TestClient, enqueued: Enqueued) -> None:
    first = client.post("/v1/jobs", json={"count": 2, "seed": 5}, headers={"Idempotency-Key": "abc"})
    again = client.post("/v1/jobs", json={"seed": 5, "count": 2}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len(enqueued) == 1  # the second request enqueued nothing
    other = client.post("/v1/jobs", json={"count": 3, "seed": 5}, headers={"Idempotency-Key": "abc"})
    assert other.status_code == 409
    fresh = client.post("/v1/jobs", json={"count": 2, "seed": 5}, headers={"Idempotency-Key": "xyz"})
    assert fresh.json()["id"] != first.json()["id"]
    assert client.get("/v1/jobs").json()["count"] == 2


def test_list_is_newest_first_and_paginated(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json={"count": 1}).json()["id"] for _ in range(5)]
    page1 = client.get("/v1/jobs", params={"limit": 2}).json()
    page2 = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    page3 = client.get("/v1/jobs", params={"limit": 2, "offset": 4}).json()
    assert page1["count"] == 5 and page1["limit"] == 2
    assert [j["id"] for j in page1["data"] + page2["data"] + page3["data"]] == ids[::-1]
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_cancel_then_conflicts_and_partial_zip(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json={"count": 2}).json()
    url = f"/v1/jobs/{job['id']}"
    assert client.get(f"{url}/pairs.zip").status_code == 409
    resp = client.post(f"{url}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert resp.json()["completed_at"] is not None
    assert client.post(f"{url}/cancel").status_code == 409
    assert client.get(f"{url}/pairs.zip").status_code == 409
    partial = client.get(f"{url}/pairs.zip", params={"partial": "true"})
    assert partial.status_code == 200 and partial.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(partial.content))
    assert sorted(zf.namelist()) == ["job.json", "manifest.csv"]
    assert json.loads(zf.read("job.json"))["status"] == "canceled"
    assert (
        json.loads((settings.storage_dir / f"jobs/{job['id']}/job.json").read_text())["status"] == "canceled"
    )


def test_delete_removes_record_and_objects(client: TestClient, settings: Settings, store: JobStore) -> None:
    job = client.post("/v1/jobs", json={"count": 2}).json()
    store.storage.put(f"jobs/{job['id']}/images/x.png", b"png")
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert stored_keys(settings) == []
    assert client.get("/v1/jobs").json()["count"] == 0
    assert store.stop_reason(job["id"]) == "deleted"  # running shards stop


def test_download_redirects_to_the_zip_on_local_storage(client: TestClient, store: JobStore) -> None:
    job = client.post("/v1/jobs", json={"count": 1}).json()
    assert client.get(f"/v1/jobs/{job['id']}/download").status_code == 409
    store.put_pair(job["id"], name="s1-000000", index=0, seed=1, dice_loss=0.1, image_png=b"i", mask_png=b"m")
    store.finish_shard(job["id"], 0, 2, [0])
    resp = client.get(f"/v1/jobs/{job['id']}/download", follow_redirects=False)
    assert resp.status_code == 307 and resp.headers["location"] == f"/v1/jobs/{job['id']}/pairs.zip"
    zf = zipfile.ZipFile(io.BytesIO(client.get(resp.headers["location"]).content))
    assert zf.read("images/s1-000000.png") == b"i" and zf.read("masks/s1-000000.png") == b"m"
    progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
    # every pair the shard generated counts, not only those up to the one the result needed
    assert progress == {
        "target": 1,
        "generated": 2,
        "kept": 1,
        "discarded": 1,
        "pairs_per_second": None,  # the job never ran (no worker marked it running here)
        "eta_seconds": 0.0,
        "phase": None,
    }


def test_list_pages_by_cursor_without_repeats_or_gaps_while_jobs_come_and_go(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json={"count": 1, "seed": i}).json()["id"] for i in range(5)]
    newest_first = ids[::-1]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    seen = [j["id"] for j in page["data"]]
    assert seen == newest_first[:2] and page["count"] == 5
    client.delete(f"/v1/jobs/{newest_first[2]}")  # deleted before its page is read
    client.post("/v1/jobs", json={"count": 1, "seed": 99})  # a new job lands on the first page
    while page["next_cursor"]:
        page = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == [i for i in newest_first if i != newest_first[2]]


@pytest.mark.parametrize("cursor", ["garbage", "bmFuOng", "aW5mOng", "x" * 200])
def test_a_cursor_the_service_did_not_issue_is_a_422_naming_it(client: TestClient, cursor: str) -> None:
    """Like every other bad parameter (a malformed limit, offset or id): 422 with ``errors``."""
    resp = client.get("/v1/jobs", params={"cursor": cursor})
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    (error,) = resp.json()["errors"]
    assert error["parameter"] == "cursor" and error["detail"] == "not a cursor this service issued"
    assert "400" not in client.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["responses"]
