from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from app.bundles import resolve_params
from app.core.config import Settings
from app.schemas import JobCreate
from app.storage import LocalStorage
from app.store import JobStore
from models.bundle import Bundle
from worker.shard import Outcome, run_shard

torch.set_num_threads(1)  # two torch processes on two cores slow each other down tenfold


class Harness:
    """A job store on the real Redis and local storage, whose queue is a list that tests drain by hand."""

    def __init__(self, settings: Settings, bundle: Bundle) -> None:
        self.settings = settings
        self.bundle = bundle
        self.queue: list[tuple[str, int]] = []
        r = redis.Redis.from_url(settings.redis_url)
        self.store = JobStore(r, LocalStorage(settings.storage_dir), settings, self.enqueue)

    def enqueue(self, job_id: str, shard: int, queue: str) -> None:
        self.queue.append((job_id, shard))

    def get_bundle(self, name: str) -> Bundle:
        return self.bundle

    def submit(self, **body: Any) -> str:
        req = JobCreate(**body)
        rec, _ = self.store.create(
            body=req.model_dump(exclude_none=True), params=resolve_params(req, self.settings)
        )
        return str(rec["id"])

    def run(self, job_id: str, shard: int) -> Outcome:
        return run_shard(self.store, self.get_bundle, job_id, shard, sleep=lambda s: time.sleep(min(s, 0.05)))

    def drain(self, order: str = "fifo", seed: int = 0) -> list[Outcome]:
        rng = random.Random(seed)
        outcomes = []
        while self.queue:
            i = {"fifo": 0, "lifo": -1}.get(order, rng.randrange(len(self.queue)))
            outcomes.append(self.run(*self.queue.pop(i)))
        return outcomes


@pytest.fixture(scope="session")
def loaded_bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


@pytest.fixture()
def harness(settings_factory: Callable[..., Settings], loaded_bundle: Bundle) -> Harness:
    return Harness(settings_factory(), loaded_bundle)
