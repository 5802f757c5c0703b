"""Job records: Redis holds the live state, storage holds ``job.json`` (rewritten at every state change)
and the final ``manifest.csv``, so a finished job survives the loss of Redis.

Only this module changes a job's status. A job of ``count`` kept pairs is cut into shards of
``shard_size`` pair indices; shard k covers ``[k*K, (k+1)*K)`` (truncated at ``max_attempts``).
``advance`` runs after every finished shard, under a per-job lock: it declares the job done as soon
as the shards 0..j are all finished and hold ``count`` kept pairs between them (the result is the
``count`` lowest kept indices, whatever the number of workers), or schedules more shards from the
yield seen so far.

Redis keys (``P`` = settings.redis_prefix, ``J`` = ``P:job:ID``):
    J               the record (JSON)          J:prog      shard -> "generated,kept"
    J:pairs         index -> kept pair (JSON)  J:done      shard -> {"generated", "kept": [indices]}
    J:attempts      shard -> starts            J:lease:k   token of the worker running shard k
    J:next          next shard to enqueue      J:stop      why workers must stop (set once terminal)
    P:jobs          zset of ids by creation    P:idem:KEY  {"job_id", "body"} of an Idempotency-Key
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis

from app.core.config import Settings
from app.queue import Enqueue
from app.schemas import JobParams, JobStatus, Progress
from app.storage import ObjectNotFound, Storage

MANIFEST_FIELDS = ["name", "index", "seed", "dice_loss", "model", "eta"]
SAMPLING_FIELDS = ["steps", "order", "w_cf", "w_cg", "guidance", "tau", "scale", "clip_x0"]
STOP_TTL_S = 7 * 24 * 3600

_LEASE_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""
_LEASE_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""


class JobNotFound(LookupError):
    pass


class JobConflict(Exception):
    """The request conflicts with the job's state (finished already) or an Idempotency-Key."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def image_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/images/{name}.png"


def mask_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/masks/{name}.png"


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.csv"


def zip_key(job_id: str) -> str:
    return f"jobs/{job_id}/pairs.zip"


def manifest_csv(rows: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
    """One row per pair: name, index, seed, dice_loss, then the parameters that produced it."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=MANIFEST_FIELDS + SAMPLING_FIELDS, lineterminator="\n")
    writer.writeheader()
    sampling = params["sampling"]
    for row in rows:
        writer.writerow(
            {
                **{k: row[k] for k in ("name", "index", "seed")},
                "dice_loss": repr(float(row["dice_loss"])),
                "model": params["model"],
                "eta": params["eta"],
                **{k: sampling.get(k) for k in SAMPLING_FIELDS},
            }
        )
    return out.getvalue().encode()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_manifest(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


class JobStore:
    def __init__(self, r: redis.Redis, storage: Storage, settings: Settings, enqueue: Enqueue) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.enqueue = enqueue
        self.prefix = settings.redis_prefix

    # ---- keys
    def _k(self, job_id: str, *parts: str) -> str:
        return ":".join((self.prefix, "job", job_id, *parts))

    def _lock(self, job_id: str) -> Any:
        return self.r.lock(self._k(job_id, "lock"), timeout=60, blocking_timeout=60)

    # ---- records
    def _load(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k(job_id))
        return json.loads(raw) if raw else None

    def _save(self, rec: dict[str, Any]) -> None:
        """Write the record to Redis and to storage; called at every state change."""
        data = json.dumps(rec, sort_keys=True)
        self.r.set(self._k(rec["id"]), data)
        self.storage.put(record_key(rec["id"]), data.encode(), "application/json")

    def get(self, job_id: str) -> dict[str, Any]:
        """The record with its progress; falls back to storage when Redis lost it."""
        rec = self._load(job_id)
        if rec is None:
            try:
                rec = json.loads(self.storage.get(record_key(job_id)))
            except (ObjectNotFound, ValueError) as exc:
                raise JobNotFound(job_id) from exc
        if "progress" not in rec:
            rec["progress"] = self.live_progress(job_id, rec).model_dump()
        return rec

    def live_progress(self, job_id: str, rec: dict[str, Any]) -> Progress:
        generated = kept = 0
        for value in self.r.hvals(self._k(job_id, "prog")):
            g, k = _str(value).split(",")
            generated += int(g)
            kept += int(k)
        return Progress(
            target=rec["params"]["count"], generated=generated, kept=kept, discarded=generated - kept
        )

    def list_jobs(self, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        key = f"{self.prefix}:jobs"
        total = int(self.r.zcard(key))
        ids = [_str(i) for i in self.r.zrevrange(key, offset, offset + limit - 1)]
        out = []
        for job_id in ids:
            try:
                out.append(self.get(job_id))
            except JobNotFound:
                continue
        return out, total

    def create(
        self, *, body: dict[str, Any], params: JobParams, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Store a queued job and enqueue its first shards. Returns ``(record, created)``.

        With an ``idempotency_key``, the same key and body return the first job (``created`` False)
        and another body raises ``JobConflict``; nothing is stored in either case.
        """
        job_id = uuid.uuid4().hex
        if idempotency_key is not None:
            ikey = f"{self.prefix}:idem:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
            claim = json.dumps({"job_id": job_id, "body": body_digest(body)})
            if not self.r.set(ikey, claim, nx=True, ex=STOP_TTL_S):
                first = json.loads(self.r.get(ikey) or b"{}")
                if first.get("body") != body_digest(body):
                    raise JobConflict("Idempotency-Key was already used with another body")
                for _ in range(50):  # the first request may still be writing its record
                    try:
                        return self.get(first["job_id"]), False
                    except JobNotFound:
                        time.sleep(0.1)
                raise JobNotFound(first["job_id"])
        now = now_iso()
        rec: dict[str, Any] = {
            "id": job_id,
            "status": JobStatus.QUEUED.value,
            "input": body,
            "params": params.model_dump(),
            "queue": self.settings.celery_queue,
            "error": None,
            "created_at": now,
            "started_at": None,
            "completed_at": None,
        }
        self._save(rec)
        self.r.zadd(f"{self.prefix}:jobs", {job_id: datetime.now(UTC).timestamp()})
        self.advance(job_id)  # enqueues the first shards, after the record is committed
        return self.get(job_id), True

    # ---- transitions (API side)
    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is None:
                self.get(job_id)  # raises JobNotFound unless storage still has it
                raise JobConflict("job is finished")
            if JobStatus(rec["status"]).is_terminal():
                raise JobConflict(f"job is {rec['status']}")
            self._finish(rec, JobStatus.CANCELED, error=None)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        self.get(job_id)  # raises JobNotFound
        with self._lock(job_id):
            self.r.set(self._k(job_id, "stop"), "deleted", ex=STOP_TTL_S)
            parts = ("prog", "pairs", "done", "attempts", "next")
            self.r.delete(self._k(job_id), *(self._k(job_id, p) for p in parts))
            self.r.zrem(f"{self.prefix}:jobs", job_id)
        self.storage.delete_prefix(job_prefix(job_id))

    def _finish(self, rec: dict[str, Any], status: JobStatus, *, error: str | None) -> None:
        """Move to a terminal state; must hold the job's lock."""
        job_id = rec["id"]
        rec["status"] = status.value
        rec["error"] = error
        rec["completed_at"] = now_iso()
        if "progress" not in rec and status is not JobStatus.CANCELED:
            rec["progress"] = self.live_progress(job_id, rec).model_dump()
        self.r.set(self._k(job_id, "stop"), status.value, ex=STOP_TTL_S)
        self._save(rec)

    # ---- worker side
    def stop_reason(self, job_id: str) -> str | None:
        raw = self.r.get(self._k(job_id, "stop"))
        return _str(raw) if raw else None

    def record(self, job_id: str) -> dict[str, Any] | None:
        return self._load(job_id)

    def mark_running(self, job_id: str) -> None:
        rec = self._load(job_id)
        if rec is None or rec["status"] != JobStatus.QUEUED.value:
            return
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is not None and rec["status"] == JobStatus.QUEUED.value:
                rec["status"] = JobStatus.RUNNING.value
                rec["started_at"] = now_iso()
                self._save(rec)

    def fail(self, job_id: str, error: str) -> None:
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is not None and not JobStatus(rec["status"]).is_terminal():
                self._finish(rec, JobStatus.FAILED, error=error)

    def acquire_lease(self, job_id: str, shard: int, token: str) -> bool:
        ttl = int(self.settings.lease_ttl_s * 1000)
        return bool(self.r.set(self._k(job_id, "lease", str(shard)), token, nx=True, px=ttl))

    def refresh_lease(self, job_id: str, shard: int, token: str) -> bool:
        ttl = int(self.settings.lease_ttl_s * 1000)
        return bool(self.r.eval(_LEASE_REFRESH, 1, self._k(job_id, "lease", str(shard)), token, ttl))

    def release_lease(self, job_id: str, shard: int, token: str) -> None:
        self.r.eval(_LEASE_RELEASE, 1, self._k(job_id, "lease", str(shard)), token)

    def bump_attempts(self, job_id: str, shard: int) -> int:
        return int(self.r.hincrby(self._k(job_id, "attempts"), str(shard), 1))

    def shard_done(self, job_id: str, shard: int) -> bool:
        return bool(self.r.hexists(self._k(job_id, "done"), str(shard)))

    def put_pair(
        self,
        job_id: str,
        *,
        name: str,
        index: int,
        seed: int,
        dice_loss: float,
        image_png: bytes,
        mask_png: bytes,
    ) -> None:
        """Store a kept pair; keys depend on (job, name) only, so a re-run overwrites."""
        self.storage.put(image_key(job_id, name), image_png, "image/png")
        self.storage.put(mask_key(job_id, name), mask_png, "image/png")
        meta = {"name": name, "index": index, "seed": seed, "dice_loss": dice_loss}
        self.r.hset(self._k(job_id, "pairs"), str(index), json.dumps(meta))

    def shard_progress(self, job_id: str, shard: int, generated: int, kept: int) -> None:
        self.r.hset(self._k(job_id, "prog"), str(shard), f"{generated},{kept}")

    def finish_shard(self, job_id: str, shard: int, generated: int, kept: list[int]) -> None:
        self.r.hset(self._k(job_id, "done"), str(shard), json.dumps({"generated": generated, "kept": kept}))
        self.advance(job_id)

    def _queue(self, rec: dict[str, Any] | None) -> str:
        return str((rec or {}).get("queue") or self.settings.celery_queue)

    def requeue(self, job_id: str, shard: int) -> None:
        self.enqueue(job_id, shard, self._queue(self._load(job_id)))

    def kept_pairs(self, job_id: str) -> list[dict[str, Any]]:
        """Kept pairs stored so far, by index (for ``?partial=true``)."""
        rows = [json.loads(v) for v in self.r.hvals(self._k(job_id, "pairs"))]
        return sorted(rows, key=lambda row: row["index"])

    # ---- scheduling
    def advance(self, job_id: str) -> None:
        """Finish the job if the finished shards decide it, else enqueue enough shards to reach ``count``."""
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is None or JobStatus(rec["status"]).is_terminal():
                return
            p = rec["params"]
            count, k_size, max_attempts = p["count"], p["shard_size"], p["max_attempts"]
            total = math.ceil(max_attempts / k_size)
            done = {int(k): json.loads(v) for k, v in self.r.hgetall(self._k(job_id, "done")).items()}

            prefix_kept: list[int] = []
            for k in range(total):
                if k not in done:
                    break
                prefix_kept.extend(sorted(done[k]["kept"]))
                if len(prefix_kept) >= count:
                    chosen = prefix_kept[:count]
                    self._complete(rec, chosen, generated=chosen[-1] + 1, error=None)
                    return
            else:
                self._complete(rec, prefix_kept, generated=max_attempts, error="max_attempts reached")
                return

            next_shard = int(self.r.get(self._k(job_id, "next")) or 0)
            pending = sum(1 for k in range(next_shard) if k not in done)
            generated = sum(d["generated"] for d in done.values())
            kept = sum(len(d["kept"]) for d in done.values())
            rate = (
                (kept + 1) / (generated + 2) if generated else 1.0
            )  # Laplace: never 0, never overshoots wildly
            need = count - kept
            add = math.ceil(need / (k_size * rate)) - pending if need > 0 else 0
            if pending == 0:
                add = max(add, 1)
            add = max(0, min(add, total - next_shard))
            if add:
                self.r.set(self._k(job_id, "next"), next_shard + add)
                for k in range(next_shard, next_shard + add):
                    self.enqueue(job_id, k, self._queue(rec))

    def _complete(
        self, rec: dict[str, Any], indices: list[int], *, generated: int, error: str | None
    ) -> None:
        """Write the manifest of the chosen pairs, then the terminal record (lock held)."""
        job_id = rec["id"]
        p = rec["params"]
        raw = self.r.hmget(self._k(job_id, "pairs"), [str(i) for i in indices]) if indices else []
        missing = [i for i, v in zip(indices, raw, strict=True) if v is None]
        if missing:
            self._finish(rec, JobStatus.FAILED, error=f"pairs {missing[:5]} were kept but not stored")
            return
        rows = [json.loads(v) for v in raw if v is not None]
        self.storage.put(manifest_key(job_id), manifest_csv(rows, p), "text/csv")
        kept = len(indices)
        rec["progress"] = Progress(
            target=p["count"], generated=generated, kept=kept, discarded=generated - kept
        ).model_dump()
        self._finish(rec, JobStatus.FAILED if error else JobStatus.SUCCEEDED, error=error)

    # ---- results
    def result_rows(self, job_id: str, *, partial: bool) -> tuple[list[dict[str, Any]], bool] | None:
        """``(rows, final)`` of the zip: the final manifest (``final``), or with ``partial`` what is
        stored so far; None when there is no final result and ``partial`` is false."""
        try:
            return [dict(row) for row in read_manifest(self.storage.get(manifest_key(job_id)))], True
        except ObjectNotFound:
            pass
        if not partial:
            return None
        return self.kept_pairs(job_id), False

    def iter_ids(self) -> Iterator[str]:
        for raw in self.r.zrevrange(f"{self.prefix}:jobs", 0, -1):
            yield _str(raw)
