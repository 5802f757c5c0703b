"""Thin Celery tasks: ids in, the work in ``worker.shard``."""

from __future__ import annotations

from celery.utils.log import get_task_logger

from app.queue import SHARD_TASK
from app.trainings import TRAIN_TASK
from worker.celery_app import celery_app
from worker.runtime import get_bundle, get_store, get_trainings
from worker.shard import run_shard

logger = get_task_logger(__name__)


@celery_app.task(name=SHARD_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_shard_task(job_id: str, shard: int) -> str:
    """Generate shard ``shard`` of job ``job_id``; safe to run again (its objects are overwritten)."""
    outcome = run_shard(get_store(), get_bundle, job_id, shard)
    logger.info("job %s shard %s: %s", job_id, shard, outcome)
    return outcome.value


@celery_app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_training_task(training_id: str) -> str:
    """Train (or continue training) ``training_id``; a duplicate delivery returns at once."""
    from models.bundle import resolve_device
    from worker.training import run_training

    device = str(resolve_device(get_store().settings.device))
    outcome = run_training(get_trainings(), training_id, device=device)
    logger.info("training %s: %s", training_id, outcome)
    return outcome.value
