"""What a job does next, decided from its finished shards: a pure function, so it can be tested exactly.

A job of ``count`` kept pairs is cut into shards of ``shard_size`` pair indices; shard k covers
``[k*K, (k+1)*K)`` (truncated at ``max_attempts``). The job is decided as soon as shards 0..j are all
finished and hold ``count`` kept pairs between them: the result is the ``count`` lowest kept
indices, whatever the number of workers or the order shards finish in. Until then, enough shards are
scheduled to reach ``count`` at the yield seen so far.

``plan`` reads every finished shard; ``plan_from_summary`` decides the same from running totals in O(1),
so a job of thousands of shards does not re-read them all under its lock after each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    """``decided``: the job is over, with ``chosen`` pair indices out of ``generated`` (``error`` when it
    ran out of attempts); otherwise enqueue shards ``range(next_shard, next_shard + add)``."""

    decided: bool = False
    chosen: list[int] = field(default_factory=list)
    generated: int = 0
    error: str | None = None
    add: int = 0


def shard_count(max_attempts: int, shard_size: int) -> int:
    return math.ceil(max_attempts / shard_size)


def plan(params: dict[str, Any], done: dict[int, dict[str, Any]], next_shard: int) -> Plan:
    count, k_size, max_attempts = params["count"], params["shard_size"], params["max_attempts"]
    total = shard_count(max_attempts, k_size)
    prefix_kept: list[int] = []
    for k in range(total):
        if k not in done:
            break
        prefix_kept.extend(sorted(done[k]["kept"]))
        if len(prefix_kept) >= count:
            chosen = prefix_kept[:count]
            return Plan(decided=True, chosen=chosen, generated=chosen[-1] + 1)
    else:
        return Plan(decided=True, chosen=prefix_kept, generated=max_attempts, error="max_attempts reached")

    pending = sum(1 for k in range(next_shard) if k not in done)
    generated = sum(d["generated"] for d in done.values())
    kept = sum(len(d["kept"]) for d in done.values())
    rate = (kept + 1) / (generated + 2) if generated else 1.0  # Laplace: never 0, never overshoots wildly
    need = count - kept
    add = math.ceil(need / (k_size * rate)) - pending if need > 0 else 0
    if pending == 0:
        add = max(add, 1)
    return Plan(add=max(0, min(add, total - next_shard)))


@dataclass(frozen=True)
class Summary:
    """Running totals of a job's finished shards: how many (``done``), the pairs they generated and
    kept, and the longest run of finished shards from shard 0 (``prefix`` shards, ``prefix_kept`` kept
    pairs between them)."""

    done: int = 0
    generated: int = 0
    kept: int = 0
    prefix: int = 0
    prefix_kept: int = 0


def summarize(done: dict[int, dict[str, Any]]) -> Summary:
    prefix = prefix_kept = 0
    while prefix in done:
        prefix_kept += len(done[prefix]["kept"])
        prefix += 1
    return Summary(
        done=len(done),
        generated=sum(d["generated"] for d in done.values()),
        kept=sum(len(d["kept"]) for d in done.values()),
        prefix=prefix,
        prefix_kept=prefix_kept,
    )


def plan_from_summary(params: dict[str, Any], summary: Summary, next_shard: int) -> Plan | None:
    """``plan`` of a job whose finished shards sum up to ``summary`` (every finished shard is below
    ``next_shard``), while it is undecided; None once it is decided (``plan`` then says which pairs)."""
    count, k_size, max_attempts = params["count"], params["shard_size"], params["max_attempts"]
    total = shard_count(max_attempts, k_size)
    if summary.prefix_kept >= count or summary.prefix >= total:
        return None
    pending = next_shard - summary.done
    generated, kept = summary.generated, summary.kept
    rate = (kept + 1) / (generated + 2) if generated else 1.0  # as in ``plan``
    need = count - kept
    add = math.ceil(need / (k_size * rate)) - pending if need > 0 else 0
    if pending == 0:
        add = max(add, 1)
    return Plan(add=max(0, min(add, total - next_shard)))
