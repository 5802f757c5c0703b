"""Job records and every change of a job's state.

Redis holds the live state, storage the durable one (``app.layout`` names both). Only this module
changes a job's status, always under the job's lock and always storage first: a record that Redis
says is terminal is terminal in storage too, so a finished job survives the loss of Redis.

Worker-side writes (pairs, progress, finished shards) go through Lua scripts that write only while
the job's record exists, so a job deleted while a worker stores a batch leaves no key behind; the
worker removes the objects it wrote after the delete began (``put_pair``).

Every change a client can see (a state change, a progress report) increments the job's version
``J:ver``, in the same round trip as the change: the event stream (``app.events``) numbers its events
with it and sends an event when it grows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import redis

from app import counters
from app.core.config import Settings
from app.layout import (
    JOB_PARTS,
    SUMMARY,
    VERSION,
    RedisKeys,
    as_str,
    image_key,
    job_prefix,
    manifest_csv,
    manifest_key,
    mask_key,
    owner_id_of,
    pair_meta,
    read_manifest,
    record_key,
    zip_key,
)
from app.progress import job_progress
from app.queue import Enqueue
from app.scheduler import Summary, plan, plan_from_summary
from app.schemas import JobParams, JobStatus, Phase, job_public
from app.storage import ObjectNotFound, Storage, StorageUnavailable
from app.webhooks import LEASE_S as WEBHOOK_LEASE_S
from app.webhooks import after_attempt
from app.webhooks import payload as webhook_payload

log = logging.getLogger(__name__)

STOP_TTL_S = 7 * 24 * 3600
CLAIM_TTL_S = 60  # an Idempotency-Key claimed by a create that has not stored its job yet
LOCK_TTL_S = 15  # every critical section is a few Redis calls and one small storage write
DECIDED = "decided"  # the stop flag while the finaliser writes the result
DELETED = "deleted"  # the stop flag of a deleted job (set before anything of it is removed)
FINALISE_TTL_S = 60  # the finaliser's lease, refreshed while it writes the zip: a dead one blocks no longer

_LEASE_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""
_LEASE_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
# Write a field of a job's hash only while the job's record exists (-1 otherwise).
_HSET_IF_LIVE = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
return redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
"""
# Write fields of a job's hash (ARGV: field, value, field, value...) only while its record exists.
_HSET_MANY_IF_LIVE = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
return redis.call('hset', KEYS[2], unpack(ARGV))
"""
_HINCR_IF_LIVE = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
return redis.call('hincrby', KEYS[2], ARGV[1], ARGV[2])
"""
# A shard's progress report "generated,kept,phase,position,at" (app.progress), while the job's record
# exists; the counts never go back (a shard run again after a crash regenerates the same pairs), the
# phase and position are the current run's, ``at`` is Redis's clock when the counts last rose (the
# ETA counts down from there). Increments the job's version; returns it (-1: no record).
_SHARD_PROGRESS = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
local g, k = tonumber(ARGV[2]), tonumber(ARGV[3])
local og, ok, at = 0, 0, ''
local old = redis.call('hget', KEYS[2], ARGV[1])
if old then
  local a, b = string.match(old, '^(%d+),(%d+)')
  if a then og, ok = tonumber(a), tonumber(b) end
  at = string.match(old, '^%d+,%d+,[^,]*,[^,]*,([%d.]*)$') or ''
end
if og > g then
  g, k = og, ok
elseif g > og or k > ok then
  local t = redis.call('time')
  at = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
end
redis.call('hset', KEYS[2], ARGV[1], string.format('%d,%d,%s,%s', g, k, ARGV[4], at))
return redis.call('incr', KEYS[3])
"""
# A shard's result: its final progress report (as _SHARD_PROGRESS, no phase) and its entry in the job's
# "done" hash, in one round trip; only while the job's record exists (-1 otherwise). A new entry is added
# to the running totals in KEYS[5] (app.scheduler.Summary; ARGV: shard, generated, kept, phase, result),
# whose prefix of finished shards from 0 grows past every finished shard it reaches (each is read once).
_FINISH_SHARD = (
    _SHARD_PROGRESS.replace("return redis.call('incr', KEYS[3])", "redis.call('incr', KEYS[3])")
    + """
if redis.call('hset', KEYS[4], ARGV[1], ARGV[5]) == 0 then return 0 end
redis.call('hincrby', KEYS[5], 'done', 1)
redis.call('hincrby', KEYS[5], 'generated', ARGV[2])
redis.call('hincrby', KEYS[5], 'kept', ARGV[3])
local p = tonumber(redis.call('hget', KEYS[5], 'prefix') or '0')
local pk = tonumber(redis.call('hget', KEYS[5], 'prefix_kept') or '0')
while true do
  local v = redis.call('hget', KEYS[4], tostring(p))
  if not v then break end
  pk = pk + #cjson.decode(v)['kept']
  p = p + 1
end
redis.call('hset', KEYS[5], 'prefix', p, 'prefix_kept', pk)
return 1
"""
)
# A run takes a shard (KEYS: record, lease, pending, done, attempts; ARGV: shard, token, lease ms) in one
# round trip: the lease (-2: another run holds it), no longer pending, then -3 if the shard is done
# already, -1 if the job has no record, else the shard's attempts with this run counted.
_START_SHARD = """
if not redis.call('set', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return -2 end
redis.call('hdel', KEYS[3], ARGV[1])
if redis.call('hexists', KEYS[4], ARGV[1]) == 1 then return -3 end
if redis.call('exists', KEYS[1]) == 0 then return -1 end
return redis.call('hincrby', KEYS[5], ARGV[1], 1)
"""
SHARD_TAKEN, SHARD_DONE, JOB_GONE = -2, -3, -1  # start_shard's answers other than an attempt count


class JobNotFound(LookupError):
    pass


class JobConflict(Exception):
    """The request conflicts with the job's state (finished already) or an Idempotency-Key."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _progress(rec: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """Progress from the shards' reports; a finished job whose reports Redis lost keeps the progress
    recorded when it finished (``JobStore._finish``)."""
    if not values and "progress" in rec:
        return dict(rec["progress"])
    return job_progress(rec, values, time.time()).model_dump()


def encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Raises ``ValueError`` for a cursor this service did not issue."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, job_id = raw.split(":", 1)
        value = float(score)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not math.isfinite(value) or len(job_id) > 64:
        raise ValueError("invalid cursor")
    return value, job_id


class JobStore:
    def __init__(self, r: redis.Redis, storage: Storage, settings: Settings, enqueue: Enqueue) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.enqueue = enqueue
        self.keys = RedisKeys(settings.redis_prefix)

    # ---- keys
    def _k(self, job_id: str, *parts: str) -> str:
        return self.keys.job(job_id, *parts)

    def _lock(self, job_id: str) -> Any:
        # Short: a holder that dies (SIGKILL, Redis restarted under it) stalls the job this long at most.
        return self.r.lock(self._k(job_id, "lock"), timeout=LOCK_TTL_S, blocking_timeout=LOCK_TTL_S)

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.storage.put(key, data, content_type)
        except ObjectNotFound:
            raise
        except Exception as exc:  # every backend error: the caller retries, the API answers 503
            raise StorageUnavailable(str(exc)) from exc

    # ---- records
    def _load(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._k(job_id))
        return json.loads(raw) if raw else None

    def _load_stored(self, job_id: str) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads(self.storage.get(record_key(job_id)))
        except ObjectNotFound:
            return None
        except ValueError:
            return None
        return rec

    def _save(self, rec: dict[str, Any]) -> None:
        """Write the record to storage, then to Redis with a new version; called at every state change
        (lock held)."""
        data = json.dumps(rec, sort_keys=True)
        self._put(record_key(rec["id"]), data.encode(), "application/json")
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._k(rec["id"]), data)
        pipe.incr(self._k(rec["id"], VERSION))
        pipe.execute()

    def version(self, job_id: str) -> int | None:
        """The job's version: it grows with every change a client can see (None: no job in Redis)."""
        raw = self.r.get(self._k(job_id, VERSION))
        return int(raw) if raw is not None else None

    def get(self, job_id: str) -> dict[str, Any]:
        """The record with its progress. Falls back to storage when Redis lost the record, and when
        Redis is down for a finished job (an unfinished one needs Redis: the error propagates)."""
        try:
            found = self._load_many([job_id])
        except redis.RedisError:
            stored = self._load_stored(job_id)
            if stored is not None and JobStatus(stored["status"]).is_terminal():
                return stored
            raise
        if found:
            return found[0]
        rec = self._load_stored(job_id)
        if rec is None:
            raise JobNotFound(job_id)
        rec["progress"] = self.live_progress(job_id, rec)
        return rec

    def _load_many(self, ids: list[str]) -> list[dict[str, Any]]:
        """Records with their progress, in one round trip to Redis; ids Redis lacks are left out."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.get(self._k(job_id))
            pipe.hvals(self._k(job_id, "prog"))
        replies = pipe.execute()
        out = []
        for raw, prog in zip(replies[::2], replies[1::2], strict=True):
            if not raw:
                continue
            rec = json.loads(raw)
            rec["progress"] = _progress(rec, prog)
            out.append(rec)
        return out

    def live_progress(self, job_id: str, rec: dict[str, Any]) -> dict[str, Any]:
        try:
            values = self.r.hvals(self._k(job_id, "prog"))
        except redis.RedisError:
            values = []
        return _progress(rec, values)

    def list_jobs(
        self, *, limit: int, offset: int = 0, cursor: str | None = None, index: str | None = None
    ) -> tuple[list[dict[str, Any]], int, str | None]:
        """A page of jobs, newest first: ``(records, total, next cursor)``.

        ``cursor`` (from the previous page) pages by creation time, so jobs created or deleted meanwhile
        neither repeat nor skip entries; ``offset`` is kept for simple clients. ``index`` is the sorted
        set to page through (default: every job).
        """
        key = index or self.keys.jobs
        if cursor is not None:
            score, last_id = decode_cursor(cursor)
            raw: Any = self.r.zrevrangebyscore(key, score, "-inf", start=0, num=limit + 64, withscores=True)
            # ties in score come in reverse order of id: skip those at or before the cursor's id
            pairs = [(as_str(m), float(sc)) for m, sc in raw]
            entries = [(m, sc) for m, sc in pairs if not (sc == score and m >= last_id)][:limit]
        else:
            raw = self.r.zrevrange(key, offset, offset + limit - 1, withscores=True)
            entries = [(as_str(m), float(sc)) for m, sc in raw]
        total = int(self.r.zcard(key))
        recs = self._load_many([m for m, _ in entries])
        next_cursor = encode_cursor(entries[-1][1], entries[-1][0]) if len(entries) == limit else None
        return recs, total, next_cursor

    def _idem_key(self, idempotency_key: str) -> str:
        return self.keys.idem(hashlib.sha256(idempotency_key.encode()).hexdigest())

    def idempotency_claimed(self, idempotency_key: str) -> bool:
        """Whether a job was created with this Idempotency-Key (one ``create`` would replay)."""
        return bool(self.r.exists(self._idem_key(idempotency_key)))

    def create(
        self,
        *,
        body: dict[str, Any],
        params: JobParams,
        idempotency_key: str | None = None,
        owner: str = "admin",
        webhook: dict[str, str] | None = None,
        owner_id: str | None = None,
        model_label: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store a queued job and enqueue its first shards. Returns ``(record, created)``.

        With an ``idempotency_key``, the same key and body return the first job (``created`` False)
        and another body raises ``JobConflict``. A create that fails (storage or Redis down) releases
        its key, so the same request can be sent again. ``webhook`` (``url``, ``secret``) is called
        when the job ends (``app.webhooks``). ``owner`` is the key's name (shown), ``owner_id`` its
        stable id (default: ``owner``), which owns the job; ``model_label`` the model's label in
        /metrics (``app.counters.model_label``).
        """
        owner_id = owner_id or owner
        job_id = uuid.uuid4().hex
        ikey = None
        if idempotency_key is not None:
            ikey = self._idem_key(idempotency_key)
            first = self._claim_idempotency_key(ikey, job_id, body)
            if first is not None:
                return first, False
        now = now_iso()
        rec: dict[str, Any] = {
            "id": job_id,
            "owner": owner,
            "owner_id": owner_id,
            "status": JobStatus.QUEUED.value,
            "input": body,
            "params": params.model_dump(),
            "queue": self.settings.celery_queue,
            "error": None,
            "created_at": now,
            "started_at": None,
            "completed_at": None,
        }
        if ikey is not None:
            rec["idempotency_key"] = ikey
        if model_label is not None:
            rec["model_label"] = model_label
        if webhook is not None:
            rec["webhook"] = {**webhook, "status": "waiting", "attempts": [], "attempt_count": 0}
        n_first = plan(rec["params"], {}, 0).add  # a new job: no shard is done, none is pending
        data = json.dumps(rec, sort_keys=True)
        try:
            self._put(record_key(job_id), data.encode(), "application/json")
            # One round trip, all or nothing: the reconciler never sees a job without its first shards.
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self._k(job_id), data)
            score = datetime.now(UTC).timestamp()
            pipe.zadd(self.keys.jobs, {job_id: score})
            pipe.zadd(self.keys.owner_jobs(owner_id), {job_id: score})
            pipe.sadd(self.keys.active, job_id)
            pipe.sadd(self.keys.owner_active(owner_id), job_id)
            pipe.set(self._k(job_id, "next"), n_first)
            pipe.incr(self._k(job_id, VERSION))
            pipe.hset(self._k(job_id, "pending"), mapping={str(k): str(time.time()) for k in range(n_first)})
            if ikey is not None:
                pipe.expire(ikey, STOP_TTL_S)  # the job exists: the key holds it for a week
            pipe.execute()
        except Exception:
            self._undo_create(job_id, ikey, owner_id)
            raise
        try:
            for k in range(n_first):
                self.enqueue(job_id, k, self._queue(rec))
        except Exception:  # the shards are marked pending: the reconciler sends them when it can
            log.warning(
                "job %s: could not enqueue its first shards; the reconciler will", job_id, exc_info=True
            )
        rec["progress"] = job_progress(rec, [], time.time()).model_dump()
        return rec, True

    def _claim_idempotency_key(self, ikey: str, job_id: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Claim ``ikey`` for a new job (returns None), or return the job that holds it."""
        claim = json.dumps({"job_id": job_id, "body": body_digest(body)})
        for _ in range(2):
            # Short until the job exists: a create killed half-way must not hold the key for a week.
            if self.r.set(ikey, claim, nx=True, ex=CLAIM_TTL_S):
                return None
            first = json.loads(self.r.get(ikey) or b"{}")
            if not first:
                continue  # expired between the two calls
            if first.get("body") != body_digest(body):
                raise JobConflict("Idempotency-Key was already used with another body")
            for _ in range(20):  # the first request may still be writing its record
                try:
                    return self.get(first["job_id"])
                except JobNotFound:
                    time.sleep(0.1)
            raise JobConflict("a request with this Idempotency-Key is still being processed; retry")
        raise JobConflict("a request with this Idempotency-Key is still being processed; retry")

    def _undo_create(self, job_id: str, ikey: str | None, owner: str | None = None) -> None:
        """Best effort: nothing of a failed create stays behind (its key may be used again)."""
        for undo in (
            lambda: self.r.delete(self._k(job_id)),
            lambda: self.r.zrem(self.keys.jobs, job_id),
            lambda: self.r.zrem(self.keys.owner_jobs(owner), job_id) if owner else None,
            lambda: self.r.srem(self.keys.owner_active(owner), job_id) if owner else None,
            lambda: self.r.srem(self.keys.active, job_id),
            lambda: self.r.delete(ikey) if ikey else None,
            lambda: self.storage.delete_prefix(job_prefix(job_id)),
        ):
            try:
                undo()
            except Exception:
                log.warning("job %s: could not undo a failed create", job_id, exc_info=True)

    # ---- transitions (API side)
    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is None:
                rec = self._load_stored(job_id)  # Redis lost it: storage says where the job is
                if rec is None:
                    raise JobNotFound(job_id)
            if JobStatus(rec["status"]).is_terminal():
                raise JobConflict(f"job is {rec['status']}")
            self._finish(rec, JobStatus.CANCELED, error=None)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Remove every trace of the job; a worker writing at the time removes what it wrote after."""
        if self._load(job_id) is None and self._load_stored(job_id) is None:
            raise JobNotFound(job_id)
        with self._lock(job_id):
            rec = self._load(job_id) or self._load_stored(job_id) or {}
            self.r.set(self._k(job_id, "stop"), DELETED, ex=STOP_TTL_S)
            self.r.delete(self._k(job_id), *(self._k(job_id, p) for p in JOB_PARTS))
            self.r.zrem(self.keys.jobs, job_id)
            self.r.zrem(self.keys.webhooks, job_id)
            self.r.srem(self.keys.active, job_id)
            if owner := owner_id_of(rec):
                self.r.zrem(self.keys.owner_jobs(owner), job_id)
                self.r.srem(self.keys.owner_active(owner), job_id)
            if rec.get("idempotency_key"):
                self.r.delete(rec["idempotency_key"])
        self.storage.delete_prefix(job_prefix(job_id))

    def _finish(self, rec: dict[str, Any], status: JobStatus, *, error: str | None) -> None:
        """Move to a terminal state; must hold the job's lock."""
        job_id = rec["id"]
        rec["status"] = status.value
        rec["error"] = error
        rec["completed_at"] = now_iso()
        # Recorded for when Redis loses the shards' reports; while it has them, reads sum them anew, so
        # a batch that lands after this (a canceled job's last one) counts too (see ``settle_progress``).
        rec.pop("progress", None)
        rec["progress"] = self.live_progress(job_id, rec)
        if rec.get("webhook"):  # due now; stored with the record, so a Redis loss does not drop it
            rec["webhook"] = {**rec["webhook"], "status": "pending", "next_attempt_at": time.time()}
        self._save(rec)
        self.r.set(self._k(job_id, "stop"), status.value, ex=STOP_TTL_S)
        self.r.delete(self._k(job_id, "pending"))
        self.forget_active(job_id, owner_id_of(rec))
        if rec.get("webhook"):
            self.r.zadd(self.keys.webhooks, {job_id: rec["webhook"]["next_attempt_at"]})
        counters.count(self.r, self.keys.prefix, "jobs_finished", model=counters.model_of(rec), status=status)

    # ---- worker side
    def stop_reason(self, job_id: str) -> str | None:
        raw = self.r.get(self._k(job_id, "stop"))
        return as_str(raw) if raw else None

    def record(self, job_id: str) -> dict[str, Any] | None:
        return self._load(job_id)

    def mark_running(self, job_id: str, seen: dict[str, Any] | None = None) -> None:
        """Queued -> running. ``seen``: a record read earlier; a status only moves forward, so if it was
        past queued there is nothing to do and Redis is not asked."""
        if seen is not None and seen.get("status") != JobStatus.QUEUED.value:
            return
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

    def _hset_if_live(self, job_id: str, part: str, field: str, value: str) -> bool:
        return int(self.r.eval(_HSET_IF_LIVE, 2, self._k(job_id), self._k(job_id, part), field, value)) >= 0

    def start_shard(self, job_id: str, shard: int, token: str) -> int:
        """Take the shard for a run, in one round trip: ``acquire_lease``, ``shard_started``, then unless
        the shard is done (``SHARD_DONE``) or the job gone (``JOB_GONE``) ``bump_attempts``; returns the
        attempts counted, or ``SHARD_TAKEN`` when another run holds the lease (nothing changed)."""
        keys = (
            self._k(job_id),
            self._k(job_id, "lease", str(shard)),
            self._k(job_id, "pending"),
            self._k(job_id, "done"),
            self._k(job_id, "attempts"),
        )
        ttl = int(self.settings.lease_ttl_s * 1000)
        return int(self.r.eval(_START_SHARD, len(keys), *keys, str(shard), token, ttl))

    def shard_started(self, job_id: str, shard: int) -> None:
        """A worker holds the shard's lease: it is no longer waiting in the queue."""
        self.r.hdel(self._k(job_id, "pending"), str(shard))

    def bump_attempts(self, job_id: str, shard: int, by: int = 1) -> int:
        """Count a run of the shard (a run that ends in an outage gives its count back with ``by=-1``)."""
        keys = (self._k(job_id), self._k(job_id, "attempts"))
        return int(self.r.eval(_HINCR_IF_LIVE, 2, *keys, str(shard), by))

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
        class_losses: list[float] | None = None,
    ) -> bool:
        """Store a kept pair; keys depend on (job, name) only, so a re-run overwrites.

        Returns False (and removes the objects again) when the job was deleted meanwhile: DELETE drops
        the record before it lists the job's objects, so either its listing sees these objects or the
        write below sees no record.
        """
        meta = pair_meta(name, index, seed, dice_loss, class_losses)
        return self.put_pairs(job_id, [(meta, image_png, mask_png)])

    def put_pairs(self, job_id: str, pairs: list[tuple[dict[str, Any], bytes, bytes]]) -> bool:
        """``put_pair`` for a batch of ``(meta, image png, mask png)``: the objects, then every pair's
        entry in one round trip to Redis (a worker stores a batch's kept pairs at once)."""
        if not pairs:
            return True
        fields: list[str] = []
        for meta, image_png, mask_png in pairs:
            self._put(image_key(job_id, meta["name"]), image_png, "image/png")
            self._put(mask_key(job_id, meta["name"]), mask_png, "image/png")
            fields += [str(meta["index"]), json.dumps(meta)]
        keys = (self._k(job_id), self._k(job_id, "pairs"))
        if int(self.r.eval(_HSET_MANY_IF_LIVE, 2, *keys, *fields)) >= 0:
            return True
        self.storage.delete_prefix(job_prefix(job_id))
        return False

    def shard_progress(
        self,
        job_id: str,
        shard: int,
        generated: int,
        kept: int,
        phase: Phase | None = None,
        position: int = 0,
    ) -> bool:
        """Report a shard's counts (never lowered: see ``_SHARD_PROGRESS``) and what its run is doing
        (``phase`` None: not running); False when the job was deleted."""
        keys = (self._k(job_id), self._k(job_id, "prog"), self._k(job_id, VERSION))
        where = f"{phase or ''},{position}"
        return int(self.r.eval(_SHARD_PROGRESS, 3, *keys, str(shard), generated, kept, where)) >= 0

    def settle_progress(self, job_id: str) -> None:
        """After a shard stopped: if its job has finished meanwhile, record the progress again, so the
        stored record counts the batch the shard wrote after the job finished (durable past Redis)."""
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is None or not JobStatus(rec["status"]).is_terminal():
                return
            progress = self.live_progress(job_id, rec)
            if progress != rec.get("progress"):
                rec["progress"] = progress
                self._save(rec)

    def finish_shard(self, job_id: str, shard: int, generated: int, kept: list[int]) -> None:
        """Record the shard's result (its final counts too: it no longer runs), then advance the job."""
        keys = (
            self._k(job_id),
            self._k(job_id, "prog"),
            self._k(job_id, VERSION),
            self._k(job_id, "done"),
            self._k(job_id, SUMMARY),
        )
        result = json.dumps({"generated": generated, "kept": kept})
        self.r.eval(_FINISH_SHARD, len(keys), *keys, str(shard), generated, len(kept), ",0", result)
        self.advance(job_id)

    def _queue(self, rec: dict[str, Any] | None) -> str:
        return str((rec or {}).get("queue") or self.settings.celery_queue)

    def _enqueue(self, job_id: str, shard: int, queue: str) -> None:
        """Mark the shard as waiting in the queue, then send it (the mark first: the reconciler never
        sees a queued shard as lost)."""
        self.r.hset(self._k(job_id, "pending"), str(shard), str(time.time()))
        self.enqueue(job_id, shard, queue)

    def requeue(self, job_id: str, shard: int) -> None:
        self._enqueue(job_id, shard, self._queue(self._load(job_id)))

    def kept_pairs(self, job_id: str) -> list[dict[str, Any]]:
        """Kept pairs stored so far, by index (for ``?partial=true``)."""
        rows = [json.loads(v) for v in self.r.hvals(self._k(job_id, "pairs"))]
        return sorted(rows, key=lambda row: row["index"])

    # ---- scheduling
    def _next_shard(self, job_id: str) -> int:
        return int(self.r.get(self._k(job_id, "next")) or 0)

    def _done(self, job_id: str) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(self._k(job_id, "done")).items()}

    def advance(self, job_id: str) -> None:
        """Decide the job if its finished shards decide it, else enqueue enough shards to reach ``count``.

        Safe to call any number of times from anywhere (workers after a shard, the reconciler).
        """
        with self._lock(job_id):
            # the record, the next shard and the finished shards' totals in one round trip
            pipe = self.r.pipeline(transaction=False)
            pipe.get(self._k(job_id))
            pipe.get(self._k(job_id, "next"))
            pipe.hgetall(self._k(job_id, SUMMARY))
            pipe.hlen(self._k(job_id, "done"))
            raw, raw_next, raw_summary, n_done = pipe.execute()
            rec = json.loads(raw) if raw else None
            if rec is None or JobStatus(rec["status"]).is_terminal():
                return
            next_shard = int(raw_next or 0)
            summary = Summary(**{as_str(k): int(v) for k, v in raw_summary.items()})
            # The totals stand for "done" while they count as many shards (a job started by an older
            # version, or a "done" entry removed by hand, has none or others: then every shard is read).
            quick = plan_from_summary(rec["params"], summary, next_shard) if summary.done == n_done else None
            p = quick or plan(rec["params"], self._done(job_id), next_shard)
            if not p.decided:
                if p.add:
                    self.r.set(self._k(job_id, "next"), next_shard + p.add)
                    for k in range(next_shard, next_shard + p.add):
                        self._enqueue(job_id, k, self._queue(rec))
                return
            # Decided: stop the other shards and write the manifest; the zip is written without the lock.
            token = uuid.uuid4().hex
            if not self.r.set(self._k(job_id, "final"), token, nx=True, ex=FINALISE_TTL_S):
                return  # another process is writing the result
            self.r.set(self._k(job_id, "stop"), DECIDED, ex=STOP_TTL_S)
            rows = self._chosen_rows(job_id, p.chosen)
            if rows is None:
                self._finish(
                    rec, JobStatus.FAILED, error=f"pairs of {p.chosen[:5]}… were kept but not stored"
                )
                return
            self._put(manifest_key(job_id), manifest_csv(rows, rec["params"]), "text/csv")
        # The zip's job.json says how the job ends (known now), so a zip streamed later is the same bytes.
        decided = {
            **rec,
            "status": (JobStatus.FAILED if p.error else JobStatus.SUCCEEDED).value,
            "error": p.error,
        }
        try:
            self._write_zip(decided, rows, token)
        except Exception:
            self.r.delete(self._k(job_id, "final"))  # the reconciler finishes it later
            raise
        with self._lock(job_id):
            rec = self._load(job_id)
            if rec is None:  # deleted while the zip was written: remove what we wrote
                self.storage.delete_prefix(job_prefix(job_id))
                return
            if JobStatus(rec["status"]).is_terminal():
                return
            self._finish(rec, JobStatus.FAILED if p.error else JobStatus.SUCCEEDED, error=p.error)
            self.r.delete(self._k(job_id, "final"))

    def _chosen_rows(self, job_id: str, indices: list[int]) -> list[dict[str, Any]] | None:
        raw = self.r.hmget(self._k(job_id, "pairs"), [str(i) for i in indices]) if indices else []
        if any(v is None for v in raw):
            return None
        return [json.loads(v) for v in raw if v is not None]

    def _write_zip(self, rec: dict[str, Any], rows: list[dict[str, Any]], token: str) -> None:
        """The ``plain`` zip, written once at decision (what ``/download`` presigns)."""
        from app.zipstream import job_zip  # stream-zip is only needed here

        job_id = rec["id"]
        final_key = self._k(job_id, "final")

        def keep_alive(i: int) -> None:
            if i % 16 == 0:
                self.r.eval(_LEASE_REFRESH, 1, final_key, token, FINALISE_TTL_S * 1000)

        chunks = job_zip(self.storage, rec, rows, final=True, on_member=keep_alive)
        try:
            self.storage.put_stream(zip_key(job_id), chunks, "application/zip")
        except ObjectNotFound:
            raise
        except Exception as exc:
            raise StorageUnavailable(str(exc)) from exc

    # ---- webhooks (app.webhooks)
    def due_webhooks(self, now: float, limit: int = 50) -> list[str]:
        return [as_str(i) for i in self.r.zrangebyscore(self.keys.webhooks, "-inf", now, start=0, num=limit)]

    def deliver_webhook(
        self, job_id: str, send: Callable[[str, str, bytes, str], dict[str, Any]], now: float | None = None
    ) -> bool:
        """Make one delivery attempt of the job's webhook if it is due and no other process is making
        one; record it in the job. Returns whether an attempt was made."""
        now = time.time() if now is None else now
        lease = self._k(job_id, "hook")
        if not self.r.set(lease, "1", nx=True, ex=WEBHOOK_LEASE_S):
            return False
        try:
            found = self._load_many([job_id])  # with its progress, as GET shows it
            rec = found[0] if found else None
            hook = (rec or {}).get("webhook") or {}
            if rec is None or hook.get("status") != "pending":
                self.r.zrem(self.keys.webhooks, job_id)  # deleted, or delivered/given up meanwhile
                return False
            if float(hook.get("next_attempt_at") or 0) > now:
                self.r.zadd(self.keys.webhooks, {job_id: float(hook["next_attempt_at"])})
                return False
            body = webhook_payload(job_public(rec, self.settings.api_v1_str).model_dump(mode="json"))
            record = send(hook["url"], hook["secret"], body, f"job.{rec['status']}")
            with self._lock(job_id):
                rec = self._load(job_id)
                if rec is None or not rec.get("webhook"):
                    return True
                ended = datetime.fromisoformat(rec["completed_at"]).timestamp()
                rec["webhook"] = after_attempt(
                    rec["webhook"], record, ended_at=ended, retry_s=self.settings.webhook_retry_s
                )
                self._save(rec)
                due = rec["webhook"]["next_attempt_at"]
                if due is None:
                    self.r.zrem(self.keys.webhooks, job_id)
                else:
                    self.r.zadd(self.keys.webhooks, {job_id: float(due)})
            if record["error"] is not None:
                log.warning("job %s: webhook attempt failed: %s", job_id, record["error"])
            return True
        finally:
            self.r.delete(lease)

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
        for raw in self.r.zrevrange(self.keys.jobs, 0, -1):
            yield as_str(raw)

    # ---- used by the reconciler
    def active_ids(self) -> list[str]:
        """Ids of the jobs that are queued or running (a set kept by create, finish and delete)."""
        return sorted(as_str(i) for i in self.r.smembers(self.keys.active))

    def forget_active(self, job_id: str, owner: str | None = None) -> None:
        self.r.srem(self.keys.active, job_id)
        if owner:
            self.r.srem(self.keys.owner_active(owner), job_id)

    def active_ids_of(self, owner: str) -> list[str]:
        """Ids of ``owner``'s queued or running jobs (a set per owner: counting is O(1) per create)."""
        return sorted(as_str(i) for i in self.r.smembers(self.keys.owner_active(owner)))
