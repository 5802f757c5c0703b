"""Workers get bundles from the registry only: fetched on first use (digest checked), cached on disk,
at most DIFFEXP_MAX_LOADED_BUNDLES in memory (worker/runtime.py get_bundle)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.config import Settings
from app.registry import DigestMismatch, Registry
from app.storage import LocalStorage
from tests.app.test_registry import variant
from tests.worker.conftest import Harness
from worker import runtime
from worker.shard import Outcome


@pytest.fixture()
def settings(settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    empty = tmp_path / "no-bundles"  # this worker has no bundle on its disk
    empty.mkdir()
    return settings_factory(bundles_dir=empty, bundle_cache_dir=tmp_path / "cache", max_loaded_bundles=1)


@pytest.fixture()
def registry(settings: Settings, tiny_bundle: Path, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(LocalStorage(settings.storage_dir), redis.Redis.from_url(settings.redis_url), settings)
    for i in range(2):
        reg.publish(variant(tiny_bundle, tmp_path / f"b{i}", str(i)), "lung", owner="admin")
    runtime._bundles.clear()
    yield reg
    runtime._bundles.clear()


def test_bundles_load_once_and_the_least_recently_used_goes(settings: Settings, registry: Registry) -> None:
    one = runtime.get_bundle("lung@1", settings, registry)
    assert runtime.get_bundle("lung@1", settings, registry) is one  # kept in memory
    assert list(runtime.loaded_bundles()) == ["lung@1"]
    two = runtime.get_bundle("lung", settings, registry)  # the latest: 2; max 1 loaded, so 1 goes
    assert list(runtime.loaded_bundles()) == ["lung@2"] and two is not one
    again = runtime.get_bundle("lung@1", settings, registry)
    assert again is not one and list(runtime.loaded_bundles()) == ["lung@1"]  # loaded anew, from the cache
    assert sorted(p.name.split("-")[0] for p in (settings.bundle_cache_dir / "lung").iterdir()) == ["1", "2"]


def test_lru_keeps_the_recently_used(
    settings: Settings, registry: Registry, tiny_bundle: Path, tmp_path: Path
) -> None:
    s2 = settings.model_copy(update={"max_loaded_bundles": 2})
    one = runtime.get_bundle("lung@1", s2, registry)
    runtime.get_bundle("lung@2", s2, registry)
    assert runtime.get_bundle("lung@1", s2, registry) is one  # used last: 2 is now the oldest
    registry.publish(variant(tiny_bundle, tmp_path / "other", "other"), "other", owner="admin")
    runtime.get_bundle("other", s2, registry)
    assert list(runtime.loaded_bundles()) == ["lung@1", "other@1"]


def test_a_worker_without_bundles_on_disk_expands_with_the_latest_published(
    settings: Settings, registry: Registry, loaded_bundle: object
) -> None:
    h = Harness(settings, loaded_bundle)  # type: ignore[arg-type]
    h.get_bundle = lambda ref: runtime.get_bundle(ref, settings, registry)  # type: ignore[method-assign]
    job_id = h.submit(count=2, model="lung", steps=2, eta=1.0, seed=1)
    assert h.drain() and h.store.get(job_id)["status"] == "succeeded"
    assert h.store.get(job_id)["params"]["model_version"] == "2"  # the latest, recorded in the job
    assert list(runtime.loaded_bundles()) == ["lung@2"]


def test_a_tampered_bundle_is_refused_and_fails_the_job(
    settings: Settings, registry: Registry, loaded_bundle: object
) -> None:
    stored = settings.storage_dir / "models/lung/2/dpm/config.json"
    stored.write_text(stored.read_text().replace("{", "{ ", 1))  # same JSON, other bytes
    with pytest.raises(DigestMismatch):
        runtime.get_bundle("lung@2", settings, registry)
    h = Harness(settings, loaded_bundle)  # type: ignore[arg-type]
    h.get_bundle = lambda ref: runtime.get_bundle(ref, settings, registry)  # type: ignore[method-assign]
    job_id = h.submit(count=2, model="lung", steps=2, eta=1.0, seed=1)
    assert h.drain() == [Outcome.FAILED]
    job = h.store.get(job_id)
    assert job["status"] == "failed" and "digest" in job["error"]
    assert runtime.loaded_bundles() == {}


def test_an_outage_while_fetching_is_waited_out(
    settings: Settings, registry: Registry, loaded_bundle: object
) -> None:
    from app.storage import StorageUnavailable

    calls: list[str] = []

    def flaky(ref: str) -> Any:
        calls.append(ref)
        if len(calls) <= 2:
            raise StorageUnavailable("S3 is down")
        return runtime.get_bundle(ref, settings, registry)

    h = Harness(settings, loaded_bundle)  # type: ignore[arg-type]
    h.get_bundle = flaky  # type: ignore[method-assign]
    job_id = h.submit(count=2, model="lung@1", steps=2, eta=1.0, seed=1)
    h.drain()
    assert h.store.get(job_id)["status"] == "succeeded" and calls[:3] == ["lung@1"] * 3


def test_the_shard_stays_held_while_a_fetch_waits_out_an_outage(
    settings: Settings, registry: Registry, loaded_bundle: object
) -> None:
    """A worker waiting for the store to come back keeps its lease (before: it expired after
    ``lease_ttl_s`` and the reconciler handed the shard to a second worker), and gives the shard up when
    another run took it over anyway."""
    from app.storage import StorageUnavailable

    s = settings.model_copy(update={"lease_ttl_s": 0.3})
    h = Harness(s, loaded_bundle)  # type: ignore[arg-type]
    job_id = h.submit(count=2, model="lung@1", steps=2, eta=1.0, seed=1)
    lease = h.store._k(job_id, "lease", "0")
    waits: list[float] = []

    def slow_outage(ref: str) -> Any:
        if len(waits) < 4:
            waits.append(h.store.r.pttl(lease))
            raise StorageUnavailable("S3 is down")
        return runtime.get_bundle(ref, s, registry)

    import time

    from worker.shard import run_shard

    outcome = run_shard(h.store, slow_outage, job_id, 0, sleep=lambda d: time.sleep(0.4))
    assert outcome is Outcome.DONE
    assert all(ttl > 0 for ttl in waits), waits  # 0.4 s sleeps > 0.3 s TTL: held only if refreshed

    taken = h.submit(count=2, model="lung@1", steps=2, eta=1.0, seed=2)
    key = h.store._k(taken, "lease", "0")

    def taken_over(ref: str) -> Any:
        h.store.r.set(key, "another-run", px=60_000)  # the reconciler gave the shard to another worker
        raise StorageUnavailable("S3 is down")

    assert run_shard(h.store, taken_over, taken, 0, sleep=lambda d: None) is Outcome.SKIPPED
    assert h.store.r.get(key) == b"another-run"  # its lease is left alone
