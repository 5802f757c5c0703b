"""The Celery app of the workers: the shared configuration of ``app.queue`` plus the task modules.

Run one worker process per GPU (``--pool solo``); bundles are loaded lazily inside the process
that runs the tasks, i.e. after any fork, because CUDA is not fork-safe.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from app.core.config import get_settings
from app.queue import make_celery

settings = get_settings()
celery_app = make_celery(settings)
celery_app.conf.update(imports=("worker.tasks",))

HEARTBEAT_S = 5.0
_stop = threading.Event()


def _heartbeat(hostname: str) -> None:
    """Announce this worker in Redis (what ``/readyz`` counts), even while a shard keeps it busy."""
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    key = f"{settings.redis_prefix}:worker:{hostname}"
    while not _stop.is_set():
        try:
            r.set(key, "1", ex=int(HEARTBEAT_S * 3))
        except redis.RedisError:
            pass
        _stop.wait(HEARTBEAT_S)
    try:
        r.delete(key)
    except redis.RedisError:
        pass


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    threading.Thread(target=_heartbeat, args=(hostname,), name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    _stop.set()
