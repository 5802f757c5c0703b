"""A job's progress: what each shard reports, their sum, and the rate and ETA derived from it.

Pure functions, so every number the API shows can be tested exactly. Each shard that ran writes one
entry of ``J:prog`` (``app.layout``), ``"generated,kept,phase,position,at"``:

- ``generated``, ``kept``: pairs the shard generated and Stage IV kept so far. A shard that runs
  again after a crash regenerates the same pairs bit for bit, so the store keeps the larger count
  (``store._SHARD_PROGRESS``): counts never go back, and no pair is counted twice.
- ``phase``: what the shard's run is doing now (``mask``, ``image`` or ``filter`` of its current
  batch; empty when it is not running), ``position``: pairs that run has finished, so the job's
  ``phase`` is that of the shard furthest along.
- ``at``: when (Redis's clock) the shard's counts last rose. The rate is measured up to the latest
  such moment and the ETA counts down from it, so between two batches the ETA falls with the clock
  instead of growing (the counts move a whole batch at a time).

Every pair of every shard counts, including shards beyond those the result needs and the batch a
canceled job had in flight: ``generated`` is the work done, not the index of the last pair chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.layout import as_str
from app.schemas import JobStatus, Phase, Progress

PHASES: tuple[Phase, ...] = ("mask", "image", "filter")  # the order of a batch's phases


@dataclass(frozen=True)
class ShardReport:
    generated: int = 0
    kept: int = 0
    phase: Phase | None = None  # None: the shard is not running (finished, stopped, or not started)
    position: int = 0
    at: float | None = None  # Unix time its counts last rose (None: never, or an older entry)


def parse_report(value: str | bytes) -> ShardReport:
    """An entry of ``J:prog``; the older ``"generated,kept"`` form reads as a shard not running."""
    parts = as_str(value).split(",")
    phase = next((p for p in PHASES if len(parts) > 2 and parts[2] == p), None)
    position = int(parts[3]) if len(parts) > 3 and parts[3] else 0
    at = float(parts[4]) if len(parts) > 4 and parts[4] else None
    return ShardReport(int(parts[0]), int(parts[1]), phase, position, at)


def furthest_phase(reports: Iterable[ShardReport]) -> Phase | None:
    """The phase of the running shard furthest along (most pairs finished, then the later phase)."""
    running = [(r.position, PHASES.index(r.phase), r.phase) for r in reports if r.phase is not None]
    return max(running)[2] if running else None


@dataclass(frozen=True)
class Estimate:
    pairs_per_second: float | None
    eta_seconds: float | None


def estimate(
    *,
    generated: int,
    kept: int,
    target: int,
    elapsed_s: float | None,
    status: JobStatus,
    counted_s: float | None = None,
) -> Estimate:
    """Generated pairs per second of running time, and the seconds until the result is expected.

    ``counted_s``: the running time at which the counts last rose (``elapsed_s`` when unknown); the
    rates are measured up to then, since the counts move a batch at a time.
    ``pairs_per_second``: ``generated / counted_s``, None before the job ran (``elapsed_s`` None or 0).
    ``eta_seconds``: 0 once the job succeeded; None once it failed or was canceled (no result is
    coming) and while nothing is kept yet (no rate to extrapolate); otherwise the pairs still to keep
    at the rate pairs were kept so far, less the time since: ``(target - kept) * counted_s / kept -
    (elapsed_s - counted_s)``, never below 0. It counts down between batches, never up.
    Rounded to 1 ms and 0.1 s: the rates are estimates, and a stable value reads better.
    """
    if elapsed_s is None or elapsed_s <= 0:
        return Estimate(None, 0.0 if status is JobStatus.SUCCEEDED else None)
    basis = elapsed_s if counted_s is None or counted_s <= 0 else min(counted_s, elapsed_s)
    pps = round(generated / basis, 3)
    if status is JobStatus.SUCCEEDED:
        return Estimate(pps, 0.0)
    if status.is_terminal() or kept <= 0:
        return Estimate(pps, None)
    return Estimate(pps, round(max(0.0, max(0, target - kept) * basis / kept - (elapsed_s - basis)), 1))


def elapsed_seconds(started_at: str | None, completed_at: str | None, now: float) -> float | None:
    """The job's running time: from its first shard's start to its end (or ``now``), never negative
    (the API's and the workers' clocks may differ a little). None when it never started."""
    if not started_at:
        return None
    start = datetime.fromisoformat(started_at).timestamp()
    end = datetime.fromisoformat(completed_at).timestamp() if completed_at else now
    return max(0.0, end - start)


def job_progress(rec: dict[str, Any], values: Iterable[str | bytes], now: float) -> Progress:
    """The progress of job record ``rec`` from its shards' entries of ``J:prog``, at time ``now``."""
    reports = [parse_report(v) for v in values]
    generated = sum(r.generated for r in reports)
    kept = sum(r.kept for r in reports)
    status = JobStatus(rec["status"])
    target = int(rec["params"]["count"])
    stamps = [r.at for r in reports if r.at is not None]
    counted_s = elapsed_seconds(rec.get("started_at"), None, max(stamps)) if stamps else None
    est = estimate(
        generated=generated,
        kept=kept,
        target=target,
        elapsed_s=elapsed_seconds(rec.get("started_at"), rec.get("completed_at"), now),
        status=status,
        counted_s=counted_s,
    )
    return Progress(
        target=target,
        generated=generated,
        kept=kept,
        discarded=generated - kept,
        pairs_per_second=est.pairs_per_second,
        eta_seconds=est.eta_seconds,
        phase=None if status.is_terminal() else furthest_phase(reports),
    )
