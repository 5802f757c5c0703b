"""Per-process state of a worker: the job store and the bundles, created on first use.

First use happens inside the process that runs tasks (after the fork of a prefork pool), so CUDA
is initialised there; each bundle is loaded once and kept in memory for every later shard.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import redis

from app.core.config import Settings, get_settings
from app.queue import celery_enqueue
from app.storage import make_storage
from app.store import JobStore
from app.trainings import TrainingStore, install
from models.bundle import Bundle, resolve_device

log = logging.getLogger(__name__)

_lock = threading.Lock()
_bundles: dict[str, Bundle] = {}
_store: JobStore | None = None
_trainings: TrainingStore | None = None


def get_bundle(name: str, settings: Settings | None = None) -> Bundle:
    settings = settings or get_settings()
    with _lock:
        if name not in _bundles:
            if "/" in name or name.startswith("."):
                raise ValueError(f"invalid model name {name!r}")
            device = resolve_device(settings.device)
            path = Path(settings.bundles_dir) / name
            log.info("loading bundle %s on %s", path, device)
            _bundles[name] = Bundle.load(path, device=device)
        return _bundles[name]


def loaded_bundles() -> dict[str, str]:
    """Model name -> device of the bundles this process holds in memory (for ``worker.metrics``).

    Without ``_lock``, which is held while a bundle loads: a scrape must not wait for that."""
    return {name: str(bundle.device) for name, bundle in list(_bundles.items())}


def get_store() -> JobStore:
    global _store
    with _lock:
        if _store is None:
            from worker.celery_app import celery_app

            settings = get_settings()
            r = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)
            _store = JobStore(r, make_storage(settings), settings, celery_enqueue(celery_app))
        return _store


def get_trainings() -> TrainingStore:
    """The training store of this process (on the job store's Redis and storage)."""
    global _trainings
    store = get_store()
    with _lock:
        if _trainings is None:
            from app.datasets import DatasetStore
            from app.queue import celery_train_enqueue
            from worker.celery_app import celery_app

            datasets = DatasetStore(store.r, store.storage, store.settings.redis_prefix)
            _trainings = TrainingStore(
                store.r, store.storage, store.settings, datasets, celery_train_enqueue(celery_app)
            )
            install(_trainings)
        return _trainings
