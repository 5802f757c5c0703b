"""Trainings through the API (real Redis, local storage), run in this process by ``run_training``:
publish, resume after a crash with the same weights, cancel, failing N times, bad bodies, ownership."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from app.core.config import Settings
from app.main import create_app
from app.registry import Registry
from app.trainings import TrainingStore, sweep_trainings
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.utils.archives import shapes_members, zip_bytes
from worker import training as wt
from worker.training import TrainOutcome, run_training

PROBLEM = "application/problem+json"
WEIGHTS = (
    "dpm/diffusion_pytorch_model.safetensors",
    "segmenter/diffusion_pytorch_model.safetensors",
    "filter/model.safetensors",
)
TINY = {
    "resolution": 16,
    "train_steps": 6,
    "segmenter_steps": 2,
    "filter_steps": 2,
    "batch_size": 2,
    "checkpoint_every": 2,
}


class TrainEnqueued(list[tuple[str, str]]):
    def __call__(self, training_id: str, queue: str) -> None:
        self.append((training_id, queue))


@pytest.fixture()
def make_api(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        values = {"train_checkpoint_s": 0.0, "train_max_steps": 5000, "train_sample_pairs": 2, **overrides}
        app = create_app(settings_factory(**values), enqueue=Enqueued(), train_enqueue=TrainEnqueued())
        client = TestClient(app, headers=ADMIN_HEADERS)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture()
def api(make_api: Callable[..., TestClient]) -> TestClient:
    return make_api()


def trainings(client: TestClient) -> TrainingStore:
    store: TrainingStore = client.app.state.trainings  # type: ignore[attr-defined]
    return store


def sent(client: TestClient) -> TrainEnqueued:
    enqueue: TrainEnqueued = trainings(client).enqueue_fn  # type: ignore[assignment]
    return enqueue


def upload(client: TestClient, headers: dict[str, str] | None = None, unlabelled: int = 0) -> str:
    members = shapes_members(8, size=16)
    extra = shapes_members(unlabelled, size=16, seed=1)  # their masks are left out: images only
    members.update(
        {k.replace("images/", "unlabelled/u"): v for k, v in extra.items() if k.startswith("images/")}
    )
    data = zip_bytes(members)
    resp = client.post("/v1/datasets", files={"file": ("d.zip", data)}, headers=headers)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def start(client: TestClient, dataset: str, name: str = "tiny", **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/models", json={"dataset": dataset, "name": name, **TINY, **body})
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/v1/trainings/{resp.json()['id']}"
    rec: dict[str, Any] = resp.json()
    return rec


def run(client: TestClient, training_id: str) -> TrainOutcome:
    return run_training(trainings(client), training_id)


def weights(client: TestClient, name: str, version: str = "1") -> dict[str, Any]:
    storage = trainings(client).storage
    out = {}
    for rel in WEIGHTS:
        data = storage.get(f"models/{name}/{version}/{rel}")
        out[rel] = data
    return out


def test_a_training_publishes_its_bundle_with_metrics_and_a_sample_grid(api: TestClient) -> None:
    dataset = upload(api, unlabelled=3)
    assert api.get(f"/v1/datasets/{dataset}").json()["unlabelled"] == 3
    rec = start(api, dataset, unlabelled_share=0.25)
    assert rec["status"] == "queued" and rec["params"]["segmenter_steps"] == 2
    assert rec["params"]["unlabelled_share"] == 0.25
    assert sent(api) == [(rec["id"], "train")]
    # from the POST on, the name answers "training", and the dataset cannot be deleted
    status = trainings(api).status_of("tiny")
    assert status is not None and status["status"] == "training" and status["owner"] == "admin"
    assert api.delete(f"/v1/datasets/{dataset}").status_code == 409
    assert api.post("/v1/models", json={"dataset": dataset, "name": "tiny", **TINY}).status_code == 409

    assert run(api, rec["id"]) is TrainOutcome.DONE
    done = api.get(f"/v1/trainings/{rec['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["progress"]["stage"] == "filter" and done["progress"]["step"] == 2
    assert done["progress"]["unlabelled"] == 3 and done["progress"]["pairs"] == 6
    model = done["model"]
    assert model["name"] == "tiny" and model["version"] == "1" and model["digest"]
    assert 0 <= model["metrics"]["filter_dice"] <= 1 and 0 <= model["metrics"]["real_pass_rate"] <= 1
    store = trainings(api)
    published = Registry(store.storage, store.r, store.settings).get("tiny")
    assert published["owner"] == "admin" and published["extra"]["training"] == rec["id"]
    # Stage I learnt from the 3 unlabelled images too, at the share asked; the model says so
    shown = api.get("/v1/models/tiny").json()
    assert shown["data"]["unlabelled"] == 3 and shown["data"]["pairs"] == 8
    assert (
        shown["training"]["dpm"]["unlabelled"] == 3 and shown["training"]["dpm"]["unlabelled_share"] == 0.25
    )
    assert shown["training_masks"] is True  # its masks.npz: real mask sources work on it
    grid = store.storage.get("models/tiny/1/sample-grid.png")
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(store.storage.list_keys(f"trainings/{rec['id']}/checkpoints/"))
    assert not list(store.storage.list_keys("models/tiny/1/.checkpoints"))
    assert store.status_of("tiny") is None  # the registry answers from now on
    assert api.delete(f"/v1/datasets/{dataset}").status_code == 204  # released

    listed = api.get("/v1/trainings").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == rec["id"]
    assert run(api, rec["id"]) is TrainOutcome.SKIPPED  # a late duplicate delivery does nothing


def test_the_publisher_trains_new_versions_and_other_keys_get_409(api: TestClient) -> None:
    dataset = upload(api)
    first = start(api, dataset, train_steps=2, segmenter_steps=1, filter_steps=1)
    assert run(api, first["id"]) is TrainOutcome.DONE
    again = start(api, dataset, train_steps=2, segmenter_steps=1, filter_steps=1)
    assert run(api, again["id"]) is TrainOutcome.DONE
    assert api.get(f"/v1/trainings/{again['id']}").json()["model"]["version"] == "2"

    key = api.post("/v1/keys", json={"name": "bob"}).json()["key"]
    bob = {"Authorization": f"Bearer {key}"}
    theirs = upload(api, headers=bob)
    resp = api.post("/v1/models", json={"dataset": theirs, "name": "tiny", **TINY}, headers=bob)
    assert resp.status_code == 409 and resp.headers["content-type"] == PROBLEM
    assert "another key" in resp.json()["detail"]
    # one training at a time for a key (DIFFEXP_TRAIN_MAX_ACTIVE); the admin has no such limit
    mine = api.post("/v1/models", json={"dataset": theirs, "name": "bobs", **TINY}, headers=bob)
    assert mine.status_code == 202, mine.text
    resp = api.post("/v1/models", json={"dataset": theirs, "name": "bobs2", **TINY}, headers=bob)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "60"
    assert api.post(f"/v1/trainings/{mine.json()['id']}/cancel", headers=bob).status_code == 200
    # bob cannot train on the admin's dataset, nor see the admin's trainings
    resp = api.post("/v1/models", json={"dataset": dataset, "name": "bobs", **TINY}, headers=bob)
    assert resp.status_code == 404 and resp.headers["content-type"] == PROBLEM
    assert api.get(f"/v1/trainings/{first['id']}", headers=bob).status_code == 404
    assert [t["name"] for t in api.get("/v1/trainings", headers=bob).json()["data"]] == ["bobs"]


def test_a_training_resumes_from_its_uploaded_checkpoint_with_the_same_weights(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = upload(api)
    reference = start(api, dataset, name="whole")
    assert run(api, reference["id"]) is TrainOutcome.DONE

    class Killed(BaseException):
        """What the process sees of a SIGKILL: nothing after it runs."""

    crashed = start(api, dataset, name="resumed")
    real_call = wt.Reporter.__call__

    def dies_at_step_5(self: wt.Reporter, step: int, steps: int, loss: float) -> None:
        real_call(self, step, steps, loss)
        if self.stage == "dpm" and step == 5:
            raise Killed

    monkeypatch.setattr(wt.Reporter, "__call__", dies_at_step_5)
    with pytest.raises(Killed):
        run(api, crashed["id"])
    monkeypatch.setattr(wt.Reporter, "__call__", real_call)
    store = trainings(api)
    assert store.storage.exists(f"trainings/{crashed['id']}/checkpoints/.checkpoints/dpm.pt")
    assert api.get(f"/v1/trainings/{crashed['id']}").json()["status"] == "running"

    assert run(api, crashed["id"]) is TrainOutcome.DONE
    done = api.get(f"/v1/trainings/{crashed['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    meta = json.loads(store.storage.get("models/resumed/1/bundle.json"))
    assert meta["training"]["dpm"]["resumed_from"] == 4  # the checkpoint of step 4 was uploaded
    ours, theirs = weights(api, "resumed"), weights(api, "whole")
    for rel in WEIGHTS:
        a, b = load_file_bytes(ours[rel]), load_file_bytes(theirs[rel])
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), rel


def load_file_bytes(data: bytes) -> dict[str, Any]:
    return load_safetensors(data)


def test_a_worker_that_died_is_requeued_by_the_sweep(api: TestClient) -> None:
    dataset = upload(api)
    rec = start(api, dataset)
    store = trainings(api)
    now = time.time()
    assert sweep_trainings(store, now=now) == []  # just enqueued: it waits its turn
    store.mark_running(rec["id"])  # a worker took it and died: no lease
    assert sweep_trainings(store, now=now + store.settings.reconcile_grace_s + 1) == [rec["id"]]
    assert store.acquire_lease(rec["id"], "someone")
    assert sweep_trainings(store, now=now + 1000) == []  # a live worker holds it
    assert len(sent(api)) == 2


def test_trainings_lost_with_redis_are_rebuilt_from_storage_and_resume(api: TestClient) -> None:
    dataset = upload(api)
    ended = start(api, dataset, name="ended")
    api.post(f"/v1/trainings/{ended['id']}/cancel")
    rec = start(api, dataset)
    store = trainings(api)
    store.mark_running(rec["id"])
    prefix = store.settings.redis_prefix
    store.r.delete(*store.r.keys(f"{prefix}:*"))  # Redis lost its data (the datasets' index too)
    assert api.get(f"/v1/trainings/{rec['id']}").status_code == 404
    assert sweep_trainings(store, now=time.time() + 3600) == [rec["id"]]  # rebuilt, then sent again
    back = api.get(f"/v1/trainings/{rec['id']}").json()
    assert back["status"] == "queued"
    assert api.get(f"/v1/trainings/{ended['id']}").json()["status"] == "canceled"
    assert api.get("/v1/trainings").json()["count"] == 2
    assert store.datasets.users(dataset) == [rec["id"]]
    assert api.post("/v1/models", json={"dataset": dataset, "name": "tiny", **TINY}).status_code == 409
    assert run(api, rec["id"]) is TrainOutcome.DONE


def test_a_training_no_worker_serves_fails_after_the_stall_timeout(api: TestClient) -> None:
    rec = start(api, upload(api))
    store = trainings(api)
    later = time.time() + store.settings.stall_timeout_s + 1
    sweep_trainings(store, now=later, live={"train"})  # served (an empty queue: sent again)
    assert api.get(f"/v1/trainings/{rec['id']}").json()["status"] == "queued"
    sweep_trainings(store, now=later, live={"diffexp"})
    failed = api.get(f"/v1/trainings/{rec['id']}").json()
    assert failed["status"] == "failed" and "no worker served queue 'train'" in failed["error"]


def test_a_training_that_fails_n_times_fails_with_the_reason(make_api: Callable[..., TestClient]) -> None:
    api = make_api(train_max_tries=2)
    dataset = upload(api)
    rec = start(api, dataset)
    store = trainings(api)
    store.storage.delete_prefix(f"datasets/{dataset}/images/")  # broken behind the API's back
    assert run(api, rec["id"]) is TrainOutcome.RETRY
    assert sent(api)[-1] == (rec["id"], "train")
    assert run(api, rec["id"]) is TrainOutcome.FAILED
    failed = api.get(f"/v1/trainings/{rec['id']}").json()
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert "failed 2 times" in failed["error"] and "DatasetError" in failed["error"]
    status = store.status_of("tiny")
    assert status is not None and status["status"] == "failed" and status["error"] == failed["error"]
    assert store.datasets.users(dataset) == []
    # a worker killed in every run cannot count its failure: the next start does
    other = start(api, upload(api), name="again")
    store.r.set(store.k(other["id"], "attempts"), 2)
    assert run(api, other["id"]) is TrainOutcome.FAILED
    assert "did not finish in 2 attempts" in api.get(f"/v1/trainings/{other['id']}").json()["error"]


def test_cancel_stops_a_running_training_and_frees_its_dataset(api: TestClient) -> None:
    dataset = upload(api)
    # a checkpoint uploaded at every step, also in the second between the cancel and the worker's check
    rec = start(api, dataset, train_steps=5000, checkpoint_every=1)
    outcome: list[TrainOutcome] = []
    worker = threading.Thread(target=lambda: outcome.append(run(api, rec["id"])))
    worker.start()
    deadline = time.monotonic() + 60
    while not (api.get(f"/v1/trainings/{rec['id']}").json()["progress"] or {}).get("step"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    running = api.get(f"/v1/trainings/{rec['id']}").json()
    assert running["status"] == "running" and running["progress"]["stage_label"] == "I"
    assert running["progress"]["eta_seconds"] is None or running["progress"]["eta_seconds"] > 0
    resp = api.post(f"/v1/trainings/{rec['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    worker.join(30)
    assert outcome == [TrainOutcome.STOPPED]
    assert not list(trainings(api).storage.list_keys(f"trainings/{rec['id']}/checkpoints/"))
    assert api.get(f"/v1/trainings/{rec['id']}").json()["status"] == "canceled"
    assert api.post(f"/v1/trainings/{rec['id']}/cancel").status_code == 409
    assert api.delete(f"/v1/datasets/{dataset}").status_code == 204
    assert trainings(api).status_of("tiny") is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resolution": 20}, "resolution"),
        ({"resolution": 8}, "resolution"),
        ({"resolution": 512}, "resolution"),
        ({"train_steps": 0}, "train_steps"),
        ({"train_steps": 5001}, "train_steps"),
        ({"filter_steps": 5001}, "filter_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"seed": -1}, "seed"),
        ({"name": "Bad Name"}, "name"),
        ({"name": ""}, "name"),
        ({"dataset": "nope"}, "dataset"),
        ({"epochs": 3}, "epochs"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 17}, "num_classes"),
        ({"num_classes": "x"}, "num_classes"),
        ({"unlabelled_share": 1}, "unlabelled_share"),
        ({"unlabelled_share": -0.1}, "unlabelled_share"),
        ({"unlabelled_share": "half"}, "unlabelled_share"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(api: TestClient, change: dict[str, Any], field: str) -> None:
    body = {"dataset": "0" * 32, "name": "ok", **TINY, **change}
    resp = api.post("/v1/models", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == PROBLEM
    assert [e["pointer"] for e in resp.json()["errors"]] == [f"#/{field}"]
    assert sent(api) == []


def test_an_unknown_dataset_is_404_and_an_unknown_training_too(api: TestClient) -> None:
    resp = api.post("/v1/models", json={"dataset": "0" * 32, "name": "ok", **TINY})
    assert resp.status_code == 404 and "dataset" in resp.json()["detail"]
    assert api.get("/v1/trainings/" + "0" * 32).status_code == 404
    assert api.get("/v1/trainings/xyz").status_code == 404
    assert api.post("/v1/trainings/" + "0" * 32 + "/cancel").status_code == 404
    assert trainings(api).status_of("ok") is None


def test_the_event_stream_ends_with_the_outcome(api: TestClient) -> None:
    rec = start(api, upload(api))
    api.post(f"/v1/trainings/{rec['id']}/cancel")
    resp = api.get(f"/v1/trainings/{rec['id']}/events")
    assert resp.status_code == 200
    assert "event: canceled" in resp.text


def test_a_misspelt_query_parameter_of_a_list_is_422(api: TestClient) -> None:
    for path in ("/v1/trainings", "/v1/datasets"):
        resp = api.get(path, params={"limt": 5})
        assert resp.status_code == 422, path
        assert resp.json()["errors"][0]["parameter"] == "limt"
        assert api.get(path, params={"limit": 5, "offset": 0}).status_code == 200


def test_the_schema_bounds_the_steps_by_the_setting(api: TestClient) -> None:
    props = api.get("/openapi.json").json()["components"]["schemas"]["TrainingCreate"]["properties"]
    assert props["train_steps"]["maximum"] == 5000
    assert any(o.get("maximum") == 5000 for o in props["filter_steps"]["anyOf"])
