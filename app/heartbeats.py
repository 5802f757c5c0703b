"""Worker heartbeats: what a worker writes to Redis, and which of them count as live.

A worker writes ``{"queues": [...], "redis": RUN_ID}`` every few seconds with a TTL, where RUN_ID
is the ``run_id`` of the Redis process it wrote to. Redis keeps its append-only file across a restart
(``make serve``), and a key's TTL with it: the heartbeat of a worker that died just before the restart
comes back and would count for up to its TTL while no worker is up yet. Such a heartbeat names an
earlier Redis process, so it is ignored; a live worker rewrites its own within one beat.
A heartbeat without ``redis`` (an older worker, a test's ``"1"``) counts until its TTL ends."""

from __future__ import annotations

import json
from typing import Any

import redis


def redis_run_id(r: redis.Redis) -> str:
    """The id of the Redis process: new at each start, unlike the data it reloads."""
    return str(r.info("server")["run_id"])


def beat(queues: list[str], r: redis.Redis) -> str:
    return json.dumps({"queues": queues, "redis": redis_run_id(r)})


def live_beats(r: redis.Redis, pattern: str) -> list[Any]:
    """The parsed value of every live heartbeat under ``pattern`` (a non-JSON one as ``None``)."""
    keys = list(r.scan_iter(match=pattern, count=1000))
    if not keys:
        return []
    run_id = redis_run_id(r)
    raws: list[Any] = []
    for i in range(0, len(keys), 1000):
        raws.extend(r.mget(keys[i : i + 1000]))
    out: list[Any] = []
    for raw in raws:
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if isinstance(value, dict) and "redis" in value and value["redis"] != run_id:
            continue  # written to an earlier Redis process: restored from its file, not alive
        out.append(value)
    return out
