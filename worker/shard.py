"""The body of a shard task: generate pairs ``[k*K, (k+1)*K)`` of a job, store the kept ones, report.

Everything it needs comes from the job record (ids in, the world re-read here). Pair objects are
keyed by (job id, pair name), so a shard that runs again overwrites its objects with identical bytes.
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import numpy as np
import redis
from PIL import Image
from pydantic import ValidationError

from app import counters
from app.layout import pair_meta
from app.params import JobParams
from app.registry import format_ref
from app.schemas import JobStatus
from app.storage import StorageUnavailable
from app.store import SHARD_DONE, SHARD_TAKEN, JobStore
from models.bundle import Bundle
from models.expand import Cancelled, bundle_training_masks, generate_pairs
from models.sampling import SamplingParams
from models.shape import parse_size, restore_shape
from worker.metrics import counted, metered_pairs
from worker.progress import ShardProgress

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # job gone, finished, or shard done already
    STOPPED = "stopped"  # canceled or decided while running
    RETRY = "retry"  # crashed; enqueued again (an outage is retried in place, see _run_through_outages)
    FAILED = "failed"  # crashed too often: the job failed


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shard_indices(params: JobParams, shard: int) -> range:
    k = params.shard_size
    return range(shard * k, min((shard + 1) * k, params.max_attempts))


def sampling_params(params: JobParams | Mapping[str, Any]) -> SamplingParams:
    """The torch-side settings of a job (its parsed params, or the record's ``params`` dict)."""
    job = params if isinstance(params, JobParams) else JobParams.model_validate(params)
    return SamplingParams.from_settings(job.sampling)


def is_outage(exc: BaseException) -> bool:
    """An error of Redis or the object store (down, timing out): retried, never the shard's fault."""
    if isinstance(exc, StorageUnavailable | redis.RedisError | ConnectionError | TimeoutError):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, BotoCoreError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status) >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    return False


@counted  # shard runs by outcome, for /metrics
def run_shard(
    store: JobStore,
    get_bundle: Callable[[str], Bundle],
    job_id: str,
    shard: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    rec = store.record(job_id)
    if rec is None or JobStatus(rec["status"]).is_terminal():
        return Outcome.SKIPPED
    # A shard delivered twice (redelivery, reconciler) runs once: the other copy returns at once. If the
    # lease holder dies, its lease expires and the reconciler requeues the shard.
    token = f"{os.getpid()}:{uuid.uuid4().hex}"  # the pid says which process holds the shard
    # One round trip takes the lease, clears the shard's pending mark and counts this run's attempt
    # (counted only once this run holds the shard, so redeliveries that do nothing cost nothing; a run
    # killed with SIGKILL cannot count itself, hence counting at the start).
    attempts = store.start_shard(job_id, shard, token)
    if attempts == SHARD_TAKEN:
        return Outcome.SKIPPED
    try:
        if attempts == SHARD_DONE:
            store.advance(job_id)  # the worker that finished it may have died before advancing
            return Outcome.SKIPPED
        max_tries = store.settings.shard_max_tries
        if attempts < 0:
            return Outcome.SKIPPED  # deleted
        if attempts > max_tries:
            store.fail(job_id, f"shard {shard} did not finish in {max_tries} attempts (its workers crashed)")
            return Outcome.FAILED
        try:
            params = JobParams.model_validate(rec["params"])
        except ValidationError as exc:  # a record the API did not validate (an older version wrote it)
            log.error("job %s: invalid parameters: %s", job_id, exc)
            wrong = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            store.fail(job_id, f"invalid job parameters: {wrong}")
            return Outcome.FAILED
        try:
            bundle = _load_through_outages(
                get_bundle, format_ref(params.model, params.model_version), store, sleep,
                keep_shard=lambda: _keep_lease(store, job_id, shard, token),
            )  # fmt: skip
            sp = sampling_params(params)
            if params.masks.needs_training_masks:  # the API checks it; a job of an older record may not
                bundle_training_masks(bundle)
        except ShardTakenOver:
            return Outcome.SKIPPED
        except Exception as exc:  # a bundle that cannot load fails the job at once: no retry helps
            log.exception("job %s: cannot prepare shard %s", job_id, shard)
            store.fail(job_id, f"cannot load model {params.model!r}: {exc}")
            return Outcome.FAILED
        return _run_through_outages(store, bundle, sp, params, job_id, shard, token, attempts, sleep, rec)
    finally:
        try:
            store.release_lease(job_id, shard, token)
        except redis.RedisError:
            pass  # it expires by itself


class ShardTakenOver(Exception):
    """Another run holds the shard now (this one waited past its lease): it finishes the shard."""


def _load_through_outages(
    get_bundle: Callable[[str], Bundle],
    ref: str,
    store: JobStore,
    sleep: Callable[[float], None],
    keep_shard: Callable[[], bool] = lambda: True,
) -> Bundle:
    """The bundle; a Redis or storage outage while it is fetched from the registry is waited out (with
    backoff, up to ``outage_limit_s``) like one while sampling: it is not the bundle's fault. The shard
    stays held meanwhile (``keep_shard``), else the reconciler would hand it to a second worker that
    waits for the same store."""
    deadline = time.monotonic() + store.settings.outage_limit_s
    delay = 0.5
    while True:
        try:
            return get_bundle(ref)
        except Exception as exc:
            if not is_outage(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("fetching %s: outage (%r); retrying in %.1f s", ref, exc, delay)
            sleep(delay)
            delay = min(delay * 2, 10.0)
            if not keep_shard():
                raise ShardTakenOver(ref) from exc


def _keep_lease(store: JobStore, job_id: str, shard: int, token: str) -> bool:
    """Refresh this run's lease on the shard (or take it again once expired); False if another run holds
    it. A Redis error counts as kept: the lease then expires by itself and the reconciler decides."""
    try:
        return store.refresh_lease(job_id, shard, token) or store.acquire_lease(job_id, shard, token)
    except redis.RedisError:
        return True


def _run_through_outages(
    store: JobStore,
    bundle: Bundle,
    sp: SamplingParams,
    params: JobParams,
    job_id: str,
    shard: int,
    token: str,
    attempts: int,
    sleep: Callable[[float], None],
    seen: dict[str, Any] | None = None,
) -> Outcome:
    """Run the shard; through a Redis or storage outage, retry with backoff (holding the shard) for up to
    ``outage_limit_s``, then fail the job with the reason. Other errors use up the shard's attempts."""
    max_tries = store.settings.shard_max_tries
    limit = store.settings.outage_limit_s
    outage_since: float | None = None
    delay = 0.5
    while True:
        try:
            # the first try follows start_shard, which found the shard not done and read the record
            first, seen = seen, None
            return _attempt(store, bundle, sp, params, job_id, shard, token, seen=first)
        except Cancelled as exc:
            log.info("job %s shard %s stopped: %s", job_id, shard, exc)
            _stopped(store, job_id, shard, str(exc))
            return Outcome.STOPPED
        except Exception as exc:
            if not is_outage(exc):
                log.exception(
                    "job %s shard %s crashed (attempt %s of %s)", job_id, shard, attempts, max_tries
                )
                _stopped(store, job_id, shard, "crashed")
                if attempts >= max_tries:
                    store.fail(job_id, f"shard {shard} failed {attempts} times, last: {exc!r}")
                    return Outcome.FAILED
                store.requeue(job_id, shard)
                return Outcome.RETRY
            now = time.monotonic()
            outage_since = outage_since if outage_since is not None else now
            if now - outage_since >= limit:
                log.error("job %s shard %s: outage for %.0f s, giving up: %r", job_id, shard, limit, exc)
                try:
                    store.fail(job_id, f"storage or Redis unavailable for {limit:g} s: {exc!r}")
                except Exception:
                    log.warning("job %s: could not record the failure; the reconciler will", job_id)
                return Outcome.FAILED
            log.warning("job %s shard %s: outage (%r); retrying in %.1f s", job_id, shard, exc, delay)
            sleep(delay)
            delay = min(delay * 2, 15.0)
            if not _keep_lease(store, job_id, shard, token):  # another worker took it over: let it finish
                return Outcome.SKIPPED


def _stopped(store: JobStore, job_id: str, shard: int, reason: str) -> None:
    """Best effort, after a run stopped: its shard no longer runs (the job's ``phase`` must not show
    it), and if the job finished meanwhile, its recorded progress counts the batch this run wrote last."""
    if reason == "lease lost":
        return  # another worker runs the shard now: its reports stand
    try:
        store.shard_progress(job_id, shard, 0, 0, None)  # counts are never lowered: only the phase goes
        store.settle_progress(job_id)
    except Exception:  # Redis or storage down: the progress is a little stale, nothing is lost
        log.warning("job %s shard %s: could not report that it stopped", job_id, shard, exc_info=True)


def _attempt(
    store: JobStore,
    bundle: Bundle,
    sp: SamplingParams,
    params: JobParams,
    job_id: str,
    shard: int,
    token: str,
    seen: dict[str, Any] | None = None,
) -> Outcome:
    """One try of the shard. ``seen``: the record read before ``start_shard`` on the first try (which
    checked the shard was not done); None on a later try."""
    if seen is None and store.shard_done(job_id, shard):  # an earlier try stored it, failed advancing
        store.advance(job_id)
        return Outcome.DONE
    store.mark_running(job_id, seen)
    callback = ShardProgress(store, job_id, shard, token)
    callback.start()
    indices = shard_indices(params, shard)
    generated, kept = 0, []
    pairs = generate_pairs(
        bundle,
        indices,
        seed=params.seed,
        params=sp,
        eta=params.eta,
        batch_size=params.batch_size,
        callback=callback,
        masks=params.masks,
    )
    out_size = parse_size(params.size) if params.size else None  # None: the square output
    batch: list[tuple[dict[str, Any], bytes, bytes]] = []  # a batch's kept pairs, stored together
    label = counters.model_of(seen or store.record(job_id))  # a shared model's name, else "other"
    for pair in metered_pairs(pairs, store, label, bundle.device):  # counted for /metrics
        generated += 1
        if pair.kept:
            meta = pair_meta(
                pair.name, pair.index, pair.seed, pair.dice_loss, pair.class_losses,
                mask_source=pair.mask_source, cleaned=pair.cleaned,
            )  # fmt: skip
            image, mask = pair.image, pair.mask
            if out_size is not None:
                image, mask = restore_shape(image, mask, out_size)
            batch.append((meta, png(image), png(mask)))
            kept.append(pair.index)
        if generated % params.batch_size == 0 or generated == len(indices):  # a batch is complete
            # generate_pairs yields a batch's pairs together, so storing them at once delays none
            if not store.put_pairs(job_id, batch):
                raise Cancelled("job deleted")
            batch = []
            if generated < len(indices):
                callback.batch_done(generated, len(kept))
    if batch and not store.put_pairs(job_id, batch):  # fewer pairs than indices (not expected)
        raise Cancelled("job deleted")
    store.finish_shard(job_id, shard, generated, kept)
    return Outcome.DONE
