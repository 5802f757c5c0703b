"""The Celery app of the workers: the shared configuration of ``app.queue`` plus the task modules.

Run one worker process per GPU (``--pool solo``); bundles are loaded lazily inside the process
that runs the tasks, i.e. after any fork, because CUDA is not fork-safe.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from app.core.config import get_settings
from app.heartbeats import beat
from app.layout import RedisKeys
from app.queue import make_celery

settings = get_settings()
celery_app = make_celery(settings)
celery_app.conf.update(imports=("worker.tasks",))

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0
_stop = threading.Event()


def _heartbeat(hostname: str, queues: list[str]) -> None:
    """Announce this worker and its queues in Redis (what ``/readyz`` and the reconciler read), even
    while a shard keeps it busy; run the reconciler's ticks from the same thread."""
    from app.reconciler import Reconciler
    from worker.runtime import get_store, get_trainings

    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    key = RedisKeys(settings.redis_prefix).worker(hostname)
    reconciler = Reconciler(get_store(), trainings=get_trainings())
    last_sweep = 0.0
    while not _stop.is_set():
        try:
            r.set(key, beat(queues, r), ex=int(HEARTBEAT_S * 3))
            now = time.monotonic()
            if reconciler.interval > 0 and now - last_sweep >= reconciler.interval:
                last_sweep = now
                reconciler.tick()
        except Exception:  # Redis or storage down: try again at the next beat
            log.warning("heartbeat or reconciler tick failed", exc_info=True)
        _stop.wait(HEARTBEAT_S)
    try:
        r.delete(key)
    except redis.RedisError:
        pass


def _consumed_queues(sender: Any) -> list[str]:
    try:
        return sorted(sender.app.amqp.queues.consume_from)
    except AttributeError:
        return [settings.celery_queue]


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    args = (hostname, _consumed_queues(sender))
    threading.Thread(target=_heartbeat, args=args, name="heartbeat", daemon=True).start()


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    from worker import metrics

    metrics.serve(settings)  # this worker's /metrics (DIFFEXP_WORKER_METRICS_PORT; docs/metrics.md)


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    _stop.set()


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    from worker import metrics

    metrics.stop()
