"""The scheduler's two ways to plan a job agree: ``plan`` over every finished shard, and
``plan_from_summary`` over the running totals ``JobStore.finish_shard`` keeps in Redis."""

from __future__ import annotations

import json
import random

from fastapi.testclient import TestClient

from app.layout import SUMMARY, as_str
from app.scheduler import Summary, plan, plan_from_summary, summarize
from app.store import JobStore


def random_done(rng: random.Random, total: int, k_size: int) -> tuple[dict[int, dict], int]:
    next_shard = rng.randint(0, total)
    done = {}
    for k in rng.sample(range(next_shard), rng.randint(0, next_shard)):
        n = min(k_size, 10_000)
        kept = sorted(rng.sample(range(k * k_size, k * k_size + n), rng.randint(0, n)))
        done[k] = {"generated": n, "kept": kept}
    return done, next_shard


def test_plan_from_summary_is_plan_until_the_job_is_decided() -> None:
    rng = random.Random(0)
    decided = undecided = 0
    for _ in range(3000):
        k_size = rng.choice([1, 2, 4, 16])
        count = rng.randint(1, 40)
        max_attempts = rng.randint(count, count * 4)
        params = {"count": count, "shard_size": k_size, "max_attempts": max_attempts}
        total = -(-max_attempts // k_size)
        done, next_shard = random_done(rng, total, k_size)
        full = plan(params, done, next_shard)
        quick = plan_from_summary(params, summarize(done), next_shard)
        if full.decided:
            assert quick is None, (params, done, next_shard)
            decided += 1
        else:
            assert quick == full, (params, done, next_shard)
            undecided += 1
    assert decided > 100 and undecided > 100  # both branches were exercised


def test_finish_shard_keeps_the_totals_of_done_in_any_order_and_once_per_shard(
    client: TestClient, store: JobStore
) -> None:
    resp = client.post("/v1/jobs", json={"count": 40, "seed": 3, "eta": 0.5})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    k_size = resp.json()["params"]["shard_size"]
    rng = random.Random(1)
    shards = list(range(8))
    rng.shuffle(shards)
    results = {
        k: sorted(rng.sample(range(k * k_size, (k + 1) * k_size), rng.randint(0, k_size))) for k in shards
    }
    for k in shards + shards[:3]:  # the last three finish twice (a shard run again): counted once
        store.finish_shard(job_id, k, k_size, results[k])
        done = {int(f): json.loads(v) for f, v in store.r.hgetall(store._k(job_id, "done")).items()}
        raw = store.r.hgetall(store._k(job_id, SUMMARY))
        assert Summary(**{as_str(f): int(v) for f, v in raw.items()}) == summarize(done)
