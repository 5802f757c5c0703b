"""Per-process state of a worker: the job store, the registry and the bundles, created on first use.

First use happens inside the process that runs tasks (after the fork of a prefork pool), so CUDA
is initialised there; a bundle is fetched from the registry once (then from the local cache) and
kept in memory for later shards, up to DIFFEXP_MAX_LOADED_BUNDLES bundles.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import redis

from app import counters
from app.core.config import Settings, get_settings
from app.layout import owner_id_of
from app.queue import celery_enqueue
from app.registry import Registry
from app.storage import make_storage
from app.store import JobStore
from app.trainings import TrainingStore
from models.bundle import Bundle, resolve_device

log = logging.getLogger(__name__)

_lock = threading.Lock()
# (name, version, digest) -> bundle, least recently used first; at most DIFFEXP_MAX_LOADED_BUNDLES
_bundles: OrderedDict[tuple[str, str, str], Bundle] = OrderedDict()
_labels: dict[tuple[str, str, str], str] = {}  # a loaded bundle -> its model label (app.counters)
_store: JobStore | None = None
_registry: Registry | None = None
_trainings: TrainingStore | None = None


def get_registry() -> Registry:
    global _registry
    store = get_store()
    with _lock:
        if _registry is None:
            _registry = Registry(store.storage, store.r, store.settings)
        return _registry


def get_bundle(ref: str, settings: Settings | None = None, registry: Registry | None = None) -> Bundle:
    """The bundle of a job's model reference (``NAME@VERSION``, or ``NAME`` for the latest), fetched
    from the registry into DIFFEXP_BUNDLE_CACHE_DIR on first use (``Registry.fetch`` checks its
    digest: a changed or corrupted file is refused) and kept in memory, at most
    DIFFEXP_MAX_LOADED_BUNDLES of them (the least recently used is dropped first)."""
    settings = settings or get_settings()
    registry = registry or get_registry()
    name, version, rec = registry.resolve(ref)
    key = (name, version, str(rec.get("digest")))
    with _lock:
        if key in _bundles:
            _bundles.move_to_end(key)
            return _bundles[key]
        path = registry.fetch(name, version, Path(settings.bundle_cache_dir))
        device = resolve_device(settings.device)
        log.info("loading bundle %s@%s from %s on %s", name, version, path, device)
        bundle = Bundle.load(path, device=device)
        if settings.compile:
            log.info("compiling %s@%s for batches of %d", name, version, settings.batch_size)
            log.info("compiled %s@%s in %.0f s", name, version, bundle.compile(settings.batch_size))
        _bundles[key] = bundle
        _labels[key] = counters.model_label(name, owner_id_of(rec))  # what /metrics shows of it
        while len(_bundles) > settings.max_loaded_bundles:
            old, _ = _bundles.popitem(last=False)
            _labels.pop(old, None)
            log.info("unloading bundle %s@%s (least recently used)", old[0], old[1])
        if str(device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # give the evicted bundle's memory back to other processes
        return bundle


def loaded_bundle_labels() -> dict[tuple[str, str, str], int]:
    """``(model, version, device)`` label values -> how many bundles this process holds under them:
    a shared model's name and version, and ``("other", "other", device)`` for every key's private
    model (/metrics shows no name a key chose; ``app.counters``)."""
    out: dict[tuple[str, str, str], int] = {}
    for k, bundle in list(_bundles.items()):
        model = _labels.get(k, counters.OTHER)
        version = k[1] if model != counters.OTHER else counters.OTHER
        labels = (model, version, str(bundle.device))
        out[labels] = out.get(labels, 0) + 1
    return out


def loaded_bundles() -> dict[str, str]:
    """Model reference -> device of the bundles this process holds in memory (for ``worker.metrics``).

    Without ``_lock``, which is held while a bundle loads: a scrape must not wait for that."""
    return {f"{k[0]}@{k[1]}": str(bundle.device) for k, bundle in list(_bundles.items())}


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
        return _trainings
