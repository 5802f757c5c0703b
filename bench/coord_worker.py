"""A Celery worker whose sampler is a no-op, for ``bench/coordination.py`` only.

Run as ``python bench/coord_worker.py CELERY-WORKER-ARGS...``. Before Celery starts, this process
replaces what ``worker.tasks`` / ``worker.shard`` use to load a bundle and generate pairs with a
stand-in that returns fixed tiny pairs instantly (all kept, a fixed Dice loss) and reports the same
solver events as a one-step sampler, so everything around the sampler (leases, progress, storage, the
finaliser) runs as in production. Nothing here is imported by the service.

It also counts, in this process, storage writes and the time spent waiting for and holding a job's
lock, and writes them as JSON to ``$BENCH_STATS_DIR/<pid>.json`` when the worker shuts down.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import app.store  # noqa: E402
import worker.shard  # noqa: E402
import worker.tasks  # noqa: E402
from models.expand import GeneratedPair  # noqa: E402

SIZE = 16
IMAGE = np.full((SIZE, SIZE), 120, np.uint8)
MASK = np.zeros((SIZE, SIZE), np.uint8)
MASK[4:12, 4:12] = 255
DICE_LOSS = 0.05

STATS: dict[str, float] = {
    "storage_puts": 0,
    "storage_bytes": 0,
    "lock_acquires": 0,
    "lock_wait_s": 0.0,
    "lock_hold_s": 0.0,
    "lock_hold_max_s": 0.0,
    "advance_calls": 0,
    "advance_s": 0.0,
}


FIRST_TASK_CPU: dict[str, float] = {}


class StandInBundle:
    device = "cpu"
    resolution = SIZE


BUNDLE = StandInBundle()


def stand_in_bundle(ref: str, *_: Any, **__: Any) -> Any:
    return BUNDLE


def stand_in_pairs(
    bundle: Any,
    indices: Iterable[int],
    *,
    seed: int,
    params: Any,
    eta: float,
    batch_size: int = 8,
    callback: Any = None,
    masks: Any = None,
) -> Iterator[GeneratedPair]:
    """What ``models.expand.generate_pairs`` yields, instantly: batches of fixed kept pairs, with the
    end-of-phase events of a one-step sampler (``worker.progress`` reports a phase change on them)."""
    indices = list(indices)
    for b, start in enumerate(range(0, len(indices), batch_size)):
        chunk = indices[start : start + batch_size]
        for phase in ("mask", "image"):
            if callback is not None:
                callback({"event": "step", "batch": b, "batch_pairs": len(chunk), "phase": phase,
                          "step": 1, "steps": 1})  # fmt: skip
        for index in chunk:
            yield GeneratedPair(
                index=index, seed=seed, image=IMAGE, mask=MASK, dice_loss=DICE_LOSS, kept=True
            )


class TimedLock:
    """Wraps a redis-py lock: time waited for it and held."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.t_acquired = 0.0

    def __enter__(self) -> Any:
        t = time.perf_counter()
        out = self.lock.__enter__()
        self.t_acquired = time.perf_counter()
        STATS["lock_acquires"] += 1
        STATS["lock_wait_s"] += self.t_acquired - t
        return out

    def __exit__(self, *exc: Any) -> Any:
        held = time.perf_counter() - self.t_acquired
        STATS["lock_hold_s"] += held
        STATS["lock_hold_max_s"] = max(STATS["lock_hold_max_s"], held)
        return self.lock.__exit__(*exc)


def _patch_store() -> None:
    store_cls = app.store.JobStore
    lock, put, advance = store_cls._lock, store_cls._put, store_cls.advance

    def timed_lock(self: Any, job_id: str) -> Any:
        return TimedLock(lock(self, job_id))

    def counted_put(self: Any, key: str, data: bytes, content_type: str) -> None:
        STATS["storage_puts"] += 1
        STATS["storage_bytes"] += len(data)
        put(self, key, data, content_type)

    def timed_advance(self: Any, job_id: str) -> None:
        t = time.perf_counter()
        try:
            advance(self, job_id)
        finally:
            STATS["advance_calls"] += 1
            STATS["advance_s"] += time.perf_counter() - t

    store_cls._lock = timed_lock  # type: ignore[method-assign]
    store_cls._put = counted_put  # type: ignore[method-assign]
    store_cls.advance = timed_advance  # type: ignore[method-assign]
    # the zip is streamed with put_stream (not _put): one write per job
    write_zip = store_cls._write_zip

    def counted_zip(self: Any, *args: Any, **kwargs: Any) -> None:
        STATS["storage_puts"] += 1
        write_zip(self, *args, **kwargs)

    store_cls._write_zip = counted_zip  # type: ignore[method-assign]


def _dump_stats() -> None:
    STATS["cpu_process_s"] = time.process_time() - FIRST_TASK_CPU.get("t", 0.0)
    out = os.environ.get("BENCH_STATS_DIR")
    if out:
        Path(out, f"{os.getpid()}.json").write_text(json.dumps(STATS))


def _profile() -> None:
    """With BENCH_PROFILE=DIR, profile this worker process (cProfile) and dump DIR/<pid>.prof at exit."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return
    import cProfile

    prof = cProfile.Profile(time.process_time)  # CPU time: the machine is shared, wall time misleads
    prof.enable()
    atexit.register(lambda: (prof.disable(), prof.dump_stats(str(Path(out, f"{os.getpid()}.prof")))))


def _cpu_timed(owner: Any, name: str) -> None:
    """Add the CPU time of ``owner.name`` calls to STATS["cpu_<name>_s"] (nested calls counted once)."""
    fn = getattr(owner, name, None)
    if fn is None:  # an older version of the service (measured for comparison) lacks it
        return
    depth = 0

    def timed(*args: Any, **kwargs: Any) -> Any:
        nonlocal depth
        t = time.process_time()
        depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            depth -= 1
            if depth == 0:
                STATS[f"cpu_{name}_s"] = STATS.get(f"cpu_{name}_s", 0) + time.process_time() - t

    setattr(owner, name, timed)


def _count_outcomes() -> None:
    """Shard task runs by outcome (a skipped one costs a delivery and a few Redis calls), and the CPU
    time of the parts of a run."""
    for name in ("put_pairs", "finish_shard", "shard_progress", "stop_reason", "start_shard", "mark_running"):
        _cpu_timed(app.store.JobStore, name)
    _cpu_timed(worker.shard, "png")
    run_shard = worker.tasks.run_shard

    def counted(*args: Any, **kwargs: Any) -> Any:
        t = time.process_time()
        FIRST_TASK_CPU.setdefault("t", t)  # the process's CPU from here on is the shards'
        outcome = run_shard(*args, **kwargs)
        STATS["cpu_run_shard_s"] = STATS.get("cpu_run_shard_s", 0) + time.process_time() - t
        STATS[f"runs_{outcome.value}"] = STATS.get(f"runs_{outcome.value}", 0) + 1
        return outcome

    worker.tasks.run_shard = counted  # type: ignore[assignment]


def main() -> None:
    _count_outcomes()
    worker.tasks.get_bundle = stand_in_bundle  # type: ignore[assignment]
    worker.shard.generate_pairs = stand_in_pairs  # type: ignore[assignment]
    _patch_store()
    atexit.register(_dump_stats)
    _profile()
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
