"""The bundle registry (app/registry.py) on real Redis and local storage, and /v1/models over it."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.bundles import model_public
from app.core.config import Settings
from app.registry import (
    LOCAL,
    DigestMismatch,
    InvalidBundle,
    ModelInUse,
    ModelNotFound,
    NameTaken,
    Registry,
    bundle_files,
    folder_digest,
    parse_ref,
)
from app.storage import LocalStorage
from diffuseexpand.client import pack_bundle
from tests.app.test_auth import bearer, new_key


@pytest.fixture()
def registry(settings: Settings) -> Registry:
    r = redis.Redis.from_url(settings.redis_url)
    return Registry(LocalStorage(settings.storage_dir), r, settings)


def variant(tiny_bundle: Path, dest: Path, tag: str) -> Path:
    """A copy of the tiny bundle whose bundle.json differs (another digest), with a .checkpoints/."""
    shutil.copytree(tiny_bundle, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    meta["metrics"] = {**meta.get("metrics", {}), "tag": tag}
    (dest / "bundle.json").write_text(json.dumps(meta))
    (dest / ".checkpoints").mkdir(exist_ok=True)
    (dest / ".checkpoints" / "state.pt").write_bytes(b"not published")
    return dest


@pytest.fixture()
def bundles(tiny_bundle: Path, tmp_path: Path) -> list[Path]:
    return [variant(tiny_bundle, tmp_path / f"b{i}", str(i)) for i in range(2)]


def test_refs_parse_and_bad_ones_name_no_model() -> None:
    assert parse_ref("cxr-lung-64") == ("cxr-lung-64", None)
    assert parse_ref("a.b_c@12") == ("a.b_c", "12")
    assert parse_ref("x@local") == ("x", LOCAL)
    for bad in ("", "X", "-a", "a@", "a@0", "a@1.0", "a/b", "a@x", "../a", "a" * 65):
        with pytest.raises(ModelNotFound):
            parse_ref(bad)


def test_publish_numbers_versions_writes_the_manifest_last_and_lists_the_latest(
    registry: Registry, bundles: list[Path], settings: Settings
) -> None:
    one = registry.publish(bundles[0], "lung", owner="admin", extra={"metrics": {"pass_rate": 0.5}})
    two = registry.publish(bundles[1], "lung", owner="admin")
    assert (one["version"], two["version"]) == ("1", "2")
    files = bundle_files(bundles[0])
    assert ".checkpoints/state.pt" not in files and "bundle.json" in files and "dpm/config.json" in files
    assert one["digest"] == folder_digest(bundles[0], files) != two["digest"]
    stored = sorted(p.relative_to(settings.storage_dir).as_posix() for p in settings.storage_dir.rglob("*"))
    assert "models/lung/1/manifest.json" in stored and "models/lung/1/digest" in stored
    assert not any(".checkpoints" in p for p in stored)
    assert (settings.storage_dir / "models/lung/1/digest").read_text() == one["digest"]

    (latest,) = [m for m in registry.list_models() if m["name"] == "lung"]
    assert latest["version"] == "2" and latest["versions"] == ["1", "2"]
    assert registry.get("lung")["digest"] == two["digest"]
    assert registry.get("lung", "1")["extra"] == {"metrics": {"pass_rate": 0.5}}
    assert registry.resolve("lung@1")[:2] == ("lung", "1")
    assert registry.resolve("lung")[:2] == ("lung", "2")
    with pytest.raises(ModelNotFound):
        registry.get("lung", "3")

    # a version without its manifest (a publish that died) is not listed, and its number is not reused
    (settings.storage_dir / "models/lung/3/dpm").mkdir(parents=True)
    (settings.storage_dir / "models/lung/3/dpm/config.json").write_text("{}")
    assert registry.get("lung")["versions"] == ["1", "2"]
    registry.r.delete(registry._seq("lung"))  # and Redis forgot the counter
    assert registry.publish(bundles[0], "lung", owner="admin")["version"] == "4"


def test_the_index_is_rebuilt_from_storage_when_redis_loses_it(
    registry: Registry, bundles: list[Path]
) -> None:
    registry.publish(bundles[0], "lung", owner="lab")
    registry.publish(bundles[1], "lung", owner="lab")
    before = registry.list_models()
    registry.r.delete(*registry.r.keys(f"{registry.prefix}:*"))
    assert registry.list_models() == before
    assert registry.publish(bundles[0], "lung", owner="lab")["version"] == "3"


def test_the_local_source_is_read_only_and_hidden_by_a_published_name(
    registry: Registry, bundles: list[Path], tiny_bundle: Path, settings: Settings
) -> None:
    name = tiny_bundle.name
    local = registry.get(name)
    assert local["version"] == LOCAL and local["source"] == "local" and local["versions"] == [LOCAL]
    assert registry.fetch(name, LOCAL, settings.storage_dir / "cache") == tiny_bundle
    with pytest.raises(ModelInUse):
        registry.delete(name)
    registry.publish(bundles[0], name, owner="admin")
    assert registry.get(name)["version"] == "1" and registry.get(name)["versions"] == ["1"]
    assert registry.get(name, LOCAL)["source"] == "local"  # still pinned by NAME@local


def test_incomplete_bundles_and_bad_names_are_refused(
    registry: Registry, bundles: list[Path], settings: Settings
) -> None:
    with pytest.raises(InvalidBundle, match="name"):
        registry.publish(bundles[0], "Bad Name", owner="admin")
    shutil.rmtree(bundles[1] / "filter")
    with pytest.raises(InvalidBundle, match="filter/config.json"):
        registry.publish(bundles[1], "lung", owner="admin")
    with pytest.raises(InvalidBundle, match="no bundle.json"):
        registry.publish(bundles[1] / "dpm", "lung", owner="admin")
    assert not (settings.storage_dir / "models").exists()


def test_names_belong_to_their_key_and_keys_see_their_own_and_the_shared(
    registry: Registry, bundles: list[Path]
) -> None:
    registry.publish(bundles[0], "mine", owner="lab-a")
    registry.publish(bundles[0], "shared", owner="admin")
    with pytest.raises(NameTaken):
        registry.publish(bundles[1], "mine", owner="lab-b")
    seen = {m["name"] for m in registry.list_models("lab-b")}
    assert "shared" in seen and "mine" not in seen
    assert {"mine", "shared"} <= {m["name"] for m in registry.list_models("lab-a")}
    assert {"mine", "shared"} <= {m["name"] for m in registry.list_models(None)}  # the admin
    with pytest.raises(ModelNotFound):
        registry.get("mine", viewer="lab-b")
    with pytest.raises(ModelNotFound):
        registry.delete("mine", viewer="lab-b")


def test_ensure_publishes_once_by_digest(registry: Registry, bundles: list[Path]) -> None:
    first, created = registry.ensure(bundles[0], "demo", owner="admin")
    again, created_again = registry.ensure(bundles[0], "demo", owner="admin")
    assert created and not created_again and again["version"] == first["version"] == "1"
    other, created_other = registry.ensure(bundles[1], "demo", owner="admin")
    assert created_other and other["version"] == "2"


def test_fetch_verifies_the_digest_reuses_a_good_copy_and_refuses_a_tampered_file(
    registry: Registry, bundles: list[Path], tmp_path: Path, settings: Settings
) -> None:
    rec = registry.publish(bundles[0], "lung", owner="admin")
    cache = tmp_path / "cache"
    path = registry.fetch("lung", "1", cache)
    assert folder_digest(path, bundle_files(path)) == rec["digest"]
    assert sorted(bundle_files(path)) == sorted(bundle_files(bundles[0]))
    assert [p.name for p in (cache / "lung").iterdir()] == [path.name]  # no temporary left
    stamp = (path / "dpm/config.json").stat().st_mtime_ns
    assert registry.fetch("lung", "1", cache) == path
    assert (path / "dpm/config.json").stat().st_mtime_ns == stamp  # reused, not fetched again

    (path / "dpm/config.json").write_text("{}")  # a cached copy gone bad is fetched again
    assert registry.fetch("lung", "1", cache) == path
    assert folder_digest(path, bundle_files(path)) == rec["digest"]

    stored = settings.storage_dir / "models/lung/1/filter/model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")  # a tampered (or corrupted) object
    fresh = tmp_path / "fresh"
    with pytest.raises(DigestMismatch, match="do not match"):
        registry.fetch("lung", "1", fresh)
    assert not any(fresh.rglob("*.safetensors"))  # nothing unverified left in the cache


# ---- the API


def bundle_archive(folder: Path) -> bytes:
    out = io.BytesIO()
    pack_bundle(folder, out)
    return out.getvalue()


def push(client: TestClient, folder: Path, name: str, **kwargs: Any) -> Any:
    files = {"file": ("b.tar.gz", bundle_archive(folder), "application/gzip")}
    return client.post(f"/v1/models/{name}/versions", files=files, **kwargs)


def test_models_lists_the_local_bundle_with_its_fields(client: TestClient, settings: Settings) -> None:
    answer = client.get("/v1/models").json()
    (m,) = answer["data"]
    assert answer["default"] == settings.default_model == m["name"]
    assert {"resolution", "sampling_defaults", "eta_default", "metrics", "training", "data"} <= set(m)
    assert (m["status"], m["version"], m["versions"], m["source"]) == ("ready", "local", ["local"], "local")
    assert m["num_classes"] == 2  # a binary bundle.json says none
    k_class = {"name": "k", "version": 1, "meta": {"resolution": 16, "num_classes": 3}}
    assert model_public(k_class).num_classes == 3
    assert client.get(f"/v1/models/{m['name']}").json()["version"] == "local"
    assert client.get(f"/v1/models/{m['name']}/local").json()["name"] == m["name"]
    assert client.get("/v1/models/nothing").status_code == 404
    assert client.get("/v1/models/Bad%20Name/1").status_code == 404


def test_push_then_jobs_take_the_latest_or_a_pinned_version(
    client: TestClient, bundles: list[Path], store: Any
) -> None:
    resp = push(client, bundles[0], "lung")
    assert resp.status_code == 201, resp.text
    assert resp.headers["location"] == "/v1/models/lung/1"
    assert resp.json()["version"] == "1" and resp.json()["digest"].startswith("sha256:")
    assert push(client, bundles[1], "lung").json()["version"] == "2"
    listed = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["lung"]["version"] == "2" and listed["lung"]["versions"] == ["1", "2"]
    assert listed["lung"]["metrics"]["tag"] == "1"
    assert client.get("/v1/models/lung/1").json()["metrics"]["tag"] == "0"

    latest = client.post("/v1/jobs", json={"count": 1, "model": "lung"}).json()
    assert (latest["params"]["model"], latest["params"]["model_version"]) == ("lung", "2")
    pinned = client.post("/v1/jobs", json={"count": 1, "model": "lung@1"}).json()
    assert (pinned["params"]["model"], pinned["params"]["model_version"]) == ("lung", "1")
    for ref in ("lung@3", "lung@x", "nothing"):
        resp = client.post("/v1/jobs", json={"count": 1, "model": ref})
        assert resp.status_code == 422 and resp.json()["errors"][0]["pointer"] == "#/model", ref


def test_delete_is_refused_while_a_queued_job_uses_the_version(
    client: TestClient, bundles: list[Path]
) -> None:
    push(client, bundles[0], "lung")
    push(client, bundles[1], "lung")
    job = client.post("/v1/jobs", json={"count": 1, "model": "lung@1"}).json()  # queued: nobody runs it
    resp = client.delete("/v1/models/lung/1")
    assert resp.status_code == 409 and job["id"] in resp.json()["detail"]
    assert client.delete("/v1/models/lung").status_code == 409
    assert client.delete("/v1/models/lung/2").status_code == 204  # no job uses version 2
    assert client.get("/v1/models/lung").json()["versions"] == ["1"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete("/v1/models/lung").status_code == 204
    assert client.get("/v1/models/lung").status_code == 404
    assert client.delete("/v1/models/lung").status_code == 404


def test_keys_see_their_own_models_and_the_shared_ones(client: TestClient, bundles: list[Path]) -> None:
    a, b = bearer(new_key(client, "lab-a")), bearer(new_key(client, "lab-b"))
    assert push(client, bundles[0], "shared").status_code == 201  # the admin's: shared
    assert push(client, bundles[0], "mine", headers=a).json()["owner"] == "lab-a"
    assert push(client, bundles[1], "mine", headers=b).status_code == 409  # another key's name
    names_b = {m["name"] for m in client.get("/v1/models", headers=b).json()["data"]}
    assert "shared" in names_b and "mine" not in names_b
    assert client.get("/v1/models/mine", headers=b).status_code == 404
    assert client.delete("/v1/models/mine", headers=b).status_code == 404
    assert client.post("/v1/jobs", json={"count": 1, "model": "mine"}, headers=b).status_code == 422
    assert client.post("/v1/jobs", json={"count": 1, "model": "mine"}, headers=a).status_code == 202
    assert client.get("/v1/models/mine").json()["owner"] == "lab-a"  # the admin sees every model


def test_a_bad_upload_is_refused_and_stores_nothing(
    client: TestClient, bundles: list[Path], settings: Settings
) -> None:
    shutil.rmtree(bundles[1] / "segmenter")
    resp = push(client, bundles[1], "lung")
    assert resp.status_code == 422 and "segmenter/config.json" in resp.json()["detail"]
    resp = client.post("/v1/models/lung/versions", files={"file": ("x.zip", b"not an archive")})
    assert resp.status_code == 422
    assert client.post("/v1/models/lung/versions", json={}).status_code == 415
    assert client.get("/v1/models/lung").status_code == 404
    assert not (settings.storage_dir / "models").exists()


@pytest.fixture()
def small_upload_client(settings_factory: Any, enqueued: Any) -> Iterator[TestClient]:
    from app.main import create_app
    from tests.conftest import ADMIN_HEADERS

    app = create_app(settings_factory(max_upload_mb=1), enqueue=enqueued)
    with TestClient(app, headers=ADMIN_HEADERS) as c:
        yield c


def test_an_upload_past_the_upload_limit_is_413(small_upload_client: TestClient) -> None:
    big = b"\0" * ((1 << 20) + 1)
    resp = small_upload_client.post("/v1/models/lung/versions", files={"file": ("b.tar.gz", big)})
    assert resp.status_code == 413 and "DIFFEXP_MAX_UPLOAD_MB" in resp.json()["detail"]


def test_the_demo_is_published_once(settings: Settings, tiny_bundle: Path) -> None:
    from app.publish_demo import publish_demo

    first = publish_demo(settings)
    assert first.startswith(f"published {tiny_bundle.name}@1 (sha256:")
    assert publish_demo(settings).startswith(f"already in the registry: {tiny_bundle.name}@1")
    registry = Registry.from_settings(settings)
    rec = registry.get(tiny_bundle.name)
    assert rec["owner"] == "admin" and rec["versions"] == ["1"] and rec["source"] == "registry"
    assert registry.list_models("any-key")[0]["name"] == tiny_bundle.name  # shared with every key
    empty = settings.model_copy(update={"bundles_dir": settings.storage_dir / "none"})
    assert publish_demo(empty).startswith("no bundle at")


def test_a_training_in_progress_answers_through_the_hook(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app: Any = (
        client.app
    )  # the training store's answer for a name in training (tests/worker/test_training.py)
    monkeypatch.setattr(
        app.state.trainings,
        "status_of",
        lambda name: {"name": name, "status": "training", "owner": "lab-a"} if name == "soon" else None,
    )
    assert client.get("/v1/models/soon").json() == {"name": "soon", "status": "training", "owner": "lab-a"}
    assert client.get("/v1/models/other").status_code == 404
    b = bearer(new_key(client, "lab-b"))
    assert client.get("/v1/models/soon", headers=b).status_code == 404  # another key's training


# ---- owners of names (issue 20, item 2: squatting)


@pytest.fixture()
def two_local(
    settings_factory: Any, enqueued: Any, tiny_bundle: Path, tmp_path: Path
) -> Iterator[tuple[TestClient, Settings]]:
    """The API with two local bundles: the default model and a second one (like cxr-lungs3-64)."""
    from app.main import create_app
    from tests.conftest import ADMIN_HEADERS

    root = tmp_path / "local"
    shutil.copytree(tiny_bundle, root / "cxr-lung-64")
    variant(tiny_bundle, root / "cxr-lungs3-64", "local3")
    settings = settings_factory(bundles_dir=root, default_model="cxr-lung-64")
    with TestClient(create_app(settings, enqueue=enqueued), headers=ADMIN_HEADERS) as c:
        yield c, settings


def test_a_key_cannot_squat_a_local_bundle_or_the_default_model(
    two_local: tuple[TestClient, Settings], bundles: list[Path]
) -> None:
    client, _ = two_local
    a, b = bearer(new_key(client, "lab-a")), bearer(new_key(client, "lab-b"))
    for name in ("cxr-lungs3-64", "cxr-lung-64"):
        resp = push(client, bundles[0], name, headers=a)
        assert resp.status_code == 409 and "reserved for the admin" in resp.json()["detail"], resp.text
        for who in (a, b, {}):  # nothing changed, for anyone: the local folder, shared
            got = client.get(f"/v1/models/{name}", headers=who).json()
            assert (got["source"], got["owner"]) == ("local", "admin"), got
    from tests.utils.archives import shapes_members, zip_bytes

    data = zip_bytes(shapes_members(8, size=16))
    dataset = client.post("/v1/datasets", headers=a, files={"file": ("d.zip", data)}).json()["id"]
    for name in ("cxr-lungs3-64", "cxr-lung-64"):  # nor train under them
        resp = client.post("/v1/models", headers=a, json={"dataset": dataset, "name": name, "resolution": 16})
        assert resp.status_code == 409 and "another key" in resp.json()["detail"], resp.text
    for who in (a, {}):  # a job without a model runs the default model's folder
        job = client.post("/v1/jobs", json={"count": 1}, headers=who).json()
        assert (job["params"]["model"], job["params"]["model_version"]) == ("cxr-lung-64", "local")
    resp = push(client, bundles[0], "cxr-lungs3-64")  # the admin publishes under it
    assert resp.status_code == 201 and resp.json()["owner"] == "admin"
    assert client.get("/v1/models/cxr-lungs3-64", headers=b).json()["version"] == "1"


def test_a_name_squatted_before_the_fix_shadows_nothing(
    two_local: tuple[TestClient, Settings], bundles: list[Path], tmp_path: Path
) -> None:
    """A version a key pushed into a reserved name earlier (stored: a stray) is nobody's latest: the
    shared folder stays what every key and the admin's jobs get, and the admin may publish."""
    client, settings = two_local
    a, b = bearer(new_key(client, "lab-a")), bearer(new_key(client, "lab-b"))
    (lab_a,) = [k for k in client.app.state.keys.records() if k["name"] == "lab-a"]  # type: ignore[attr-defined]
    # what the unfixed service let lab-a do: publish into a name then not reserved
    before = settings.model_copy(update={"bundles_dir": tmp_path / "none", "default_model": "x"})
    old = Registry(LocalStorage(settings.storage_dir), redis.Redis.from_url(settings.redis_url), before)
    for name in ("cxr-lungs3-64", "cxr-lung-64"):
        old.publish(bundles[0], name, owner=lab_a["id"], owner_name="lab-a")
    for name in ("cxr-lungs3-64", "cxr-lung-64"):
        for who in (a, b, {}):
            got = client.get(f"/v1/models/{name}", headers=who).json()
            assert (got["source"], got["version"]) == ("local", "local"), (name, who, got)
        assert name in {m["name"] for m in client.get("/v1/models", headers=b).json()["data"]}
    admin_job = client.post("/v1/jobs", json={"count": 1, "model": "cxr-lungs3-64"}).json()
    assert admin_job["params"]["model_version"] == "local"  # not lab-a's bundle
    default_job = client.post("/v1/jobs", json={"count": 1}, headers=b).json()
    assert default_job["params"]["model_version"] == "local"
    # the stray is lab-a's by number only; the admin publishes the name's next version
    assert client.get("/v1/models/cxr-lungs3-64/1", headers=a).json()["owner"] == "lab-a"
    assert client.get("/v1/models/cxr-lungs3-64/1", headers=b).status_code == 404
    resp = push(client, bundles[1], "cxr-lungs3-64")
    assert resp.status_code == 201 and resp.json()["version"] == "2", resp.text
    got = client.get("/v1/models/cxr-lungs3-64", headers=b).json()
    assert (got["version"], got["versions"], got["owner"]) == ("2", ["2"], "admin")
    assert client.delete("/v1/models/cxr-lungs3-64", headers=a).status_code == 204  # its stray only
    assert client.get("/v1/models/cxr-lungs3-64/2", headers=b).status_code == 200


def test_only_the_owner_or_the_admin_pushes_versions_of_a_name(
    client: TestClient, bundles: list[Path]
) -> None:
    a, b = bearer(new_key(client, "lab-a")), bearer(new_key(client, "lab-b"))
    assert push(client, bundles[0], "mine", headers=a).status_code == 201
    assert push(client, bundles[1], "mine", headers=b).status_code == 409
    resp = push(client, bundles[1], "mine")  # the admin: a version of lab-a's model
    assert resp.status_code == 201 and resp.json()["owner"] == "lab-a", resp.text
    got = client.get("/v1/models/mine", headers=a).json()
    assert (got["version"], got["versions"]) == ("2", ["1", "2"])
    assert client.get("/v1/models/mine", headers=b).status_code == 404  # still private
    assert push(client, bundles[0], "mine", headers=a).json()["version"] == "3"
