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
from PIL import Image
from pydantic import ValidationError

from app.params import JobParams
from app.schemas import JobStatus
from app.store import JobStore
from models.bundle import Bundle
from models.expand import Cancelled, generate_pairs
from models.sampling import SamplingParams
from worker.progress import ShardProgress

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # job gone, finished, or shard done already
    STOPPED = "stopped"  # canceled or decided while running
    RETRY = "retry"  # crashed; enqueued again
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


def run_shard(
    store: JobStore, get_bundle: Callable[[str], Bundle], job_id: str, shard: int, *, poll_s: float = 0.2
) -> Outcome:
    rec = store.record(job_id)
    if rec is None or JobStatus(rec["status"]).is_terminal() or store.shard_done(job_id, shard):
        return Outcome.SKIPPED
    try:
        params = JobParams.model_validate(rec["params"])
    except ValidationError as exc:  # a record the API did not validate (an older version wrote it)
        log.error("job %s: invalid parameters: %s", job_id, exc)
        wrong = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        store.fail(job_id, f"invalid job parameters: {wrong}")
        return Outcome.FAILED
    try:
        bundle = get_bundle(params.model)
        sp = sampling_params(params)
    except Exception as exc:  # a bundle that cannot load fails the job at once: no retry helps
        log.exception("job %s: cannot prepare shard %s", job_id, shard)
        store.fail(job_id, f"cannot load model {params.model!r}: {exc}")
        return Outcome.FAILED

    # A shard delivered twice (visibility timeout) waits while the first worker holds it alive.
    token = f"{os.getpid()}:{uuid.uuid4().hex}"  # the pid says which process holds the shard
    while not store.acquire_lease(job_id, shard, token):
        if store.stop_reason(job_id) is not None or store.shard_done(job_id, shard):
            return Outcome.SKIPPED
        time.sleep(poll_s)
    try:
        attempts = store.bump_attempts(job_id, shard)
        max_tries = store.settings.shard_max_tries
        if attempts > max_tries:
            store.fail(job_id, f"shard {shard} did not finish in {max_tries} attempts (its workers crashed)")
            return Outcome.FAILED
        if store.shard_done(job_id, shard):
            return Outcome.SKIPPED
        store.mark_running(job_id)
        callback = ShardProgress(store, job_id, shard, token)
        generated, kept = 0, []
        try:
            callback.check()
            for pair in generate_pairs(
                bundle,
                shard_indices(params, shard),
                seed=params.seed,
                params=sp,
                eta=params.eta,
                batch_size=params.batch_size,
                callback=callback,
            ):
                generated += 1
                if pair.kept:
                    store.put_pair(
                        job_id,
                        name=pair.name,
                        index=pair.index,
                        seed=pair.seed,
                        dice_loss=pair.dice_loss,
                        image_png=png(pair.image),
                        mask_png=png(pair.mask),
                    )
                    kept.append(pair.index)
                store.shard_progress(job_id, shard, generated, len(kept))
        except Cancelled as exc:
            log.info("job %s shard %s stopped: %s", job_id, shard, exc)
            return Outcome.STOPPED
        except Exception as exc:
            log.exception("job %s shard %s crashed (attempt %s of %s)", job_id, shard, attempts, max_tries)
            if attempts >= max_tries:
                store.fail(job_id, f"shard {shard} failed {attempts} times, last: {exc!r}")
                return Outcome.FAILED
            store.requeue(job_id, shard)
            return Outcome.RETRY
        store.finish_shard(job_id, shard, generated, kept)
        return Outcome.DONE
    finally:
        store.release_lease(job_id, shard, token)
