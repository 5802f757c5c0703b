"""The sampling callback of a shard: stop when the job was canceled or decided, keep the lease alive,
and report progress at every phase of every batch."""

from __future__ import annotations

import time
from typing import Any

from app.schemas import Phase
from app.store import JobStore
from models.expand import Cancelled

# The phase a batch enters when a phase's last solver step is done (the filter has no steps).
NEXT_PHASE: dict[str, Phase] = {"mask": "image", "image": "filter"}


class ShardProgress:
    """Called by ``generate_pairs`` after every solver step.

    Raises ``Cancelled`` once the job's stop flag is set (cancel, delete, or the job finished without
    this shard), so a shard stops within one solver step. Refreshes the shard's lease every third of
    its TTL so another worker does not take the shard over while this one is alive.

    Reports to Redis when the shard's run changes phase only, not at every step: at the start (the
    first batch samples masks), when a batch's mask phase is done (images next), when its image phase
    is done (the filter next), and when its pairs are scored and stored (``batch_done``: the counts,
    and masks of the next batch; after the last batch ``finish_shard``). So 3 writes per batch and 1
    more per run, whatever ``steps``.
    """

    def __init__(self, store: JobStore, job_id: str, shard: int, token: str) -> None:
        self.store = store
        self.job_id = job_id
        self.shard = shard
        self.token = token
        self.refresh_every = store.settings.lease_ttl_s / 3
        self.last_refresh = time.monotonic()
        self.steps = 0
        self.generated = 0
        self.kept = 0
        self.phase: Phase | None = None

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

    def report(self, phase: Phase | None) -> None:
        self.phase = phase
        if not self.store.shard_progress(
            self.job_id, self.shard, self.generated, self.kept, phase, position=self.generated
        ):
            raise Cancelled("job deleted")

    def start(self) -> None:
        """The run begins: stop at once if the job is over, else say that its first batch samples masks."""
        self.check()
        self.report("mask")

    def __call__(self, event: dict[str, Any]) -> None:
        self.steps += 1
        self.check()
        following = NEXT_PHASE.get(event.get("phase", ""))
        if following is not None and event.get("step") == event.get("steps"):
            self.report(following)

    def batch_done(self, generated: int, kept: int) -> None:
        """A batch's pairs are scored and stored, and another batch follows: report the run's counts
        (the last batch's are reported with the shard's result, ``JobStore.finish_shard``)."""
        self.generated, self.kept = generated, kept
        self.report("mask")
