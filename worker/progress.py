"""The sampling callback of a shard: stop when the job was canceled or decided, keep the lease alive."""

from __future__ import annotations

import time
from typing import Any

from app.store import JobStore
from models.expand import Cancelled


class ShardProgress:
    """Called by ``generate_pairs`` after every solver step.

    Raises ``Cancelled`` once the job's stop flag is set (cancel, delete, or the job finished without
    this shard), so a shard stops within one solver step. Refreshes the shard's lease every third of
    its TTL so another worker does not take the shard over while this one is alive.
    """

    def __init__(self, store: JobStore, job_id: str, shard: int, token: str) -> None:
        self.store = store
        self.job_id = job_id
        self.shard = shard
        self.token = token
        self.refresh_every = store.settings.lease_ttl_s / 3
        self.last_refresh = time.monotonic()
        self.steps = 0

    def check(self) -> None:
        reason = self.store.stop_reason(self.job_id)
        if reason is not None:
            raise Cancelled(reason)
        now = time.monotonic()
        if now - self.last_refresh >= self.refresh_every:
            refreshed = self.store.refresh_lease(self.job_id, self.shard, self.token)
            if not refreshed and not self.store.acquire_lease(self.job_id, self.shard, self.token):
                # Our lease expired and another worker took the shard over: it will finish it.
                raise Cancelled("lease lost")
            self.last_refresh = now

    def __call__(self, event: dict[str, Any]) -> None:
        self.steps += 1
        self.check()
