"""Training jobs: a key trains a bundle on one of its datasets, on a worker of the ``train`` queue.

torch-free (the API imports it); the worker side is ``worker.training``.

Redis (``P`` = settings.redis_prefix, ``T`` = ``P:training:ID``):
    T               the record (JSON): id, owner, name, dataset, params, status, times, error, model
    T:progress      the worker's latest report (JSON: stage, step, steps, loss, eta_seconds, pairs,
                    unlabelled), merged into the record on read; kept apart so a report never
                    overwrites a cancel
    T:lease         token of the worker running it (TTL lease_ttl_s, refreshed by a thread)
    T:stop          set when it was canceled: the worker stops within about a second
    T:attempts      runs started (a SIGKILLed worker cannot count itself afterwards)
    T:enqueued      when it was last sent to the queue (the reconciler waits a grace period after)
    T:ver           incremented at every change (the ids of its event stream)
    P:trainings     zset of ids by creation     P:owner:ID:trainings  the same, per key id
    P:trainings:active   set of the ids queued or running (what the reconciler sweeps)
    P:owner:ID:trainings:active   the same, per key id (DIFFEXP_TRAIN_MAX_ACTIVE)
    P:training:name:N    id of the latest training of model name N (``TrainingStore.status_of``)
    P:training:claim:N   id of the queued or running training of N: one at a time per name
    P:trainings:loaded   set once Redis holds the trainings of storage; missing = Redis lost its
                         data: the next sweep rebuilds them from ``training.json`` (unfinished ones
                         queued again, and they resume from their checkpoints in storage)

Storage: ``trainings/ID/training.json`` (the record, at creation and at the end) and
``trainings/ID/checkpoints/...`` (the bundle folder being trained, ``.checkpoints/`` included,
uploaded every DIFFEXP_TRAIN_CHECKPOINT_S; removed once the bundle is published or canceled).

Names: a name with a queued or running training is taken (409, whoever asks). A published name
belongs to the key that published it first, a reserved one (the default model, a local bundle) to
the admin (``app.registry``): its owner may train new versions of it, any other key gets 409. A
failed or canceled training leaves the name free. Owners are key ids (``owner_id``; ``owner`` is the
key's name, shown), see ``app.auth``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from app.core.config import Settings
from app.datasets import DatasetNotFound, DatasetStore
from app.layout import as_str, owner_id_of
from app.params import DEFAULT_UNLABELLED_SHARE
from app.schemas import JOB_ID_PATTERN, JobStatus
from app.storage import Storage
from app.store import JobNotFound

log = logging.getLogger(__name__)

TRAIN_TASK = "worker.tasks.run_training"
TrainEnqueue = Callable[[str, str], None]  # (training id, queue)

# Model names travel in URLs, storage keys and pins (``NAME@VERSION``): lowercase, digits, . _ -.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
STAGES = ("dpm", "segmenter", "filter")
MAX_CLASSES = 16  # models.labels.MAX_CLASSES (this module stays torch-free): a label map's most levels
STAGE_LABELS = {"dpm": "I", "segmenter": "II", "filter": "IV"}


class TrainingConflict(Exception):
    """The name is taken (409)."""


class TrainingNotFound(JobNotFound):
    """No such training, or another key's (404). A ``JobNotFound`` so ``app.events`` streams it."""


class TrainingCreate(BaseModel):
    """Body of ``POST /v1/models``. Unset fields take the CLI's defaults (``diffuseexpand train``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)] = Field(
        description="id of one of the caller's datasets (POST /v1/datasets)"
    )
    name: ModelName = Field(description="model name: 1-64 of a-z 0-9 . _ -, starting with a letter or digit")
    resolution: int = Field(
        default=64, ge=16, le=256, multiple_of=8, description="square training size in pixels"
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=MAX_CLASSES,
        description="mask classes K, background included (label maps 0..K-1); default: inferred from the "
        "masks (whole values 0..L with L ≥ 2: L + 1 classes, else binary)",
    )
    train_steps: int = Field(default=2400, ge=1, description="Stage I steps, up to DIFFEXP_TRAIN_MAX_STEPS")
    segmenter_steps: int | None = Field(default=None, ge=1, description="Stage II steps (default: half)")
    filter_steps: int | None = Field(default=None, ge=1, description="Stage IV steps (default: half)")
    batch_size: int = Field(default=16, ge=1, le=128)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the split and every draw")
    test_fraction: float = Field(default=0.2, ge=0.05, le=0.5, description="share of pairs held out")
    lr: float = Field(default=2e-4, gt=0, le=0.01, description="Stage I learning rate")
    cf_dropout: float = Field(default=0.2, ge=0, le=0.9, description="classifier-free dropout")
    checkpoint_every: int = Field(default=250, ge=1, le=100_000, description="steps between checkpoints")
    unlabelled_share: float = Field(
        default=DEFAULT_UNLABELLED_SHARE,
        ge=0,
        lt=1,
        description="share of Stage I batch rows drawn from the dataset's unlabelled images (trained with "
        "the mask condition dropped), 0 to below 1; no effect on a dataset without them",
    )

    @model_validator(mode="after")
    def _defaults(self) -> TrainingCreate:
        half = max(1, self.train_steps // 2)
        self.segmenter_steps = self.segmenter_steps or half
        self.filter_steps = self.filter_steps or half
        return self


def too_many_steps(body: TrainingCreate, settings: Settings) -> list[dict[str, Any]]:
    """Validation errors for steps over DIFFEXP_TRAIN_MAX_STEPS (a setting, so not in the schema)."""
    errors = []
    for field in ("train_steps", "segmenter_steps", "filter_steps"):
        value = getattr(body, field)
        if value is not None and value > settings.train_max_steps:
            errors.append(
                {
                    "type": "less_than_equal",
                    "loc": ("body", field),
                    "msg": f"Input should be less than or equal to {settings.train_max_steps}",
                    "input": value,
                }
            )
    return errors


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def total_steps(params: dict[str, Any]) -> int:
    return int(params["train_steps"]) + int(params["segmenter_steps"]) + int(params["filter_steps"])


def eta_seconds(
    params: dict[str, Any], stage: str, step: int, seconds_per_step: float | None
) -> float | None:
    """Time left at the current rate: the rest of this stage and every later stage (pure)."""
    if seconds_per_step is None:
        return None
    steps = {
        s: int(params[f"{k}_steps"]) for s, k in zip(STAGES, ("train", "segmenter", "filter"), strict=True)
    }
    left = steps[stage] - step + sum(steps[s] for s in STAGES[STAGES.index(stage) + 1 :])
    return round(max(0, left) * seconds_per_step, 1)


class TrainingStore:
    def __init__(
        self,
        r: redis.Redis,
        storage: Storage,
        settings: Settings,
        datasets: DatasetStore,
        enqueue: TrainEnqueue,
    ) -> None:
        self.r = r
        self.storage = storage
        self.settings = settings
        self.datasets = datasets
        self.enqueue_fn = enqueue
        self.prefix = settings.redis_prefix
        self.index = f"{self.prefix}:trainings"
        self.active = f"{self.prefix}:trainings:active"
        self.loaded = f"{self.prefix}:trainings:loaded"

    # ---- keys
    def k(self, training_id: str, *parts: str) -> str:
        return ":".join((self.prefix, "training", training_id, *parts))

    def owner_index(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:trainings"

    def owner_active(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:trainings:active"

    def active_count(self, owner: str) -> int:
        return int(self.r.scard(self.owner_active(owner)))

    def name_key(self, name: str) -> str:
        return f"{self.prefix}:training:name:{name}"

    def claim_key(self, name: str) -> str:
        return f"{self.prefix}:training:claim:{name}"

    @staticmethod
    def record_key(training_id: str) -> str:
        return f"trainings/{training_id}/training.json"

    @staticmethod
    def checkpoint_prefix(training_id: str) -> str:
        return f"trainings/{training_id}/checkpoints/"

    # ---- create
    def create(
        self,
        body: TrainingCreate,
        *,
        owner: str,
        published_owner: str | None,
        owner_id: str | None = None,
        admin: bool = False,
    ) -> dict[str, Any]:
        """Store and enqueue a training for the key ``owner`` (its name) of id ``owner_id`` (default:
        ``owner``); ``published_owner`` is the id that owns the name in the registry (None: nobody).
        Raises ``TrainingConflict`` or ``DatasetNotFound``."""
        owner_id = owner_id or owner
        if published_owner is not None and published_owner != owner_id and not admin:
            raise TrainingConflict(f"model name {body.name!r} belongs to another key; choose another name")
        training_id = uuid.uuid4().hex
        if not self.r.set(self.claim_key(body.name), training_id, nx=True):
            other = as_str(self.r.get(self.claim_key(body.name)) or b"")
            raise TrainingConflict(f"model name {body.name!r} is being trained (training {other})")
        try:
            self.datasets.use(body.dataset, training_id)  # DELETE of the dataset is 409 from now on
            now = datetime.now(UTC)
            rec: dict[str, Any] = {
                "id": training_id,
                "owner": owner,
                "owner_id": owner_id,
                "name": body.name,
                "dataset": body.dataset,
                "params": body.model_dump(exclude={"dataset", "name"}),
                "status": JobStatus.QUEUED.value,
                "queue": self.settings.train_queue,
                "created_at": now.isoformat(),
                "started_at": None,
                "finished_at": None,
                "error": None,
                "model": None,
            }
            self.storage.put(self.record_key(training_id), json.dumps(rec, sort_keys=True).encode())
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.k(training_id), json.dumps(rec, sort_keys=True))
            pipe.zadd(self.index, {training_id: now.timestamp()})
            pipe.zadd(self.owner_index(owner_id), {training_id: now.timestamp()})
            pipe.sadd(self.active, training_id)
            pipe.sadd(self.owner_active(owner_id), training_id)
            pipe.set(self.name_key(body.name), training_id)
            pipe.incr(self.k(training_id, "ver"))
            pipe.execute()
        except BaseException:
            self.r.delete(self.claim_key(body.name))
            self._release_dataset(body.dataset, training_id)
            raise
        self.enqueue(training_id)
        return rec

    def enqueue(self, training_id: str) -> None:
        self.r.set(self.k(training_id, "enqueued"), str(time.time()))
        self.enqueue_fn(training_id, self.settings.train_queue)

    # ---- read
    def record(self, training_id: str) -> dict[str, Any] | None:
        """The record with the latest progress merged in, or None."""
        raw, prog, attempts = self.r.mget(
            [self.k(training_id), self.k(training_id, "progress"), self.k(training_id, "attempts")]
        )
        if not raw:
            return None
        rec: dict[str, Any] = json.loads(raw)
        rec["progress"] = json.loads(prog) if prog else None
        rec["attempts"] = int(attempts or 0)
        return rec

    def get(self, training_id: str) -> dict[str, Any]:
        rec = self.record(training_id)
        if rec is None:
            raise TrainingNotFound(training_id)
        return rec

    def version(self, training_id: str) -> int:
        return int(self.r.get(self.k(training_id, "ver")) or 0)

    def page(self, *, owner: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        key = self.index if owner is None else self.owner_index(owner)
        ids = [as_str(i) for i in self.r.zrevrange(key, offset, offset + limit - 1)]
        recs = [rec for i in ids if (rec := self.record(i)) is not None]
        return recs, int(self.r.zcard(key))

    def status_of(self, name: str) -> dict[str, Any] | None:
        """What ``GET /v1/models/{name}`` shows for a name without a published version: its latest
        training, ``status`` "training" (queued or running) or "failed"; None when there is none
        (or it was canceled, or it succeeded: then the registry answers)."""
        training_id = self.r.get(self.name_key(name))
        if not training_id:
            return None
        rec = self.record(as_str(training_id))
        if rec is None:
            return None
        status = JobStatus(rec["status"])
        if status in (JobStatus.SUCCEEDED, JobStatus.CANCELED):
            return None
        return {
            "name": name,
            "owner": rec["owner"],  # the registry's route shows it to this key (and the admin) only
            "owner_id": owner_id_of(rec),
            "status": "failed" if status is JobStatus.FAILED else "training",
            "error": rec["error"],
            "progress": rec["progress"],
            "training": rec,
        }

    # ---- changes
    def _update(self, training_id: str, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """Apply ``change`` to the record atomically (WATCH); it returns False to leave it as is."""
        key = self.k(training_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    rec: dict[str, Any] = json.loads(raw)
                    if not change(rec):
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.set(key, json.dumps(rec, sort_keys=True))
                    pipe.incr(self.k(training_id, "ver"))
                    pipe.execute()
                    return rec
                except redis.WatchError:
                    continue

    def mark_running(self, training_id: str) -> bool:
        def change(rec: dict[str, Any]) -> bool:
            if JobStatus(rec["status"]).is_terminal():
                return False
            rec["status"] = JobStatus.RUNNING.value
            rec["started_at"] = rec["started_at"] or now_iso()
            return True

        return self._update(training_id, change) is not None

    def report(self, training_id: str, progress: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.k(training_id, "progress"), json.dumps(progress, sort_keys=True))
        pipe.incr(self.k(training_id, "ver"))
        pipe.execute()

    def finish(
        self,
        training_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        model: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """End the training (once: a later call changes nothing and returns None); frees its
        dataset and its name, and writes the record to storage."""

        def change(rec: dict[str, Any]) -> bool:
            if JobStatus(rec["status"]).is_terminal():
                return False
            rec.update(status=status.value, finished_at=now_iso(), error=error, model=model)
            return True

        rec = self._update(training_id, change)
        if rec is None:
            return None
        if status is JobStatus.CANCELED:
            self.r.set(self.k(training_id, "stop"), "canceled")
        self.r.srem(self.active, training_id)
        self.r.srem(self.owner_active(owner_id_of(rec) or ""), training_id)
        claim = self.claim_key(rec["name"])
        if as_str(self.r.get(claim) or b"") == training_id:
            self.r.delete(claim)
        self._release_dataset(rec["dataset"], training_id)
        try:
            self.storage.put(self.record_key(training_id), json.dumps(rec, sort_keys=True).encode())
            if status is not JobStatus.FAILED:  # a failed one keeps them, for a look or a retry by hand
                self.storage.delete_prefix(self.checkpoint_prefix(training_id))
        except Exception:
            log.warning("training %s: could not write its end to storage", training_id, exc_info=True)
        return rec

    def cancel(self, training_id: str) -> dict[str, Any]:
        self.finish(training_id, JobStatus.CANCELED, error="canceled")
        return self.get(training_id)

    def cancel_all_of(self, owner_id: str) -> int:
        """Cancel every queued or running training of the key ``owner_id`` (it was revoked)."""
        n = 0
        for raw in self.r.smembers(self.owner_active(owner_id)):
            if self.finish(as_str(raw), JobStatus.CANCELED, error="canceled: its key was revoked"):
                n += 1
        return n

    def _release_dataset(self, dataset_id: str, training_id: str) -> None:
        try:
            self.datasets.release(dataset_id, training_id)
        except Exception:
            log.warning("training %s: could not release dataset %s", training_id, dataset_id, exc_info=True)

    def stopped(self, training_id: str) -> bool:
        return bool(self.r.exists(self.k(training_id, "stop")))

    # ---- leases and attempts (worker side)
    def acquire_lease(self, training_id: str, token: str) -> bool:
        ttl = int(self.settings.lease_ttl_s * 1000)
        return bool(self.r.set(self.k(training_id, "lease"), token, nx=True, px=ttl))

    def refresh_lease(self, training_id: str, token: str) -> bool:
        ttl = int(self.settings.lease_ttl_s * 1000)
        return bool(self.r.eval(_LEASE_REFRESH, 1, self.k(training_id, "lease"), token, ttl))

    def release_lease(self, training_id: str, token: str) -> None:
        self.r.eval(_LEASE_RELEASE, 1, self.k(training_id, "lease"), token)

    def bump_attempts(self, training_id: str) -> int:
        return int(self.r.incr(self.k(training_id, "attempts")))


_LEASE_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""
_LEASE_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""


def sweep_trainings(
    store: TrainingStore, *, now: float | None = None, live: set[str] | None = None
) -> list[str]:
    """Requeue every queued or running training that no worker holds (its worker died, or its
    message was lost) once it has waited ``reconcile_grace_s`` since it was last enqueued; a
    queued one only when its queue is empty (else it is waiting its turn). With ``live`` (the
    queues live workers serve), fail one that no worker could take for ``stall_timeout_s`` since
    it was created. Returns the requeued ids."""
    now = time.time() if now is None else now
    s = store.settings
    grace = s.reconcile_grace_s
    if not store.r.exists(store.loaded):
        rebuilt = rebuild_trainings(store)
        if rebuilt:
            log.warning("Redis had lost its data: %d trainings rebuilt from storage", rebuilt)
    requeued = []
    for raw_id in store.r.smembers(store.active):
        training_id = as_str(raw_id)
        rec = store.record(training_id)
        if rec is None or JobStatus(rec["status"]).is_terminal():
            store.r.srem(store.active, training_id)
            continue
        if store.r.exists(store.k(training_id, "lease")):
            continue
        queue = str(rec.get("queue") or s.train_queue)
        created = datetime.fromisoformat(rec["created_at"]).timestamp()
        if live is not None and queue not in live and now - created >= s.stall_timeout_s:
            store.finish(
                training_id,
                JobStatus.FAILED,
                error=f"no worker served queue {queue!r} for {s.stall_timeout_s:g} s "
                f"(start one with -Q {queue})",
            )
            continue
        enqueued = float(as_str(store.r.get(store.k(training_id, "enqueued")) or b"0"))
        if now - enqueued < grace:
            continue
        if rec["status"] == JobStatus.QUEUED.value and store.r.llen(queue) > 0:
            continue
        log.warning("training %s: no worker holds it; requeued", training_id)
        store.enqueue(training_id)
        requeued.append(training_id)
    return requeued


def rebuild_trainings(store: TrainingStore) -> int:
    """Put back in Redis every training whose ``training.json`` is in storage but not in Redis;
    an unfinished one as queued, holding its name and its dataset again (the sweep then sends it)."""
    recs = []
    for key in store.storage.list_keys("trainings/"):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "training.json" or store.r.exists(store.k(parts[1])):
            continue
        try:
            recs.append(json.loads(store.storage.get(key)))
        except (LookupError, ValueError):
            continue
    for rec in sorted(recs, key=lambda r: str(r["created_at"])):  # the latest of a name wins
        training_id, owner = rec["id"], owner_id_of(rec) or ""
        created = datetime.fromisoformat(rec["created_at"]).timestamp()
        pipe = store.r.pipeline(transaction=True)
        if not JobStatus(rec["status"]).is_terminal():
            rec.update(status=JobStatus.QUEUED.value, started_at=None)
            pipe.sadd(store.active, training_id)
            pipe.sadd(store.owner_active(owner), training_id)
            pipe.set(store.claim_key(rec["name"]), training_id, nx=True)
        pipe.set(store.k(training_id), json.dumps(rec, sort_keys=True))
        pipe.zadd(store.index, {training_id: created})
        pipe.zadd(store.owner_index(owner), {training_id: created})
        pipe.set(store.name_key(rec["name"]), training_id)
        pipe.incr(store.k(training_id, "ver"))
        pipe.execute()
        if not JobStatus(rec["status"]).is_terminal():
            try:
                store.datasets.use(rec["dataset"], training_id)
            except DatasetNotFound:
                log.warning("training %s: its dataset %s is gone", training_id, rec["dataset"])
    store.r.set(store.loaded, "1")
    return len(recs)


def check_dataset(datasets: DatasetStore, dataset_id: str, owner: str, admin: bool) -> dict[str, Any]:
    """The dataset's record if the caller (``owner``: a key id) may train on it; another key's is
    ``DatasetNotFound``."""
    rec = datasets.get(dataset_id)
    if not (admin or owner_id_of(rec) == owner):
        raise DatasetNotFound(dataset_id)
    return rec
