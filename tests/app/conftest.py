from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.store import JobStore
from tests.conftest import ADMIN_HEADERS


class Enqueued(list[tuple[str, int, str]]):
    """Records the shards the API enqueues (the only stub at this level; Redis and storage are real)."""

    def __call__(self, job_id: str, shard: int, queue: str) -> None:
        self.append((job_id, shard, queue))


@pytest.fixture()
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture()
def enqueued() -> Enqueued:
    return Enqueued()


@pytest.fixture()
def client(settings: Settings, enqueued: Enqueued) -> Iterator[TestClient]:
    """The API as the admin (every /v1 request sends the admin key)."""
    with TestClient(create_app(settings, enqueue=enqueued), headers=ADMIN_HEADERS) as c:
        yield c


@pytest.fixture()
def store(client: TestClient) -> JobStore:
    s: Any = client.app
    return s.state.store  # type: ignore[no-any-return]
