"""Honest progress: the pure estimates, and the store's counts over every shard that ran."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from app.bundles import resolve_params, shard_size_for
from app.core.config import Settings
from app.progress import (
    ShardReport,
    elapsed_seconds,
    estimate,
    furthest_phase,
    job_progress,
    parse_report,
)
from app.schemas import JobCreate, JobParams, JobStatus, SamplingSettings
from app.store import JobNotFound, JobStore

RUNNING, SUCCEEDED = JobStatus.RUNNING, JobStatus.SUCCEEDED
T0 = "2025-01-01T00:00:00+00:00"
T0_S = 1735689600.0


# ---- the pure functions
@pytest.mark.parametrize(
    ("generated", "kept", "target", "elapsed", "status", "pps", "eta"),
    [
        (30, 12, 20, 60.0, RUNNING, 0.5, 40.0),  # 8 more to keep at 12 a minute: 40 s
        (10, 3, 10, 7.0, RUNNING, 1.429, 16.3),  # rounded: 10/7 pairs/s, 7 x 7/3 s
        (6, 0, 4, 3.0, RUNNING, 2.0, None),  # nothing kept yet: no rate to extrapolate
        (20, 25, 20, 10.0, RUNNING, 2.0, 0.0),  # more kept than asked (later shards): never below 0
        (0, 0, 4, 5.0, RUNNING, 0.0, None),  # running, nothing generated yet
        (0, 0, 4, None, JobStatus.QUEUED, None, None),  # not started
        (0, 0, 4, 0.0, RUNNING, None, None),  # no time has passed: no rate
        (16, 9, 1, 8.0, SUCCEEDED, 2.0, 0.0),  # the result is there
        (16, 9, 20, 8.0, JobStatus.FAILED, 2.0, None),  # no result is coming
        (4, 2, 20, 8.0, JobStatus.CANCELED, 0.5, None),
        (0, 0, 4, None, JobStatus.CANCELED, None, None),  # canceled while queued
    ],
)
def test_estimate(
    generated: int,
    kept: int,
    target: int,
    elapsed: float | None,
    status: JobStatus,
    pps: float | None,
    eta: float | None,
) -> None:
    got = estimate(generated=generated, kept=kept, target=target, elapsed_s=elapsed, status=status)
    assert (got.pairs_per_second, got.eta_seconds) == (pps, eta)


def test_elapsed_seconds_from_start_to_end_or_now() -> None:
    assert elapsed_seconds(T0, None, now=T0_S + 12.5) == 12.5
    assert elapsed_seconds(T0, "2025-01-01T00:01:00+00:00", now=T0_S + 999) == 60.0
    assert elapsed_seconds(None, None, now=T0_S) is None
    assert elapsed_seconds(T0, None, now=T0_S - 2) == 0.0  # the API's clock behind a worker's


def test_shard_reports_parse_old_and_new_entries() -> None:
    assert parse_report(b"5,3") == ShardReport(5, 3, None, 0)  # before phases were reported
    assert parse_report("8,5,image,8") == ShardReport(8, 5, "image", 8)
    assert parse_report(b"16,9,,0") == ShardReport(16, 9, None, 0)
    assert parse_report("2,1,bogus,2") == ShardReport(2, 1, None, 2)


def test_the_phase_is_that_of_the_running_shard_furthest_along() -> None:
    assert furthest_phase([]) is None
    assert furthest_phase([ShardReport(16, 9, None, 16)]) is None  # finished shards do not run
    two = ShardReport(2, 1, "mask", 2)  # its second batch: further than any first batch
    assert furthest_phase([two, ShardReport(0, 0, "filter", 0), ShardReport(8, 8, None, 8)]) == "mask"
    assert furthest_phase([two, ShardReport(2, 2, "image", 2)]) == "image"


def test_job_progress_sums_every_shard() -> None:
    rec = {"status": "running", "params": {"count": 4}, "started_at": T0, "completed_at": None}
    values = [b"2,1,,2", b"4,2,filter,4", b"2,0,image,2"]
    assert job_progress(rec, values, now=T0_S + 4).model_dump() == {
        "target": 4,
        "generated": 8,
        "kept": 3,
        "discarded": 5,
        "pairs_per_second": 2.0,
        "eta_seconds": 1.3,  # 1 more at 3 per 4 s
        "phase": "filter",
    }
    done = rec | {"status": "succeeded", "completed_at": "2025-01-01T00:00:02+00:00"}
    assert job_progress(done, values, now=T0_S + 100).model_dump() == {
        "target": 4,
        "generated": 8,
        "kept": 3,
        "discarded": 5,
        "pairs_per_second": 4.0,  # over its running time, not until now
        "eta_seconds": 0.0,
        "phase": None,  # a finished job does nothing
    }


# ---- a job smaller than a shard gets a smaller shard
@pytest.mark.parametrize(("count", "shard"), [(1, 8), (8, 8), (9, 16), (16, 16), (17, 16), (1000, 16)])
def test_a_job_smaller_than_a_shard_gets_whole_batches_only(
    settings_factory: Callable[..., Settings], count: int, shard: int
) -> None:
    settings = settings_factory(shard_size=16, batch_size=8, max_count=1000)
    assert shard_size_for(count, settings) == shard
    assert resolve_params(JobCreate(count=count), settings).shard_size == shard


# ---- the store: honest counts
def create(store: JobStore, count: int, shard_size: int, batch_size: int) -> str:
    """A job with these sizes, whatever the settings (the record is what a worker obeys)."""
    params = JobParams(
        model="tiny",
        count=count,
        seed=1,
        eta=0.5,
        max_attempts=20 * count,
        sampling=SamplingSettings(),
        batch_size=batch_size,
        shard_size=shard_size,
    )
    rec, _ = store.create(body={"count": count}, params=params)
    return str(rec["id"])


def store_kept(store: JobStore, job_id: str, indices: list[int]) -> None:
    for i in indices:
        name = f"s1-{i:06d}"
        store.put_pair(job_id, name=name, index=i, seed=1, dice_loss=0.1, image_png=b"i", mask_png=b"m")


def test_count_1_with_a_shard_of_16_reports_the_16_generated_and_9_kept(store: JobStore) -> None:
    """The case of the issue: ``{"count": 1}`` said 1 generated while a whole shard of 16 ran and
    stored 9 kept pairs."""
    job_id = create(store, count=1, shard_size=16, batch_size=8)
    store.mark_running(job_id)
    store.shard_progress(job_id, 0, 0, 0, "mask", 0)
    kept = [0, 2, 3, 5, 7, 8, 10, 12, 15]
    store_kept(store, job_id, kept[:5])
    store.shard_progress(job_id, 0, 8, 5, "mask", 8)  # the first batch is stored
    store_kept(store, job_id, kept[5:])
    store.finish_shard(job_id, 0, 16, kept)
    rec = store.get(job_id)
    assert rec["status"] == "succeeded"
    progress = rec["progress"]
    assert progress["pairs_per_second"] > 0
    assert progress | {"pairs_per_second": None} == {
        "target": 1,
        "generated": 16,
        "kept": 9,
        "discarded": 7,
        "pairs_per_second": None,
        "eta_seconds": 0.0,
        "phase": None,
    }
    rows, final = store.result_rows(job_id, partial=False) or ([], False)
    assert final and [r["index"] for r in rows] == ["0"]  # the result: the one pair asked for
    assert store._load_stored(job_id)["progress"] == progress  # recorded for when Redis is lost


def test_shards_beyond_those_the_result_needs_count(store: JobStore) -> None:
    job_id = create(store, count=3, shard_size=2, batch_size=2)
    store.mark_running(job_id)
    store_kept(store, job_id, [1])
    store.finish_shard(job_id, 0, 2, [1])  # 1 of 2 kept: two more shards are scheduled
    assert store._next_shard(job_id) == 3
    store_kept(store, job_id, [4, 5])
    store.finish_shard(job_id, 2, 2, [4, 5])  # shard 2 first: the job waits for shard 1
    assert store.get(job_id)["status"] == "running"
    store_kept(store, job_id, [2, 3])
    store.finish_shard(job_id, 1, 2, [2, 3])  # decided: pairs 1, 2, 3
    rec = store.get(job_id)
    assert rec["status"] == "succeeded"
    rows, _ = store.result_rows(job_id, partial=False) or ([], False)
    assert [r["index"] for r in rows] == ["1", "2", "3"]
    p = rec["progress"]
    assert (p["generated"], p["kept"], p["discarded"]) == (6, 5, 1)  # was (4, 3, 1): shard 2 ignored


def test_a_batch_stored_after_the_job_finished_counts_and_is_recorded(store: JobStore) -> None:
    job_id = create(store, count=8, shard_size=8, batch_size=2)
    store.mark_running(job_id)
    store.shard_progress(job_id, 0, 2, 2, "mask", 2)
    canceled = store.cancel(job_id)
    assert canceled["progress"]["generated"] == 2 and canceled["progress"]["phase"] is None
    store.shard_progress(job_id, 0, 4, 3, "mask", 4)  # the batch in flight lands after the cancel
    assert store.get(job_id)["progress"]["generated"] == 4
    assert store._load_stored(job_id)["progress"]["generated"] == 2
    store.settle_progress(job_id)  # what the stopped worker does
    stored = store._load_stored(job_id)["progress"]
    assert (stored["generated"], stored["kept"], stored["discarded"]) == (4, 3, 1)
    assert stored == store.get(job_id)["progress"]


def test_counts_never_go_back_when_a_shard_runs_again(store: JobStore) -> None:
    job_id = create(store, count=8, shard_size=8, batch_size=2)
    store.mark_running(job_id)
    store.shard_progress(job_id, 0, 4, 3, "image", 4)
    store.shard_progress(job_id, 0, 0, 0, "mask", 0)  # its worker died; another runs the shard anew
    p = store.get(job_id)["progress"]
    assert (p["generated"], p["kept"], p["phase"]) == (4, 3, "mask")
    store.shard_progress(job_id, 0, 6, 4, "mask", 6)  # past where the first run got
    p = store.get(job_id)["progress"]
    assert (p["generated"], p["kept"], p["phase"]) == (6, 4, "mask")
    store.shard_progress(job_id, 0, 0, 0, None)  # the run stopped: counts stay, the phase goes
    p = store.get(job_id)["progress"]
    assert (p["generated"], p["kept"], p["phase"]) == (6, 4, None)


def test_every_visible_change_increments_the_version(store: JobStore) -> None:
    job_id = create(store, count=8, shard_size=8, batch_size=2)
    assert store.version(job_id) == 1
    store.mark_running(job_id)
    assert store.version(job_id) == 2
    for phase in ("mask", "image", "filter"):
        store.shard_progress(job_id, 0, 0, 0, phase, 0)
    assert store.version(job_id) == 5
    store.cancel(job_id)
    assert store.version(job_id) == 6
    assert store.version("f" * 32) is None


def test_a_deleted_job_leaves_no_progress_or_version_behind(store: JobStore, settings: Settings) -> None:
    job_id = create(store, count=8, shard_size=8, batch_size=2)
    store.shard_progress(job_id, 0, 2, 1, "image", 2)
    store.delete(job_id)
    assert store.shard_progress(job_id, 0, 4, 2, "mask", 4) is False  # a worker still running
    left = sorted(k.decode() for k in store.r.scan_iter(f"{settings.redis_prefix}:job:{job_id}*"))
    assert left == [f"{settings.redis_prefix}:job:{job_id}:stop"]  # tells the worker to stop; expires
    with pytest.raises(JobNotFound):
        store.get(job_id)


# ---- the ETA counts down between batches (the counts move a batch at a time)
@pytest.mark.parametrize(
    ("elapsed", "counted", "pps", "eta"),
    [
        (14.0, 14.0, 0.571, 14.0),  # just counted: 8 kept in 14 s, 8 more to keep
        (20.0, 14.0, 0.571, 8.0),  # 6 s later, nothing new: 6 s less (it was 20 s, growing)
        (40.0, 14.0, 0.571, 0.0),  # the batch runs late: 0, never negative
        (20.0, None, 0.4, 20.0),  # an entry from before ``at`` was recorded: as before
    ],
)
def test_estimate_counts_down_from_the_last_count(
    elapsed: float, counted: float | None, pps: float, eta: float
) -> None:
    got = estimate(generated=8, kept=8, target=16, elapsed_s=elapsed, status=RUNNING, counted_s=counted)
    assert (got.pairs_per_second, got.eta_seconds) == (pps, eta)


def test_the_eta_of_a_running_job_never_grows_while_nothing_changes(store: JobStore) -> None:
    """The page said "14 s left", then "37 s left" during the next batch: ETA = pairs to keep at the
    rate so far, with the running time growing and the kept count standing still."""
    job_id = create(store, count=16, shard_size=16, batch_size=8)
    store.mark_running(job_id)
    store.shard_progress(job_id, 0, 0, 0, "mask", 0)
    store.shard_progress(job_id, 0, 8, 4, "mask", 8)  # the first batch: 4 kept
    rec = store.r.get(store._k(job_id))
    values = store.r.hvals(store._k(job_id, "prog"))
    (at,) = [parse_report(v).at for v in values]
    assert at is not None
    record = json.loads(rec)  # it started 14 s before the first batch was counted
    record["started_at"] = datetime.fromtimestamp(at - 14.0, UTC).isoformat()
    etas = [job_progress(record, values, now=at + dt).eta_seconds for dt in (0.0, 5.0, 10.0, 60.0)]
    assert etas == sorted(etas, reverse=True) and etas[-1] == 0.0, etas
    assert etas[0] == 42.0 and etas[1] == 37.0  # 12 more to keep at 4 per 14 s, then 5 s less
    # the second batch's phases (the counts do not rise) keep the time of the last count
    store.shard_progress(job_id, 0, 8, 4, "image", 8)
    assert [parse_report(v).at for v in store.r.hvals(store._k(job_id, "prog"))] == [at]
    store.shard_progress(job_id, 0, 16, 9, "filter", 16)  # counted again: a new time
    (later,) = [parse_report(v).at for v in store.r.hvals(store._k(job_id, "prog"))]
    assert later is not None and later >= at
