"""The reconciler: a periodic sweep that leaves no job queued or running with nothing working on it.

Every process of the service (the API and each worker) runs ``Reconciler``; a Redis key makes one
sweep per interval happen in one of them. A sweep, for every queued or running job:

- calls ``advance`` (decides a job whose shards are all done: the finaliser may have died between
  a shard's "done" and its ``advance``, or timed out on the job's lock);
- requeues each lost shard: enqueued, not finished, no live lease, and not waiting in the queue
  (its worker was killed, or Redis was down as a task started). A killed worker's shard is so picked
  up within ``lease_ttl_s + reconcile_interval_s``; Celery's visibility timeout is only a backstop;
- fails, with the reason, a job whose queue no live worker has served for ``stall_timeout_s``.

When Redis lost its data (the ``P:alive`` marker is gone), the first sweep rebuilds the job list from
the ``job.json`` records in storage, and reruns unfinished jobs from their first shard: pairs are
keyed by index and seeded by index, so a rerun rewrites identical objects.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from app import counters
from app.heartbeats import live_beats
from app.layout import as_str, owner_id_of, record_key
from app.schemas import JobStatus
from app.store import DECIDED, JobStore, now_iso
from app.trainings import TrainingStore, sweep_trainings

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    advanced: list[str] = field(default_factory=list)
    requeued: list[tuple[str, int]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    rebuilt: int = 0
    requeued_trainings: list[str] = field(default_factory=list)


def worker_queues(store: JobStore) -> set[str]:
    """Queues served by workers whose heartbeat is alive (``worker.celery_app`` writes them)."""
    queues: set[str] = set()
    for value in live_beats(store.r, store.keys.workers_pattern()):
        if isinstance(value, dict) and isinstance(value.get("queues"), list):
            queues.update(str(q) for q in value["queues"])
        else:
            queues.add(store.settings.celery_queue)  # an old heartbeat without its queues
    return queues


def rebuild_from_storage(store: JobStore) -> int:
    """Put back in Redis every job whose ``job.json`` is in storage but not in Redis."""
    n = 0
    for key in store.storage.list_keys("jobs/"):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "job.json" or store.r.exists(store.keys.job(parts[1])):
            continue
        try:
            rec: dict[str, Any] = json.loads(store.storage.get(record_key(parts[1])))
        except (KeyError, ValueError):
            continue
        job_id = rec["id"]
        created = datetime.fromisoformat(rec["created_at"]).timestamp()
        if not JobStatus(rec["status"]).is_terminal():
            rec.update(status=JobStatus.QUEUED.value, started_at=None)
            rec.pop("progress", None)
            store._save(rec)
            store.r.sadd(store.keys.active, job_id)
            if owner := owner_id_of(rec):
                store.r.sadd(store.keys.owner_active(owner), job_id)
        else:
            store.r.set(store.keys.job(job_id), json.dumps(rec, sort_keys=True))
            hook = rec.get("webhook") or {}
            if hook.get("status") == "pending":  # its due time was in the Redis that was lost
                store.r.zadd(store.keys.webhooks, {job_id: float(hook.get("next_attempt_at") or 0)})
        store.r.zadd(store.keys.jobs, {job_id: created})
        if owner := owner_id_of(rec):
            store.r.zadd(store.keys.owner_jobs(owner), {job_id: created})
        n += 1
    return n


def sweep(store: JobStore, *, now: float | None = None) -> Sweep:
    """One pass over every queued or running job, in a handful of pipelined round trips to Redis
    whatever the number of jobs (it runs every few seconds inside the API and the workers)."""
    now = time.time() if now is None else now
    s = store.settings
    out = Sweep()
    keys = store.keys
    if not store.r.exists(keys.alive):
        out.rebuilt = rebuild_from_storage(store)
        store.r.set(keys.alive, now_iso())
        if out.rebuilt:
            log.warning("Redis had lost its data: %d jobs rebuilt from storage", out.rebuilt)
    ids = store.active_ids()
    if not ids:
        return out
    recs = {
        i: json.loads(raw)
        for i, raw in zip(ids, store.r.mget([keys.job(i) for i in ids]), strict=True)
        if raw
    }
    for job_id in set(ids) - set(recs):
        store.forget_active(job_id)  # deleted
    live = worker_queues(store)
    serving: dict[str, dict[str, Any]] = {}
    stalled_since: dict[str, float] = {}
    for job_id, rec in recs.items():
        if JobStatus(rec["status"]).is_terminal():
            store.forget_active(job_id, owner_id_of(rec))
        elif str(rec.get("queue") or s.celery_queue) in live:
            serving[job_id] = rec
        else:
            queue = str(rec.get("queue") or s.celery_queue)
            if queue not in stalled_since:
                stalled_since[queue] = _stalled_since(store, queue, now)
            out.failed += _fail_if_stalled(store, job_id, rec, now, stalled_since[queue])
    for queue in live:
        store.r.delete(f"{keys.prefix}:stalled:{queue}")

    pipe = store.r.pipeline(transaction=False)
    for job_id in serving:
        pipe.get(keys.job(job_id, "next"))
        pipe.hkeys(keys.job(job_id, "done"))
        pipe.hgetall(keys.job(job_id, "pending"))
        pipe.get(keys.job(job_id, "stop"))
        pipe.exists(keys.job(job_id, "final"))
    replies = pipe.execute()
    candidates: list[tuple[str, int]] = []
    queue_empty: dict[str, bool] = {}  # one LLEN per queue per sweep
    for n, (job_id, rec) in enumerate(serving.items()):
        raw_next, raw_done, raw_pending, stop, finalising = replies[5 * n : 5 * n + 5]
        next_shard = int(raw_next or 0)
        done = {int(k) for k in raw_done}
        pending = {int(k): float(v) for k, v in raw_pending.items()}
        if stop is not None:  # decided (or stopping): only an abandoned finaliser needs help
            if as_str(stop) == DECIDED and not finalising:
                _advance(store, job_id, out)
            continue
        if all(k in done for k in range(next_shard)):
            _advance(store, job_id, out)  # nothing in flight: decide or schedule more
            continue
        queue = str(rec.get("queue") or s.celery_queue)
        if queue not in queue_empty:
            queue_empty[queue] = store.r.llen(queue) == 0

        for k in range(next_shard):
            if k in done:
                continue
            if k in pending:
                age = now - pending[k]
                # In the queue, or taken by a worker this instant: leave it, unless the queue has
                # drained since (the message was lost) or it has waited implausibly long.
                if not ((queue_empty[queue] and age >= s.reconcile_grace_s) or age >= s.stall_timeout_s):
                    continue
            candidates.append((job_id, k))
    if candidates:
        pipe = store.r.pipeline(transaction=False)
        for job_id, k in candidates:
            pipe.exists(keys.job(job_id, "lease", str(k)))
        for (job_id, k), leased in zip(candidates, pipe.execute(), strict=True):
            if leased:
                continue
            store.requeue(job_id, k)
            out.requeued.append((job_id, k))
            counters.count(store.r, keys.prefix, "shards_lost", model=counters.model_of(serving[job_id]))
            log.warning("job %s: shard %s was lost (no live lease, not queued); requeued", job_id, k)
    return out


def _advance(store: JobStore, job_id: str, out: Sweep) -> None:
    try:
        store.advance(job_id)
    except redis.exceptions.LockError:
        return  # someone holds the job: next sweep
    out.advanced.append(job_id)


def _stalled_since(store: JobStore, queue: str, now: float) -> float:
    """Since when no live worker has served ``queue`` (this sweep's time if it just happened)."""
    key = f"{store.keys.prefix}:stalled:{queue}"
    store.r.set(key, str(now), nx=True)
    return float(as_str(store.r.get(key) or now))


def _fail_if_stalled(
    store: JobStore, job_id: str, rec: dict[str, Any], now: float, since: float
) -> list[str]:
    """Fail the job once no live worker has served its queue for ``stall_timeout_s`` of its life."""
    s = store.settings
    since = max(since, datetime.fromisoformat(rec["created_at"]).timestamp())
    if now - since < s.stall_timeout_s:
        return []
    queue = str(rec.get("queue") or s.celery_queue)
    store.fail(job_id, f"no worker served queue {queue!r} for {s.stall_timeout_s:g} s")
    return [job_id]


class Reconciler:
    """Runs ``sweep`` every ``reconcile_interval_s`` in a daemon thread; one process per interval wins."""

    def __init__(self, store: JobStore, trainings: TrainingStore | None = None) -> None:
        self.store = store
        self.trainings = trainings
        self.interval = store.settings.reconcile_interval_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Sweep | None:
        """One sweep if no other process swept within the interval."""
        key = self.store.keys.reconciler
        if not self.store.r.set(key, self.token, nx=True, px=max(1, int(self.interval * 1000))):
            return None
        out = sweep(self.store)
        if self.trainings is not None:
            out.requeued_trainings = sweep_trainings(self.trainings, live=worker_queues(self.store))
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # Redis or storage down: the next tick tries again
                log.warning("reconciler sweep failed", exc_info=True)

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
