"""Export formats (app.exports), the zip's determinism (app.zipstream) and ``pairs.zip?format=``."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.exports import (
    Entry,
    ExportFormat,
    Labels,
    binary_png,
    index_file,
    layout,
    monai_datalist,
    nnunet_dataset,
)
from app.layout import image_key, manifest_csv, mask_key, pair_meta, zip_key
from app.storage import LocalStorage
from app.store import JobStore
from app.zipstream import job_zip

FORMATS = [f.value for f in ExportFormat]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pair_pngs(i: int, size: int = 16) -> tuple[bytes, bytes]:
    """A greyscale image and its 0/255 mask, as the worker stores them."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[2 + i : 9 + i, 3:12] = 255
    return png(image), png(mask)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def unzip(content: bytes) -> zipfile.ZipFile:
    zf = zipfile.ZipFile(io.BytesIO(content))
    assert zf.testzip() is None
    return zf


# ---- pure: each format's members and index file


def test_layouts_name_each_pairs_files() -> None:
    assert (layout("plain").image("a"), layout("plain").mask("a")) == ("images/a.png", "masks/a.png")
    nn = layout("nnunet")
    assert (nn.image("a"), nn.mask("a")) == ("imagesTr/a_0000.png", "labelsTr/a.png")
    assert (nn.image("a", test=True), nn.mask("a", test=True)) == ("imagesTs/a_0000.png", "labelsTs/a.png")
    assert (layout("monai").image("a"), layout("monai").mask("a")) == ("images/a.png", "labels/a.png")
    assert [layout(f).labels for f in FORMATS] == [False, True, True]
    with pytest.raises(ValueError, match="'zarr'.*plain, nnunet, monai"):
        layout("zarr")


def test_nnunet_dataset_json_is_what_nnunet_v2_reads() -> None:
    entries = [Entry("a"), Entry("b"), Entry("real_c", test=True, source="real")]
    doc = nnunet_dataset(entries, Labels("X-ray", "lung"), {"synthetic": True, "model": "m"}, "two pairs")
    assert doc["channel_names"] == {"0": "X-ray"}
    assert doc["labels"] == {"background": 0, "lung": 1}
    assert doc["numTraining"] == 2 and doc["numTest"] == 1  # held-out pairs are no training cases
    assert doc["file_ending"] == ".png"
    assert doc["provenance"] == {"synthetic": True, "model": "m"}
    path, raw = index_file("nnunet", entries, Labels("X-ray", "lung"), {"synthetic": True, "model": "m"}, "two pairs")  # fmt: skip
    assert path == "dataset.json" and json.loads(raw) == doc
    assert index_file("plain", entries, Labels(), {}, "") is None


def test_monai_datalist_is_in_decathlon_form() -> None:
    entries = [Entry("a"), Entry("real_c", test=True, source="real")]
    doc = monai_datalist(entries, Labels(), {"synthetic": True}, "d")
    assert doc["training"] == [{"image": "images/a.png", "label": "labels/a.png", "source": "synthetic"}]
    assert doc["test"] == [{"image": "images/real_c.png", "label": "labels/real_c.png", "source": "real"}]
    assert doc["labels"] == {"0": "background", "1": "foreground"} and doc["modality"] == {"0": "image"}
    assert "test" not in monai_datalist(entries[:1], Labels(), {}, "d")


def test_labels_come_from_the_bundle_when_it_names_them() -> None:
    assert Labels.from_bundle(None) == Labels("image", "foreground")
    assert Labels.from_bundle({"modality": " X-ray ", "structure": "lung"}) == Labels("X-ray", "lung")
    assert Labels.from_bundle({"modality": 3, "structure": "background"}) == Labels("image", "foreground")


def test_a_k_class_bundle_names_its_k_labels_in_the_index_files() -> None:
    meta = {"modality": "X-ray", "num_classes": 3, "labels": {"0": "background", "1": "left lung", "2": "right lung"}}  # fmt: skip
    labels = Labels.from_bundle(meta)
    assert labels.num_classes == 3 and labels.classes == ("left lung", "right lung")
    doc = nnunet_dataset([Entry("a")], labels, {}, "")
    assert doc["labels"] == {"background": 0, "left lung": 1, "right lung": 2}
    assert monai_datalist([Entry("a")], labels, {}, "")["labels"] == {"0": "background", "1": "left lung", "2": "right lung"}  # fmt: skip
    # unnamed (or named twice, or "background") classes are class_k; a binary bundle keeps its one label
    assert Labels.from_bundle({"num_classes": 4, "labels": {"1": "lung", "2": "lung", "3": "background"}}).classes == ("lung", "class_2", "class_3")  # fmt: skip
    assert Labels.from_bundle({"num_classes": 2, "labels": {"1": "lung"}}) == Labels()


def k_class_job(root: Path) -> tuple[LocalStorage, dict[str, Any], list[dict[str, Any]], list[np.ndarray]]:
    """``stored_job`` with K = 3: label-map masks 0..2 and each pair's class losses, as a worker stores them."""
    storage, rec, rows = stored_job(root)
    masks = []
    for i, row in enumerate(rows):
        mask = pixels(pair_pngs(i)[1]) // 255
        mask[:, 8:] *= 2  # label 2 on the right half
        storage.put(mask_key(rec["id"], row["name"]), png(mask))
        row["class_losses"] = [0.25 * i, 0.5]
        masks.append(mask)
    return storage, rec, rows, masks


def test_a_k_class_zip_keeps_the_label_values_and_a_column_per_class(tmp_path: Path) -> None:
    storage, rec, rows, masks = k_class_job(tmp_path)
    labels = Labels.from_bundle({"num_classes": 3})
    for fmt in FORMATS:
        zf = unzip(b"".join(job_zip(storage, rec, rows, final=False, fmt=fmt, labels=labels)))
        lay = layout(fmt)
        for row, mask in zip(rows, masks, strict=True):
            assert np.array_equal(pixels(zf.read(lay.mask(row["name"]))), mask), fmt
        manifest = zf.read("manifest.csv").decode().splitlines()
        assert manifest[0].startswith("name,index,seed,dice_loss,dice_loss_1,dice_loss_2,model,"), fmt
        assert manifest[2].split(",")[3:6] == ["0.01", "0.25", "0.5"]
        if fmt == "nnunet":
            doc = json.loads(zf.read("dataset.json"))
            assert doc["labels"] == {"background": 0, "class_1": 1, "class_2": 2}
    # a binary job's manifest has no per-class column (and its entries carry no class losses)
    binary = manifest_csv([{k: v for k, v in r.items() if k != "class_losses"} for r in rows], rec["params"])
    assert binary.decode().startswith("name,index,seed,dice_loss,model,eta,")
    assert pair_meta("a", 0, 1, 0.5, [0.5]) == {"name": "a", "index": 0, "seed": 1, "dice_loss": 0.5}


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1"])
def test_binary_png_turns_any_8bit_mask_into_labels(mode: str) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:7] = 255
    img = Image.fromarray(mask).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    labels = pixels(binary_png(buf.getvalue(), 1))
    assert labels.dtype == np.uint8 and labels.shape == (8, 8)
    assert np.array_equal(labels, (mask > 0).astype(np.uint8))
    # 0/1 masks stay 0/1 (not all background), and come back as 0/255 when asked
    again = binary_png(binary_png(buf.getvalue(), 1), 1)
    assert np.array_equal(pixels(again), labels)
    assert np.array_equal(pixels(binary_png(again, 255)), mask)
    assert binary_png(buf.getvalue(), 1) == binary_png(buf.getvalue(), 1)  # the same bytes every time


# ---- the zip itself, without the API


def stored_job(root: Path, n: int = 2) -> tuple[LocalStorage, dict[str, Any], list[dict[str, Any]]]:
    storage = LocalStorage(root)
    job_id = "ab" * 16
    rows = []
    for i in range(n):
        name = f"s1-{i:06d}"
        image, mask = pair_pngs(i)
        storage.put(image_key(job_id, name), image)
        storage.put(mask_key(job_id, name), mask)
        rows.append({"name": name, "index": i, "seed": 1, "dice_loss": 0.01 * i})
    params = {"model": "tiny", "count": n, "seed": 1, "eta": 0.5, "sampling": {"steps": 3}}
    rec = {"id": job_id, "owner": "admin", "status": "canceled", "error": None, "input": {"count": n},
           "params": params, "created_at": "2026-03-04T05:06:07.891+00:00", "started_at": None,
           "completed_at": "2026-03-04T06:00:00+00:00", "progress": {"kept": n}}  # fmt: skip
    return storage, rec, rows


@pytest.fixture()
def tz_restored() -> Iterator[None]:
    before = os.environ.get("TZ")
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_a_zip_depends_on_the_job_only_not_the_clock_nor_the_time_zone(
    tmp_path: Path, tz_restored: None
) -> None:
    storage, rec, rows = stored_job(tmp_path)
    first = {fmt: b"".join(job_zip(storage, rec, rows, final=False, fmt=fmt)) for fmt in FORMATS}
    os.environ["TZ"] = "America/New_York"  # stream-zip's Unix time of a naive date is local time
    time.tzset()
    time.sleep(1.1)  # the clock moved on (and the record's changing fields): the zips did not
    rec = {**rec, "completed_at": "2026-03-05T00:00:00+00:00", "progress": {}}
    for fmt in FORMATS:
        assert b"".join(job_zip(storage, rec, rows, final=False, fmt=fmt)) == first[fmt], fmt
        zf = unzip(first[fmt])
        assert {i.date_time for i in zf.infolist()} == {(2026, 3, 4, 5, 6, 6)}  # DOS time: 2 s steps
        assert json.loads(zf.read("job.json")) == {
            k: rec[k]
            for k in ("id", "owner", "status", "error", "created_at", "started_at", "input", "params")
        }


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_formats_members_in_a_fixed_order(tmp_path: Path, fmt: str) -> None:
    storage, rec, rows = stored_job(tmp_path)
    zf = unzip(b"".join(job_zip(storage, rec, rows, final=False, fmt=fmt, labels=Labels("X-ray", "lung"))))
    lay = layout(fmt)
    pairs = [p for r in rows for p in (lay.image(r["name"]), lay.mask(r["name"]))]
    index = [lay.index] if lay.index else []
    assert zf.namelist() == index + ["manifest.csv", "job.json"] + pairs
    manifest = zf.read("manifest.csv").decode().splitlines()
    assert manifest[0].endswith(",synthetic") and all(line.endswith(",1") for line in manifest[1:])
    for i, row in enumerate(rows):
        image, mask = pair_pngs(i)
        assert zf.read(lay.image(row["name"])) == image  # images pass through untouched
        got = pixels(zf.read(lay.mask(row["name"])))
        assert np.array_equal(got, pixels(mask) // 255 if lay.labels else pixels(mask))
    if fmt == "nnunet":
        doc = json.loads(zf.read("dataset.json"))
        assert doc["numTraining"] == 2 and doc["labels"] == {"background": 0, "lung": 1}
        assert doc["channel_names"] == {"0": "X-ray"}
        assert doc["provenance"]["synthetic"] is True and doc["provenance"]["model"] == "tiny"
        assert doc["provenance"]["params"] == rec["params"] and doc["provenance"]["job"] == rec["id"]
    if fmt == "monai":
        doc = json.loads(zf.read("datalist.json"))
        assert [e["image"] for e in doc["training"]] == [lay.image(r["name"]) for r in rows]
        assert doc["provenance"]["synthetic"] is True


def test_monai_reads_the_monai_export(tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    storage, rec, rows = stored_job(tmp_path / "store")
    zf = unzip(b"".join(job_zip(storage, rec, rows, final=False, fmt="monai")))
    zf.extractall(tmp_path / "export")
    items = load_decathlon_datalist(str(tmp_path / "export" / "datalist.json"), data_list_key="training")
    assert len(items) == 2 and all(Path(it["image"]).is_file() for it in items)
    loaded = LoadImaged(keys=["image", "label"])(items[1])
    assert tuple(loaded["image"].shape) == tuple(loaded["label"].shape) == (16, 16)
    assert set(np.unique(np.asarray(loaded["label"])).tolist()) == {0, 1}
    _, mask = pair_pngs(1)
    assert int(np.asarray(loaded["label"]).sum()) == int((pixels(mask) > 0).sum())


# ---- the API: pairs.zip?format=


def decided_job(client: TestClient, store: JobStore, n: int = 2) -> str:
    job = client.post("/v1/jobs", json={"count": n, "seed": 1}).json()
    for i in range(n):
        image, mask = pair_pngs(i)
        store.put_pair(job["id"], name=f"s1-{i:06d}", index=i, seed=1, dice_loss=0.1, image_png=image, mask_png=mask)  # fmt: skip
    store.finish_shard(job["id"], 0, n, list(range(n)))
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    return str(job["id"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_download_of_a_format_is_the_same_bytes(client: TestClient, store: JobStore, fmt: str) -> None:
    job_id = decided_job(client, store)
    url = f"/v1/jobs/{job_id}/pairs.zip"
    first = client.get(url, params={"format": fmt})
    assert first.status_code == 200 and first.headers["content-type"] == "application/zip"
    suffix = "" if fmt == "plain" else f"-{fmt}"
    assert first.headers["content-disposition"] == f'attachment; filename="{job_id}{suffix}.zip"'
    assert client.get(url, params={"format": fmt}).content == first.content
    zf = unzip(first.content)
    lay = layout(fmt)
    assert zf.namelist()[-2:] == [lay.image("s1-000001"), lay.mask("s1-000001")]
    record = json.loads(zf.read("job.json"))
    assert record["status"] == "succeeded" and record["id"] == job_id and "completed_at" not in record


def test_the_zip_stored_at_decision_equals_a_later_streamed_one(client: TestClient, store: JobStore) -> None:
    job_id = decided_job(client, store)
    stored = store.storage.get(zip_key(job_id))
    assert client.get(f"/v1/jobs/{job_id}/pairs.zip").content == stored
    rec = store.get(job_id)  # succeeded now; it was still running when the zip was written
    rows, final = store.result_rows(job_id, partial=False) or ([], False)
    assert final and b"".join(job_zip(store.storage, rec, rows, final=True)) == stored
    created = datetime.fromisoformat(rec["created_at"])
    assert unzip(stored).infolist()[0].date_time[:5] == created.timetuple()[:5]
    store.storage.delete_prefix(zip_key(job_id))  # a job decided before zips were stored: streamed
    assert client.get(f"/v1/jobs/{job_id}/pairs.zip").content == stored


def test_the_partial_zip_of_a_canceled_job_is_the_same_bytes_every_time(
    client: TestClient, store: JobStore
) -> None:
    job = client.post("/v1/jobs", json={"count": 3}).json()
    image, mask = pair_pngs(0)
    store.put_pair(
        job["id"], name="s1-000000", index=0, seed=1, dice_loss=0.1, image_png=image, mask_png=mask
    )
    client.post(f"/v1/jobs/{job['id']}/cancel")
    url = f"/v1/jobs/{job['id']}/pairs.zip"
    for fmt in FORMATS:
        params = {"partial": "true", "format": fmt}
        first = client.get(url, params=params).content
        if fmt == "plain":
            time.sleep(1.1)  # a second later: the clock is not in the zip
        assert client.get(url, params=params).content == first
        zf = unzip(first)
        assert json.loads(zf.read("job.json"))["status"] == "canceled"
        assert layout(fmt).mask("s1-000000") in zf.namelist()
    assert client.get(url, params={"format": "nnunet"}).status_code == 409  # no result without partial


def test_an_unknown_format_is_a_422_problem(client: TestClient, store: JobStore) -> None:
    job_id = decided_job(client, store, n=1)
    for path in ("pairs.zip", "download"):
        resp = client.get(f"/v1/jobs/{job_id}/{path}", params={"format": "zarr"})
        assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
        (error,) = resp.json()["errors"]
        assert error["parameter"] == "format" and error["input"] == "zarr"


def test_download_of_a_format_redirects_to_its_stream(client: TestClient, store: JobStore) -> None:
    job_id = decided_job(client, store, n=1)
    resp = client.get(f"/v1/jobs/{job_id}/download", params={"format": "nnunet"}, follow_redirects=False)
    assert resp.status_code == 307
    assert resp.headers["location"] == f"/v1/jobs/{job_id}/pairs.zip?format=nnunet"
    plain = client.get(f"/v1/jobs/{job_id}/download", follow_redirects=False)
    assert plain.headers["location"] == f"/v1/jobs/{job_id}/pairs.zip"


def test_openapi_documents_the_formats(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path in ("pairs.zip", "download"):
        params = doc["paths"][f"/v1/jobs/{{job_id}}/{path}"]["get"]["parameters"]
        (fmt,) = [p for p in params if p["name"] == "format"]
        schema = fmt["schema"]
        ref = schema.get("$ref") or schema.get("allOf", [{}])[0].get("$ref")
        enum = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]["enum"] if ref else schema["enum"]
        assert enum == FORMATS and "nnunet" in fmt["description"]


def test_the_zip_never_carries_the_webhook_secret(settings_factory: Any, enqueued: Any) -> None:
    """job.json in the zip was the stored record, webhook secret included (the record keeps it)."""
    from app.main import create_app
    from tests.conftest import ADMIN_HEADERS

    secret = "whsec-" + "7" * 32
    settings = settings_factory(webhook_allow_private=True)
    with TestClient(create_app(settings, enqueue=enqueued), headers=ADMIN_HEADERS) as c:
        body = {"count": 1, "seed": 1, "callback_url": "http://127.0.0.1:9/hook", "callback_secret": secret}
        job = c.post("/v1/jobs", json=body).json()
        store = c.app.state.store  # type: ignore[attr-defined]
        image, mask = pair_pngs(0)
        store.put_pair(job["id"], name="s1-000000", index=0, seed=1, dice_loss=0.1, image_png=image, mask_png=mask)  # fmt: skip
        assert secret in store.storage.get(f"jobs/{job['id']}/job.json").decode()  # the record holds it
        store.finish_shard(job["id"], 0, 1, [0])
        for fmt in FORMATS:
            zf = unzip(c.get(f"/v1/jobs/{job['id']}/pairs.zip", params={"format": fmt}).content)
            assert "webhook" not in json.loads(zf.read("job.json"))
            assert all(secret.encode() not in zf.read(name) for name in zf.namelist()), fmt
