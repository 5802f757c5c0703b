"""API keys and their quotas.

Keys. ``POST /v1/keys`` makes a key ``dx_`` + 43 URL-safe characters (256 random bits) and shows it
once, with a stable *id* (``k.`` + 32 hex digits, never reused; the ``.`` is in no key name). What a
key creates (jobs, datasets, trainings, models) belongs to its id, never to its name: a key created
later under a revoked key's name owns none of it. A key stored before ids has none: its id is its
name, which is what its records name as ``owner``, so they stay its own (``app.layout.owner_id_of``). What is kept is the key's SHA-256, in ``keys/NAME/key.json`` in object storage: storage is the
source of truth, so keys survive the loss of Redis. Redis (``P`` = settings.redis_prefix) caches the
lookup:

    P:auth:hash        hash: sha256(key) -> name
    P:auth:key:NAME    the record of NAME (the JSON stored in storage)
    P:auth:loaded      set (for LOADED_TTL_S) when P:auth:hash was last rebuilt from storage
    P:auth:lock        held by every write to storage or to the cache: create, revoke, cache fills

A request's key that is not ``dx_`` + 43 URL-safe characters is refused before Redis (``KEY_FORMAT``);
failed authentications are limited per client address (``app.authlimit``). A request's key is
hashed, its name looked up, and the hash kept in that name's record compared with
``hmac.compare_digest``: a stale hash -> name entry (a key revoked, then a new key of the same name)
never authenticates. A name missing from the hash map rebuilds the map from storage, at most once per
LOADED_TTL_S, so a Redis flush costs one rebuild and a flood of garbage keys costs no storage reads.
Revocation deletes the stored record and then the cache entries under the lock, so a revoked key
fails on its next request, on every API process.

Why SHA-256 and no slow KDF (bcrypt, scrypt, argon2): a slow KDF makes guessing *low-entropy* secrets
(passwords) from a leaked hash expensive. These keys are 256 random bits; no guess list exists, and
inverting SHA-256 on them is out of reach at any speed. A fast, unsalted hash is also what allows
the O(1) lookup by hash on every request.

Quotas, per key id (the admin has none). The key's active jobs are counted at every create: the store
keeps a set of each owner's queued and running jobs (P:owner:ID:active).
The rest is in Redis:

    P:owner:ID:pairs:DAY      pairs asked for by jobs created on UTC day DAY (expires after 2 days)
    P:owner:ID:rps:SECOND     requests in that second (a fixed one-second window, expires after 2 s)
    P:owner:ID:lock           serialises a key's job creations: two at once cannot both pass a limit
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from app.layout import as_str
from app.schemas import KEY_NAME_PATTERN
from app.storage import ObjectNotFound, Storage
from app.store import JobConflict, JobNotFound, JobStore

ADMIN = "admin"  # the admin's name: owner of the jobs it creates (and of every job with auth off)
KEY_NAME = re.compile(KEY_NAME_PATTERN)
KEY_PREFIX = "dx_"
KEY_FORMAT = re.compile(r"^dx_[A-Za-z0-9_-]{43}$")  # what new_key makes: anything else is no key
LOADED_TTL_S = 60
ACTIVE_RETRY_AFTER_S = 10  # nobody knows when a job ends; a poll interval


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "k." + uuid.uuid4().hex


def key_folder(name: str) -> str:
    return f"keys/{name}/"


def key_object(name: str) -> str:
    return f"keys/{name}/key.json"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin (no limits, sees every job) or an API key with its limits. ``id``
    owns what the key creates; ``name`` is shown."""

    name: str
    admin: bool = False
    max_active_jobs: int | None = None
    pairs_per_day: int | None = None
    requests_per_second: int | None = None
    id: str = ADMIN

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Principal:
        return cls(
            name=rec["name"],
            id=str(rec.get("id") or rec["name"]),  # a key from before ids: its name
            max_active_jobs=rec["max_active_jobs"],
            pairs_per_day=rec["pairs_per_day"],
            requests_per_second=rec["requests_per_second"],
        )


ADMIN_PRINCIPAL = Principal(name=ADMIN, admin=True)


class KeyExists(Exception):
    pass


class KeyNotFound(LookupError):
    pass


class KeyStore:
    def __init__(self, r: redis.Redis, storage: Storage, prefix: str) -> None:
        self.r = r
        self.storage = storage
        self.prefix = prefix
        self._hash = f"{prefix}:auth:hash"
        self._loaded = f"{prefix}:auth:loaded"

    def _rec_key(self, name: str) -> str:
        return f"{self.prefix}:auth:key:{name}"

    def _lock(self) -> Any:
        return self.r.lock(f"{self.prefix}:auth:lock", timeout=30, blocking_timeout=30)

    def create(self, name: str, limits: dict[str, int]) -> tuple[dict[str, Any], str]:
        """Store a new key named ``name``; returns ``(record, key)``. The key is never stored."""
        if not KEY_NAME.match(name) or name == ADMIN:
            raise ValueError(f"invalid key name {name!r}")
        key = new_key()
        rec: dict[str, Any] = {
            "name": name,
            "id": new_key_id(),
            "hash": hash_key(key),
            **limits,
            "created_at": datetime.now(UTC).isoformat(),
        }
        data = json.dumps(rec, sort_keys=True)
        with self._lock():
            if self.storage.exists(key_object(name)):
                raise KeyExists(name)
            self.storage.put(key_object(name), data.encode(), "application/json")
            pipe = self.r.pipeline()
            pipe.hset(self._hash, rec["hash"], name)
            pipe.set(self._rec_key(name), data)
            pipe.execute()
        return rec, key

    def revoke(self, name: str) -> dict[str, Any]:
        """Delete the key from storage, then from the cache; raises ``KeyNotFound``."""
        with self._lock():
            try:
                rec: dict[str, Any] = json.loads(self.storage.get(key_object(name)))
            except (ObjectNotFound, ValueError) as exc:
                raise KeyNotFound(name) from exc
            self.storage.delete_prefix(key_folder(name))
            pipe = self.r.pipeline()
            pipe.hdel(self._hash, rec["hash"])
            pipe.delete(self._rec_key(name))
            pipe.execute()
        return rec

    def records(self) -> list[dict[str, Any]]:
        """Every stored key record, by name (read from storage)."""
        out = []
        for obj in self.storage.list_keys("keys/"):
            if not obj.endswith("/key.json"):
                continue
            try:
                out.append(json.loads(self.storage.get(obj)))
            except ObjectNotFound:  # revoked meanwhile
                continue
        return sorted(out, key=lambda rec: rec["name"])

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None when no stored key has its hash."""
        digest = hash_key(key)
        name = self.r.hget(self._hash, digest)
        if name is None:
            if not self._rebuild():
                return None
            name = self.r.hget(self._hash, digest)
            if name is None:
                return None
        rec = self._record(as_str(name))
        if rec is None or not hmac.compare_digest(str(rec["hash"]), digest):
            return None
        return rec

    def _record(self, name: str) -> dict[str, Any] | None:
        raw = self.r.get(self._rec_key(name))
        if raw is None:
            with self._lock():  # a fill must not race a revocation
                raw = self.r.get(self._rec_key(name))
                if raw is None:
                    try:
                        raw = self.storage.get(key_object(name))
                    except ObjectNotFound:
                        return None
                    self.r.set(self._rec_key(name), raw)
        rec: dict[str, Any] = json.loads(raw)
        return rec

    def _rebuild(self) -> bool:
        """Reload the hash map from storage unless that was done in the last LOADED_TTL_S. Checked
        before the lock, so that unknown keys (a flood of them) cost one EXISTS each, never a wait
        on the lock that every other failed look-up also wants."""
        if self.r.exists(self._loaded):
            return False
        with self._lock():
            if self.r.exists(self._loaded):
                return False
            records = self.records()
            pipe = self.r.pipeline()  # MULTI: readers never see a half-built map
            pipe.delete(self._hash)
            for rec in records:
                pipe.hset(self._hash, rec["hash"], rec["name"])
                pipe.set(self._rec_key(rec["name"]), json.dumps(rec, sort_keys=True))
            pipe.set(self._loaded, "1", ex=LOADED_TTL_S)
            pipe.execute()
        return True


class QuotaExceeded(Exception):
    """A key's limit is reached: answer 429 with ``Retry-After: retry_after``."""

    def __init__(self, limit: str, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.limit = limit
        self.detail = detail
        self.retry_after = retry_after


class Quotas:
    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = prefix

    def _k(self, owner: str, *parts: str) -> str:
        return ":".join((self.prefix, "owner", owner, *parts))

    def hit(self, who: Principal) -> None:
        """Count one request; raises ``QuotaExceeded`` past ``requests_per_second``."""
        if who.requests_per_second is None:
            return
        key = self._k(who.id, "rps", str(int(time.time())))
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 2)
        n = int(pipe.execute()[0])
        if n > who.requests_per_second:
            raise QuotaExceeded(
                "requests_per_second",
                f"rate limit: this key may make {who.requests_per_second} requests per second "
                "(requests_per_second)",
                retry_after=1,
            )

    def create_job(
        self,
        who: Principal,
        count: int,
        store: JobStore,
        create: Callable[[], tuple[dict[str, Any], bool]],
    ) -> tuple[dict[str, Any], bool]:
        """Run ``create`` (which returns ``(record, created)``) if ``who`` has room for a job of
        ``count`` pairs; raises ``QuotaExceeded`` otherwise. A replayed job (``created`` False) is free."""
        if who.admin:
            return create()
        with self.r.lock(self._k(who.id, "lock"), timeout=15, blocking_timeout=15):
            if who.max_active_jobs is not None:
                active = len(active_ids(store, who.id))
                if active >= who.max_active_jobs:
                    raise QuotaExceeded(
                        "max_active_jobs",
                        f"quota: this key may have {who.max_active_jobs} jobs queued or running "
                        f"(max_active_jobs) and has {active}; wait for one to finish or cancel one",
                        retry_after=ACTIVE_RETRY_AFTER_S,
                    )
            day_key = None
            if who.pairs_per_day is not None:
                now = datetime.now(UTC)
                day_key = self._k(who.id, "pairs", now.date().isoformat())
                pipe = self.r.pipeline()
                pipe.incrby(day_key, count)
                pipe.expire(day_key, 2 * 86400)
                used = int(pipe.execute()[0])
                if used > who.pairs_per_day:
                    self.r.decrby(day_key, count)
                    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
                    raise QuotaExceeded(
                        "pairs_per_day",
                        f"quota: this key may ask for {who.pairs_per_day} pairs per UTC day "
                        f"(pairs_per_day); {used - count} asked today, this job asks for {count}",
                        retry_after=max(1, int((midnight - now).total_seconds()) + 1),
                    )
            try:
                rec, created = create()
            except BaseException:
                if day_key is not None:
                    self.r.decrby(day_key, count)
                raise
            if not created and day_key is not None:
                self.r.decrby(day_key, count)
            return rec, created


def key_id(rec: dict[str, Any]) -> str:
    """The stable id of a stored key record (its name for a key from before ids)."""
    return str(rec.get("id") or rec["name"])


def active_ids(store: JobStore, owner: str) -> list[str]:
    """Ids of the owner's (a key id's) queued or running jobs."""
    return store.active_ids_of(owner)


def cancel_jobs(store: JobStore, owner: str) -> int:
    """Cancel every queued or running job of ``owner``; returns how many were canceled."""
    n = 0
    for job_id in active_ids(store, owner):
        try:
            store.cancel(job_id)
            n += 1
        except (JobConflict, JobNotFound):  # finished meanwhile
            continue
    return n
