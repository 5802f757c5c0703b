"""A Redis lock kept alive while a long critical section runs (deleting a 10 000-pair dataset)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError


@contextmanager
def renewed_lock(r: redis.Redis, name: str, *, ttl_s: float, blocking_timeout: float) -> Iterator[None]:
    """Hold ``name`` for as long as the body runs: a thread resets its TTL every ``ttl_s / 3``.

    The TTL still frees the lock within ``ttl_s`` when this process dies; a body that takes longer
    than the TTL keeps it instead of losing it halfway (``LockNotOwnedError`` at release)."""
    lock = r.lock(name, timeout=ttl_s, blocking_timeout=blocking_timeout, thread_local=False)
    if not lock.acquire():
        raise LockError(f"could not acquire {name} within {blocking_timeout} s")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lock.reacquire()
            except (LockError, redis.RedisError):
                return  # lost or unreachable: release() says so

    thread = threading.Thread(target=renew, name=f"renew {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lock.release()
