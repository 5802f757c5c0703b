"""DELETE /v1/datasets/{id} that outlasts the dataset lock's TTL (a 10 000-pair dataset): 204, not 503."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import datasets as datasets_module
from app.core.config import Settings
from app.datasets import DatasetStore
from app.main import create_app
from app.storage import Storage
from tests.app.conftest import Enqueued
from tests.conftest import ADMIN_HEADERS
from tests.utils.archives import shapes_members, zip_bytes

TTL_S = 1


class SlowDelete:
    """The real storage, whose ``delete_prefix`` lasts past the lock's TTL (as 20 000 objects do).

    It returns once the lock key is gone (the TTL ran out: the defect) or 2.5 TTLs have passed
    with the lock still held (it is being renewed)."""

    def __init__(self, inner: Storage, r: Any, lock_key: Callable[[str], str]) -> None:
        self.inner = inner
        self.r = r
        self.lock_key = lock_key
        self.lock_seen: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete_prefix(self, prefix: str) -> int:
        key = self.lock_key(prefix.split("/")[1])
        deadline = time.monotonic() + 2.5 * TTL_S
        while time.monotonic() < deadline and self.r.exists(key):
            time.sleep(0.05)
        self.lock_seen.append(bool(self.r.exists(key)))
        return self.inner.delete_prefix(prefix)


@pytest.fixture()
def client(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setattr(datasets_module, "LOCK_TTL_S", TTL_S)
    with TestClient(create_app(settings_factory(), enqueue=Enqueued()), headers=ADMIN_HEADERS) as c:
        yield c


def test_a_delete_longer_than_the_lock_ttl_keeps_the_lock_and_answers_204(client: TestClient) -> None:
    resp = client.post(
        "/v1/datasets", files={"file": ("d.zip", zip_bytes(shapes_members(8)), "application/zip")}
    )
    assert resp.status_code == 201, resp.text
    dataset_id = resp.json()["id"]
    store: DatasetStore = client.app.state.datasets  # type: ignore[attr-defined]
    slow = SlowDelete(store.storage, store.r, lambda i: store._k(i, "lock"))
    store.storage = slow  # type: ignore[assignment]

    resp = client.delete(f"/v1/datasets/{dataset_id}")
    assert resp.status_code == 204, resp.text
    assert slow.lock_seen == [True]  # held all along: nobody else could use or delete it meanwhile
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert not store.r.exists(store._k(dataset_id, "lock"))  # released
