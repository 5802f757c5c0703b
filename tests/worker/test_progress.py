"""Progress as a real shard reports it: phase by phase, every pair counted, and no more work than a
small job needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.core.config import Settings
from app.schemas import JobParams
from models.bundle import Bundle
from tests.worker.conftest import Harness
from tests.worker.test_shard import ETA, manifest, objects
from worker.shard import Outcome


def record_reports(harness: Harness, job_id: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every progress write of the shard, with the job's phase as the API shows it just after."""
    writes: list[tuple[Any, ...]] = []
    report = harness.store.shard_progress

    def recorded(*args: Any, **kwargs: Any) -> bool:
        ok = report(*args, **kwargs)
        phase = args[4] if len(args) > 4 else kwargs.get("phase")
        writes.append((phase, args[2], args[3], harness.store.get(job_id)["progress"]["phase"]))
        return ok

    finish = harness.store.finish_shard

    def finished(job_id: str, shard: int, generated: int, kept: list[int]) -> None:
        finish(job_id, shard, generated, kept)  # the last report, with the result, in one round trip
        writes.append((None, generated, len(kept), harness.store.get(job_id)["progress"]["phase"]))

    monkeypatch.setattr(harness.store, "shard_progress", recorded)
    monkeypatch.setattr(harness.store, "finish_shard", finished)
    return writes


def test_a_shard_reports_each_phase_of_each_batch_and_no_step(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(settings_factory(shard_size=4, batch_size=2), loaded_bundle)
    job_id = harness.submit(count=4, seed=5, steps=6)  # one shard of two batches, 6 steps per phase
    writes = record_reports(harness, job_id, monkeypatch)
    assert harness.drain() == [Outcome.DONE]
    # (phase written, generated, kept, the job's phase then): one write at the start, one when each
    # phase of a batch is done, none per step
    assert writes == [
        ("mask", 0, 0, "mask"),
        ("image", 0, 0, "image"),
        ("filter", 0, 0, "filter"),
        ("mask", 2, 2, "mask"),  # batch 0 scored and stored: batch 1 samples masks
        ("image", 2, 2, "image"),
        ("filter", 2, 2, "filter"),
        (None, 4, 4, None),  # finish_shard: the last batch's counts; the job is decided after
    ]
    p = harness.store.get(job_id)["progress"]
    assert (p["generated"], p["kept"], p["discarded"], p["phase"], p["eta_seconds"]) == (4, 4, 0, None, 0.0)


def test_count_1_in_a_shard_of_16_counts_all_16(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    """The issue's case, sampled for real: a job of 1 pair whose record says shards of 16 (as every
    job got before shards were cut to the job's size)."""
    harness = Harness(settings_factory(shard_size=16, batch_size=8), loaded_bundle)
    params = JobParams.model_validate(
        {"model": "tiny", "count": 1, "seed": 8, "eta": ETA, "max_attempts": 20, "batch_size": 8}
        | {"shard_size": 16, "sampling": {"steps": 4}}
    )
    rec, _ = harness.store.create(body={"count": 1}, params=params)
    job_id = rec["id"]
    assert harness.drain() == [Outcome.DONE]
    rec = harness.store.get(job_id)
    assert rec["status"] == "succeeded", rec["error"]
    kept = len(objects(harness, job_id)) // 2  # every pair Stage IV kept is stored
    p = rec["progress"]
    assert (p["target"], p["generated"], p["kept"], p["discarded"]) == (1, 16, kept, 16 - kept)
    assert 1 < kept < 16 and len(manifest(harness, job_id)) == 1


def test_a_job_smaller_than_a_shard_samples_only_its_batches(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    harness = Harness(settings_factory(shard_size=16, batch_size=2), loaded_bundle)
    job_id = harness.submit(count=1, seed=2)  # η = 1: the first pair is kept
    assert harness.drain() == [Outcome.DONE]
    rec = harness.store.get(job_id)
    assert rec["params"]["shard_size"] == 2
    assert (rec["progress"]["generated"], rec["progress"]["kept"]) == (2, 2)  # one batch, not 16 pairs


def test_same_seed_same_kept_pairs_with_two_shard_sizes(
    settings_factory: Callable[..., Settings], loaded_bundle: Bundle
) -> None:
    small = Harness(settings_factory(shard_size=2, batch_size=2), loaded_bundle)
    large = Harness(settings_factory(shard_size=6, batch_size=2), loaded_bundle)
    a = small.submit(count=6, eta=ETA, seed=21)
    b = large.submit(count=6, eta=ETA, seed=21)
    small.drain()
    large.drain()
    assert small.store.get(a)["params"]["shard_size"] == 2 and large.store.get(b)["params"]["shard_size"] == 6
    rows_a, rows_b = manifest(small, a), manifest(large, b)
    assert len(rows_a) == 6 and [r["name"] for r in rows_a] == [r["name"] for r in rows_b]
    assert [r["dice_loss"] for r in rows_a] == [r["dice_loss"] for r in rows_b]
    chosen = {r["name"] for r in rows_a}
    pairs_a = {k.split("/", 2)[2]: v for k, v in objects(small, a).items() if k.split("/")[-1][:-4] in chosen}
    pairs_b = {k.split("/", 2)[2]: v for k, v in objects(large, b).items() if k.split("/")[-1][:-4] in chosen}
    assert len(pairs_a) == 12 and pairs_a == pairs_b  # bit for bit
