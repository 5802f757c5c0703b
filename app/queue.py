"""The Celery app as both sides see it: the API only sends shard tasks by name (it never imports the
worker, which needs torch); ``worker.celery_app`` adds the task modules to the same configuration."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from app.core.config import Settings

SHARD_TASK = "worker.tasks.run_shard"

Enqueue = Callable[[str, int, str], None]  # (job id, shard, queue)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("diffuseexpand", broker=settings.redis_url)
    vis = settings.visibility_timeout_s
    celery.conf.update(
        task_acks_late=True,  # a shard whose worker dies is delivered again (shards are idempotent)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # reserve only the shard being run
        task_ignore_result=True,  # the job store is the source of truth
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events (Flower, `celery events`): workers send started/succeeded/failed, and the API,
        # which sends the shards, a task-sent event for each.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_transport_options={
            # An unacked shard (its worker was killed) is delivered again after this many seconds.
            "visibility_timeout": vis,
            "unacked_restore_interval": max(1, min(10, vis // 4)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
        },
    )
    return celery


def celery_train_enqueue(celery: Celery) -> Callable[[str, str], None]:
    """Sends a training (app.trainings) to its queue; only workers started with ``-Q train`` take it."""
    from app.trainings import TRAIN_TASK

    def enqueue(training_id: str, queue: str) -> None:
        celery.send_task(TRAIN_TASK, args=[training_id], queue=queue)

    return enqueue


def celery_enqueue(celery: Celery) -> Enqueue:
    def enqueue(job_id: str, shard: int, queue: str) -> None:
        celery.send_task(SHARD_TASK, args=[job_id, shard], queue=queue)

    return enqueue
