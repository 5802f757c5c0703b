"""GET /v1/jobs/{id}/pairs and each pair's PNGs and preview: real Redis and local storage, pairs stored
the way a worker stores them (``JobStore.put_pair``, ``finish_shard``)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.layout import job_prefix, preview_key
from app.pairs import is_pair_name, pair_file
from app.preview import OUTLINE_RGB, outline
from app.store import JobNotFound, JobStore
from models.expand import pair_name
from tests.app.test_auth import bearer, new_key

SEED = 77


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def image_of(index: int) -> np.ndarray:
    return np.full((16, 16), 20 + 10 * index, np.uint8) + np.arange(16, dtype=np.uint8)[None, :]


def mask_of(index: int) -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[4 : 12 - index, 3:11] = 255
    return mask


def store_pair(store: JobStore, job_id: str, index: int) -> str:
    name = pair_name(SEED, index)
    assert store.put_pair(
        job_id,
        name=name,
        index=index,
        seed=SEED,
        dice_loss=0.01 * (index + 1),
        image_png=png(image_of(index)),
        mask_png=png(mask_of(index)),
    )
    return name


def new_job(client: TestClient, count: int = 2) -> str:
    resp = client.post("/v1/jobs", json={"count": count, "seed": SEED, "eta": 0.5})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


@pytest.fixture()
def job(client: TestClient, store: JobStore) -> dict[str, Any]:
    """A job of count 2 whose shard 0 kept pair 1 and shard 1 pairs 2 and 3: three kept pairs stored,
    not yet decided (shard size 2)."""
    job_id = new_job(client)
    names = [store_pair(store, job_id, i) for i in (3, 1, 2)]
    return {"id": job_id, "names": names, "base": f"/v1/jobs/{job_id}/pairs"}


def decide(store: JobStore, job_id: str) -> None:
    store.finish_shard(job_id, 0, 2, [1])
    store.finish_shard(job_id, 1, 2, [2, 3])


def test_pair_names_of_the_models_match_the_pattern() -> None:
    for seed, index in [(0, 0), (SEED, 5), (2**63 - 1, 10**9)]:
        assert is_pair_name(pair_name(seed, index))
    for bad in [
        "",
        "s1-1",
        "S1-000001",
        "s1-000001.png",
        "../s1-000001",
        "s1-000001/..",
        "s-000001",
        "s1_000001",
    ]:
        assert not is_pair_name(bad), bad


def test_lists_the_kept_pairs_so_far_then_the_final_result(
    client: TestClient, store: JobStore, job: dict[str, Any]
) -> None:
    page = client.get(job["base"]).json()
    assert page["final"] is False and page["count"] == 3 and (page["offset"], page["limit"]) == (0, 50)
    assert [p["index"] for p in page["data"]] == [1, 2, 3]
    first = page["data"][0]
    assert first == {
        "name": pair_name(SEED, 1),
        "index": 1,
        "seed": SEED,
        "dice_loss": pytest.approx(0.02),
        "class_dice_losses": None,  # a binary model's pairs have only dice_loss
        "mask_source": "generated",
        "cleaned": False,
        "links": {f: f"{job['base']}/{pair_name(SEED, 1)}/{f}.png" for f in ("image", "mask", "preview")},
    }
    paged = client.get(job["base"], params={"offset": 1, "limit": 1}).json()
    assert [p["index"] for p in paged["data"]] == [2] and paged["count"] == 3

    decide(store, job["id"])
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    final = client.get(job["base"]).json()  # the manifest's rows: text in CSV, typed here
    assert final["final"] is True and final["count"] == 2
    assert [(p["index"], p["seed"], p["dice_loss"]) for p in final["data"]] == [
        (1, SEED, pytest.approx(0.02)),
        (2, SEED, pytest.approx(0.03)),
    ]
    # pair 3 was kept by shard 1 but is not in the result: no longer a pair of this job
    assert client.get(f"{job['base']}/{pair_name(SEED, 3)}/image.png").status_code == 404
    assert client.get(f"{job['base']}/{pair_name(SEED, 2)}/image.png").status_code == 200


def test_a_k_class_jobs_pairs_list_their_class_losses_so_far_and_in_the_final_result(
    client: TestClient, store: JobStore
) -> None:
    job_id = new_job(client)
    for i in (1, 2, 3):  # stored as a worker stores a K = 3 pair: label values, one loss per class
        labels = (mask_of(i) > 0).astype(np.uint8) * (1 + i % 2)
        assert store.put_pair(job_id, name=pair_name(SEED, i), index=i, seed=SEED, dice_loss=0.25,
                              image_png=png(image_of(i)), mask_png=png(labels), class_losses=[0.1 * i, 0.5 - 0.1 * i])  # fmt: skip
    so_far = client.get(f"/v1/jobs/{job_id}/pairs").json()["data"]
    assert [p["class_dice_losses"] for p in so_far] == [pytest.approx([0.1 * i, 0.5 - 0.1 * i]) for i in (1, 2, 3)]  # fmt: skip
    decide(store, job_id)
    final = client.get(f"/v1/jobs/{job_id}/pairs").json()
    assert final["final"] and [p["class_dice_losses"] for p in final["data"]] == [p["class_dice_losses"] for p in so_far[:2]]  # fmt: skip
    header = store.storage.get(f"jobs/{job_id}/manifest.csv").decode().splitlines()[0].split(",")
    assert header[:6] == ["name", "index", "seed", "dice_loss", "dice_loss_1", "dice_loss_2"]


def test_a_job_without_pairs_lists_none(client: TestClient) -> None:
    page = client.get(f"/v1/jobs/{new_job(client)}/pairs").json()
    assert page == {"data": [], "count": 0, "offset": 0, "limit": 50, "final": False}


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"offset": -1}, {"offset": "x"}])
def test_bad_paging_is_a_422_problem(client: TestClient, job: dict[str, Any], params: dict[str, Any]) -> None:
    resp = client.get(job["base"], params=params)
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"


def test_image_and_mask_are_the_stored_pngs_with_cache_headers(
    client: TestClient, job: dict[str, Any]
) -> None:
    name = pair_name(SEED, 2)
    image = client.get(f"{job['base']}/{name}/image.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(image.content), image_of(2))
    assert np.array_equal(pixels(client.get(f"{job['base']}/{name}/mask.png").content), mask_of(2))
    assert "immutable" in image.headers["cache-control"] and "private" in image.headers["cache-control"]
    tag = image.headers["etag"]
    again = client.get(f"{job['base']}/{name}/image.png", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    other = client.get(f"{job['base']}/{name}/image.png", headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200 and other.content == image.content


def test_preview_is_the_grey_image_with_the_mask_outline_and_is_cached(
    client: TestClient, store: JobStore, job: dict[str, Any]
) -> None:
    name = pair_name(SEED, 1)
    resp = client.get(f"{job['base']}/{name}/preview.png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    rgb = pixels(resp.content)
    edge = outline(mask_of(1) > 0)
    assert rgb.shape == (16, 16, 3) and edge.sum() > 0
    assert (rgb[edge] == OUTLINE_RGB).all()
    assert (rgb[~edge] == image_of(1)[~edge][:, None]).all()  # grey: the image everywhere else
    key = preview_key(job["id"], name)
    assert store.storage.get(key) == resp.content
    store.storage.put(key, b"cached", "image/png")  # served from storage, not made again
    assert client.get(f"{job['base']}/{name}/preview.png").content == b"cached"
    # DELETE of the job removes its previews with everything else
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not store.storage.exists(key)
    assert client.get(f"{job['base']}/{name}/preview.png").status_code == 404


def test_a_preview_written_while_the_job_is_deleted_is_removed_again(
    client: TestClient, store: JobStore, job: dict[str, Any]
) -> None:
    """DELETE sets the job's stop flag before it lists the objects: a preview written after that listing
    would be left behind, so the writer checks the flag after writing and removes what it wrote."""
    name = pair_name(SEED, 1)
    store.r.set(store.keys.job(job["id"], "stop"), "deleted")  # DELETE has begun, the record still exists
    with pytest.raises(JobNotFound):
        pair_file(store, job["id"], name, "preview.png")
    assert list(store.storage.list_keys(job_prefix(job["id"]))) == []


@pytest.mark.parametrize(
    "name",
    [
        pair_name(SEED, 9),  # a valid name, but no pair of this job
        "job.json",
        "..",
        "..%2F..%2Fjob.json",
        "%2e%2e",
        "s77-000001%00",
        "s77-000001.png",
        "x" * 500,
    ],
)
@pytest.mark.parametrize("file", ["image.png", "mask.png", "preview.png"])
def test_names_of_no_pair_are_a_404_problem(
    client: TestClient, job: dict[str, Any], name: str, file: str
) -> None:
    resp = client.get(f"{job['base']}/{name}/{file}")
    assert resp.status_code == 404, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "xxxxx" not in resp.json().get("detail", "")  # a name that is no pair name is not echoed


def test_other_files_of_a_pair_are_404(client: TestClient, job: dict[str, Any]) -> None:
    for file in ("job.json", "image.jpg", "../../job.json"):
        assert client.get(f"{job['base']}/{pair_name(SEED, 1)}/{file}").status_code == 404


def test_another_keys_job_is_a_404(client: TestClient, job: dict[str, Any]) -> None:
    other = bearer(new_key(client, "other"))
    name = pair_name(SEED, 1)
    assert client.get(job["base"], headers=other).status_code == 404
    for file in ("image.png", "mask.png", "preview.png"):
        assert client.get(f"{job['base']}/{name}/{file}", headers=other).status_code == 404
    assert client.get(f"{job['base']}/{name}/image.png", headers={"Authorization": ""}).status_code == 401


def test_unknown_jobs_are_404(client: TestClient) -> None:
    for path in (
        "/v1/jobs/0123456789abcdef0123456789abcdef/pairs",
        "/v1/jobs/nope/pairs/s1-000001/image.png",
    ):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"


def test_start_shard_takes_the_lease_counts_the_attempt_or_says_why_not(
    client: TestClient, store: JobStore
) -> None:
    from app.store import JOB_GONE, SHARD_DONE, SHARD_TAKEN

    job_id = new_job(client)
    assert store.r.hexists(store._k(job_id, "pending"), "0")
    assert store.start_shard(job_id, 0, "run-a") == 1  # the first attempt, no longer pending
    assert not store.r.hexists(store._k(job_id, "pending"), "0")
    assert store.start_shard(job_id, 0, "run-b") == SHARD_TAKEN  # run-a holds it: nothing counted
    assert store.r.hget(store._k(job_id, "attempts"), "0") == b"1"
    store.release_lease(job_id, 0, "run-a")
    assert store.start_shard(job_id, 0, "run-b") == 2
    store.release_lease(job_id, 0, "run-b")
    store.finish_shard(job_id, 0, 2, [0])
    assert store.start_shard(job_id, 0, "run-c") == SHARD_DONE
    store.release_lease(job_id, 0, "run-c")
    store.delete(job_id)
    assert store.start_shard(job_id, 1, "run-d") == JOB_GONE


def test_a_batch_of_pairs_is_stored_at_once_and_not_for_a_deleted_job(
    client: TestClient, store: JobStore
) -> None:
    job_id = new_job(client)
    batch = [
        ({"name": pair_name(SEED, i), "index": i, "seed": SEED, "dice_loss": 0.1}, png(image_of(i)), png(mask_of(i)))
        for i in (0, 1)
    ]  # fmt: skip
    assert store.put_pairs(job_id, batch)
    assert [p["index"] for p in store.kept_pairs(job_id)] == [0, 1]
    assert store.put_pairs(job_id, [])  # nothing to store
    store.delete(job_id)
    assert not store.put_pairs(job_id, batch)  # the job is gone: its objects are removed again
    assert not list(store.storage.list_keys(job_prefix(job_id)))
