"""Metrics of one worker process: its own ``/metrics`` (prometheus_client) and its share of the
service-wide counters in Redis (``app.counters``, which the API's ``/metrics`` reports).

Served on ``DIFFEXP_WORKER_METRICS_HOST:DIFFEXP_WORKER_METRICS_PORT`` from the process that runs the
shards (``--pool solo``; a prefork pool's children would count where no server reads). Each worker
process on a host needs its own port; a port already taken is logged and the worker runs without its
endpoint rather than not at all. Labels: shared model names (a key's private model is ``other``,
``app.counters.model_label``), devices and outcomes only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from app import counters
from app.core.config import Settings
from app.store import JobStore

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 10.0  # a long shard adds its pairs to the Redis counters at least this often

SHARD_SECONDS = Histogram(
    "diffexp_worker_shard_duration_seconds",
    "Time a shard run took from its first pair to its last (runs that generated all their pairs).",
    ["model", "device"],
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
PAIRS_PER_SECOND = Histogram(
    "diffexp_worker_pairs_per_second",
    "Pairs generated per second by a shard run (sampling, scoring and storing the kept ones).",
    ["model", "device"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500),
)
PAIRS_GENERATED = Counter(
    "diffexp_worker_pairs_generated", "Pairs this worker generated.", ["model", "device"]
)
PAIRS_KEPT = Counter("diffexp_worker_pairs_kept", "Generated pairs that Stage IV kept.", ["model", "device"])
SHARD_RUNS = Counter(
    "diffexp_worker_shard_runs", "Shard task runs of this worker by outcome.", ["model", "outcome"]
)


class BundlesCollector:
    """``diffexp_worker_bundles_loaded{model, version, device}``: the bundles this process holds, read at
    scrape (at most DIFFEXP_MAX_LOADED_BUNDLES)."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from worker.runtime import loaded_bundle_labels

        family = GaugeMetricFamily(
            "diffexp_worker_bundles_loaded",
            "Bundles loaded in this worker (shared models by name and version; private ones as 'other').",
            labels=["model", "version", "device"],
        )
        for labels, n in sorted(loaded_bundle_labels().items()):
            family.add_metric(list(labels), n)
        yield family


REGISTRY.register(BundlesCollector())


class _Pair(Protocol):
    @property
    def kept(self) -> bool: ...


PairT = TypeVar("PairT", bound=_Pair)


def metered_pairs(pairs: Iterable[PairT], store: JobStore, model: str, device: object) -> Iterator[PairT]:
    """Yield ``pairs`` unchanged, counting them here and in Redis, and time the run.

    Whatever ends the run (last pair, cancel, crash), the pairs it generated are counted: the Redis
    counters are flushed every ``FLUSH_EVERY_S`` and when the generator closes. Duration and pairs/s
    are observed only for a run that generated all its pairs: a stopped run's time says nothing.
    """
    dev = str(device)
    generated = kept = flushed_generated = flushed_kept = 0
    start = last_flush = time.monotonic()

    def flush() -> None:
        nonlocal flushed_generated, flushed_kept, last_flush
        new = counters.pairs(model, generated - flushed_generated, kept - flushed_kept)
        counters.add(store.r, store.keys.prefix, new)
        flushed_generated, flushed_kept, last_flush = generated, kept, time.monotonic()

    complete = False
    try:
        for pair in pairs:
            generated += 1
            kept += bool(pair.kept)
            PAIRS_GENERATED.labels(model, dev).inc()
            if pair.kept:
                PAIRS_KEPT.labels(model, dev).inc()
            if time.monotonic() - last_flush >= FLUSH_EVERY_S:
                flush()
            yield pair
        complete = True
    finally:
        flush()
        seconds = time.monotonic() - start
        if complete and generated and seconds > 0:
            SHARD_SECONDS.labels(model, dev).observe(seconds)
            PAIRS_PER_SECOND.labels(model, dev).observe(generated / seconds)


P = ParamSpec("P")
R = TypeVar("R", bound=str)


def counted(
    run: Callable[Concatenate[JobStore, Any, str, P], R],
) -> Callable[Concatenate[JobStore, Any, str, P], R]:
    """Count each run of ``run_shard(store, get_bundle, job_id, ...)`` by outcome (``"error"`` when it
    raised), by the model of its job."""

    @functools.wraps(run)
    def wrapper(store: JobStore, get_bundle: Any, job_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            outcome = run(store, get_bundle, job_id, *args, **kwargs)
        except Exception:
            _count_run(store, job_id, "error")
            raise
        _count_run(store, job_id, str(outcome))
        return outcome

    return wrapper


def _count_run(store: JobStore, job_id: str, outcome: str) -> None:
    try:
        model = counters.model_of(store.record(job_id))
    except Exception:  # Redis down: the counter below fails too, the local one still counts
        model = counters.UNKNOWN
    SHARD_RUNS.labels(model, outcome).inc()
    counters.count(store.r, store.keys.prefix, "shard_runs", model=model, outcome=outcome)


_server: Any = None


def serve(settings: Settings) -> str | None:
    """Serve this process's ``/metrics``; returns its URL, or None when off or the port is taken."""
    global _server
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    if port == 0 or _server is not None:
        return None
    try:
        _server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        log.error(
            "worker metrics: cannot listen on %s:%s (%s); give each worker process on a host its own "
            "DIFFEXP_WORKER_METRICS_PORT (0 = no endpoint)",
            host,
            port,
            exc,
        )
        return None
    url = f"http://{host}:{port}/metrics"
    log.info("worker metrics at %s", url)
    return url


def stop() -> None:
    global _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
