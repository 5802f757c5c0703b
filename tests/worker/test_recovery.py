"""No job hangs: each fault below left a job queued or running forever before the fix.

Real Redis and local storage; faults are injected by a storage whose writes fail on demand (the
error a real S3 client raises when its endpoint is down) and by killing leases as SIGKILL would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from botocore.exceptions import EndpointConnectionError

from app.core.config import Settings
from app.layout import manifest_key, record_key, zip_key
from app.reconciler import sweep
from app.storage import LocalStorage, StorageUnavailable
from app.store import JobStore
from models.bundle import Bundle
from tests.integration.servers import wait_for
from tests.worker.conftest import Harness
from worker.shard import Outcome


class FlakyStorage(LocalStorage):
    """Local storage whose ``put`` raises like an unreachable S3 endpoint while ``down(key)`` says so."""

    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.down: Callable[[str], bool] = lambda key: False
        self.failed: list[str] = []

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if self.down(key):
            self.failed.append(key)
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        super().put(key, data, content_type)


@pytest.fixture()
def flaky(settings_factory: Callable[..., Settings], loaded_bundle: Bundle) -> tuple[Harness, FlakyStorage]:
    h = Harness(settings_factory(outage_limit_s=30.0), loaded_bundle)
    storage = FlakyStorage(h.settings.storage_dir)
    h.store.storage = storage
    return h, storage


def fail_first(n: int, match: str) -> Callable[[str], bool]:
    left = [n]

    def down(key: str) -> bool:
        if match in key and left[0] > 0:
            left[0] -= 1
            return True
        return False

    return down


def alive_worker(store: JobStore) -> None:
    """What a live worker's heartbeat writes (the reconciler fails jobs whose queue has none)."""
    store.r.set(store.keys.worker("w@h"), json.dumps({"queues": [store.settings.celery_queue]}), ex=30)


def job_keys(h: Harness, job_id: str) -> dict[str, int]:
    """Redis keys of the job left behind, with their TTL (-1 = none)."""
    return {k.decode(): int(h.store.r.ttl(k)) for k in h.store.r.scan_iter(h.store._k(job_id) + "*")}


def test_storage_down_as_a_shard_starts_the_shard_retries_and_the_job_succeeds(
    flaky: tuple[Harness, FlakyStorage],
) -> None:
    h, storage = flaky
    job_id = h.submit(count=2, seed=3, eta=1.0)
    storage.down = fail_first(3, "job.json")  # mark_running's write of the record
    h.drain()
    rec = h.store.get(job_id)
    assert storage.failed and rec["status"] == "succeeded", rec
    assert int(h.store.r.hget(h.store._k(job_id, "attempts"), "0") or 0) == 1  # the outage cost no attempt


def test_storage_down_while_storing_pairs_is_retried_in_place(flaky: tuple[Harness, FlakyStorage]) -> None:
    h, storage = flaky
    job_id = h.submit(count=3, seed=5, eta=1.0)
    storage.down = fail_first(4, "/images/")
    outcomes = h.drain()
    assert Outcome.RETRY not in outcomes and h.store.get(job_id)["status"] == "succeeded"


def test_storage_down_for_longer_than_the_limit_fails_the_job_with_the_reason(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    h = Harness(settings_factory(outage_limit_s=0.3), loaded_bundle)
    job_id = h.submit(count=2, seed=3, eta=1.0)
    storage = FlakyStorage(h.settings.storage_dir)
    h.store.storage = storage
    storage.down = lambda key: "images/" in key
    assert h.run(*h.queue.pop(0)) is Outcome.FAILED
    storage.down = lambda key: False
    rec = h.store.get(job_id)
    assert rec["status"] == "failed" and "unavailable for 0.3 s" in rec["error"]


def test_a_failed_create_does_not_poison_its_idempotency_key(flaky: tuple[Harness, FlakyStorage]) -> None:
    from app.bundles import resolve_params
    from app.schemas import JobCreate

    h, storage = flaky
    req = JobCreate(count=2, seed=1)
    body = req.model_dump(exclude_none=True)
    storage.down = lambda key: True
    with pytest.raises(StorageUnavailable):
        h.store.create(body=body, params=resolve_params(req, h.settings), idempotency_key="k1")
    assert h.queue == [] and h.store.r.zcard(h.store.keys.jobs) == 0  # nothing half-made stays
    storage.down = lambda key: False
    rec, created = h.store.create(body=body, params=resolve_params(req, h.settings), idempotency_key="k1")
    assert created and rec["status"] == "queued" and h.queue  # a real job, with its shards enqueued
    h.drain()
    assert h.store.get(rec["id"])["status"] == "succeeded"


def test_an_idempotency_key_can_be_used_again_after_its_job_is_deleted(harness: Harness) -> None:
    from app.bundles import resolve_params
    from app.schemas import JobCreate

    req = JobCreate(count=1, seed=1)
    args = {"body": req.model_dump(exclude_none=True), "params": resolve_params(req, harness.settings)}
    first, _ = harness.store.create(**args, idempotency_key="again")
    harness.store.delete(first["id"])
    t0 = time.monotonic()
    second, created = harness.store.create(**args, idempotency_key="again")
    assert created and second["id"] != first["id"] and time.monotonic() - t0 < 1.0


def test_a_finaliser_that_died_before_advancing_is_finished_by_the_redelivery(harness: Harness) -> None:
    job_id = harness.submit(count=1, seed=2, eta=1.0)
    store = harness.store
    real_advance = store.advance
    store.advance = lambda job_id: None  # type: ignore[method-assign]  # the process dies right here
    assert harness.run(*harness.queue.pop(0)) is Outcome.DONE
    store.advance = real_advance  # type: ignore[method-assign]
    assert store.get(job_id)["status"] == "running" and store.shard_done(job_id, 0)
    assert harness.run(job_id, 0) is Outcome.SKIPPED  # the redelivered shard
    assert store.get(job_id)["status"] == "succeeded"
    assert store.storage.exists(zip_key(job_id))  # the zip is written as the job is decided


def test_the_reconciler_finishes_a_job_whose_shards_are_all_done(harness: Harness) -> None:
    job_id = harness.submit(count=1, seed=2, eta=1.0)
    store = harness.store
    real_advance = store.advance
    store.advance = lambda job_id: None  # type: ignore[method-assign]
    harness.run(*harness.queue.pop(0))
    store.advance = real_advance  # type: ignore[method-assign]
    alive_worker(store)
    sweep(store)
    assert store.get(job_id)["status"] == "succeeded"


def test_a_finaliser_killed_while_writing_the_zip_is_taken_over_once_its_lease_expires(
    harness: Harness,
) -> None:
    job_id = harness.submit(count=1, seed=2, eta=1.0)
    store = harness.store
    alive_worker(store)
    real_write = store._write_zip

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # not an Exception: nothing in the process gets to clean up

    store._write_zip = killed  # type: ignore[method-assign,assignment]
    with pytest.raises(KeyboardInterrupt):
        harness.run(*harness.queue.pop(0))
    store._write_zip = real_write  # type: ignore[method-assign]
    assert store.get(job_id)["status"] == "running" and store.stop_reason(job_id) == "decided"
    sweep(store)
    assert store.get(job_id)["status"] == "running"  # the finaliser's lease still lives
    store.r.delete(store._k(job_id, "final"))  # ... until it expires
    assert job_id in sweep(store).advanced
    assert store.get(job_id)["status"] == "succeeded" and store.storage.exists(zip_key(job_id))


def test_a_killed_workers_shard_is_requeued_once_its_lease_expires(harness: Harness) -> None:
    job_id = harness.submit(count=2, seed=1, eta=1.0)
    store = harness.store
    alive_worker(store)
    job, shard = harness.queue.pop(0)
    # the worker took the message, started the shard and was killed (SIGKILL): lease and attempt stay
    store.shard_started(job_id, shard)
    store.bump_attempts(job_id, shard)
    store.r.set(store._k(job_id, "lease", str(shard)), "dead-worker", px=300)
    harness.queue.clear()
    assert sweep(store).requeued == []  # the lease still lives: nothing to do
    lease = store._k(job_id, "lease", str(shard))
    wait_for(lambda: not store.r.exists(lease), 10, "the dead worker's lease to expire")
    assert (job_id, shard) in sweep(store).requeued
    harness.drain()
    assert store.get(job_id)["status"] == "succeeded"
    assert int(store.r.hget(store._k(job_id, "attempts"), str(shard)) or 0) == 2


def test_a_shard_lost_before_its_worker_took_the_lease_is_requeued_after_the_grace(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    h = Harness(settings_factory(reconcile_grace_s=0.2), loaded_bundle)
    job_id = h.submit(count=1, seed=1, eta=1.0)
    alive_worker(h.store)
    h.queue.clear()  # delivered, then lost (Redis went down as the task started)
    assert sweep(h.store).requeued == []  # may be in flight: wait for the grace
    assert sweep(h.store, now=time.time() + 0.3).requeued == [(job_id, 0)]  # a sweep once it has passed
    h.drain()
    assert h.store.get(job_id)["status"] == "succeeded"


def test_a_job_whose_queue_has_no_worker_fails_with_the_reason_in_bounded_time(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    h = Harness(settings_factory(stall_timeout_s=0.3), loaded_bundle)
    job_id = h.submit(count=1)
    sweep(h.store)
    assert h.store.get(job_id)["status"] == "queued"
    assert sweep(h.store, now=time.time() + 0.4).failed == [job_id]  # a sweep once the timeout has passed
    rec = h.store.get(job_id)
    assert rec["status"] == "failed" and "no worker served queue" in rec["error"]


def test_after_redis_lost_its_data_jobs_are_rebuilt_from_storage_and_finish(harness: Harness) -> None:
    store = harness.store
    done_id = harness.submit(count=1, seed=7, eta=1.0)
    harness.drain()
    running_id = harness.submit(count=3, seed=8, eta=1.0)
    harness.run(*harness.queue.pop(0))  # one shard of three done, then Redis loses everything
    want = store.get(done_id)
    for key in store.r.scan_iter(f"{harness.settings.redis_prefix}:*"):
        store.r.delete(key)
    harness.queue.clear()
    alive_worker(store)
    assert sweep(store).rebuilt == 2
    listed = [j["id"] for j in store.list_jobs(limit=10, offset=0)[0]]
    assert listed == [running_id, done_id]
    assert store.get(done_id)["status"] == "succeeded" and store.get(done_id)["progress"] == want["progress"]
    sweep(store)  # schedules the rebuilt job's shards again
    harness.drain()
    assert store.get(running_id)["status"] == "succeeded"
    assert len(store.result_rows(running_id, partial=False)[0]) == 3  # type: ignore[index]


def test_a_finished_job_is_readable_and_a_running_one_cancellable_while_redis_is_down_or_lost(
    harness: Harness,
) -> None:
    store = harness.store
    done_id = harness.submit(count=1, seed=7, eta=1.0)
    harness.drain()
    down = JobStore(
        redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2),
        store.storage,
        harness.settings,
        harness.enqueue,
    )
    assert down.get(done_id)["status"] == "succeeded"  # from storage
    running_id = harness.submit(count=2, seed=1)
    store.r.delete(store._k(running_id))  # Redis lost this record (not yet rebuilt)
    rec = store.cancel(running_id)
    assert rec["status"] == "canceled"
    assert b'"canceled"' in store.storage.get(record_key(running_id))


def test_delete_while_a_worker_stores_a_batch_leaves_nothing_behind(harness: Harness) -> None:
    store = harness.store
    job_id = harness.submit(count=4, seed=3, eta=1.0)
    real_put = store.storage.put
    deleted: list[str] = []

    def put_then_delete(key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        real_put(key, data, content_type)
        if "/images/" in key and not deleted:
            deleted.append(key)
            store.delete(job_id)  # DELETE lands between the PNG write and the pair's record

    store.storage.put = put_then_delete  # type: ignore[method-assign]
    assert harness.run(*harness.queue.pop(0)) is Outcome.STOPPED
    harness.drain()
    assert list(store.storage.list_keys(f"jobs/{job_id}/")) == []
    left = job_keys(harness, job_id)
    assert all(ttl > 0 for ttl in left.values()), left  # only the stop flag, which expires
    assert store.storage.exists(manifest_key(job_id)) is False


def test_a_job_lock_left_by_a_dead_holder_expires_within_seconds(harness: Harness) -> None:
    # bench/faults.py caught a worker SIGKILLed (or Redis restarted) while holding a job's lock: the
    # job stood still for the lock's 60 s TTL. Critical sections are short; so is the TTL now.
    job_id = harness.submit(count=1)
    with harness.store._lock(job_id):
        assert 0 < harness.store.r.pttl(harness.store._k(job_id, "lock")) <= 15_000


def test_an_idempotency_key_claimed_by_a_create_killed_half_way_frees_itself(harness: Harness) -> None:
    from app.bundles import resolve_params
    from app.schemas import JobCreate
    from app.store import CLAIM_TTL_S, STOP_TTL_S

    store = harness.store
    ikey = store._idem_key("half-way")
    assert store._claim_idempotency_key(ikey, "0" * 32, {"count": 1}) is None  # then the process died
    assert 0 < store.r.ttl(ikey) <= CLAIM_TTL_S  # freed within a minute, not held for a week
    store.r.delete(ikey)  # ... as it will have expired
    req = JobCreate(count=1)
    rec, created = store.create(
        body=req.model_dump(exclude_none=True),
        params=resolve_params(req, harness.settings),
        idempotency_key="half-way",
    )
    assert created and store.r.ttl(ikey) > CLAIM_TTL_S and store.r.ttl(ikey) <= STOP_TTL_S
