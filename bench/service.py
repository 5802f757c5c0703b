"""Service benchmarks: the cost of the service around the sampler, scaling with workers, zip memory,
and status-poll latency. Everything runs on real servers (redis-server, Celery workers, uvicorn).

    .venv/bin/python bench/service.py --pairs 32 --zip-pairs 10000

Figures printed:
  * end-to-end job throughput / direct ``generate_pairs`` throughput for the same pairs (1 worker);
  * 2 workers / 1 worker on one job (each worker and the direct run use --threads torch threads);
  * API RSS growth while streaming a zip of --zip-pairs pairs;
  * GET /v1/jobs/{id} latency p50/p99 while the workers are busy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.integration.servers import CeleryWorker, RedisServer, free_port, kill, spawn, wait_for, worker_env  # noqa: E402

ADMIN_KEY = secrets.token_urlsafe(24)  # the API requires a key; the benchmarks call it as the admin
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def direct_seconds(bundle: Path, n: int, args: argparse.Namespace) -> float:
    """Best of ``--repeat`` runs of ``generate_pairs`` in this process, same pairs, threads and batch."""
    import torch

    from models.bundle import Bundle
    from models.expand import generate_pairs

    torch.set_num_threads(args.threads)
    b = Bundle.load(bundle)
    params = b.default_params().updated(steps=args.steps)
    list(
        generate_pairs(b, range(args.batch_size), seed=1, params=params, eta=1.0, batch_size=args.batch_size)
    )
    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        for _pair in generate_pairs(
            b, range(n), seed=args.seed, params=params, eta=1.0, batch_size=args.batch_size
        ):
            pass
        best = min(best, time.perf_counter() - t)
    return best


class Service:
    def __init__(self, work: Path, bundle: Path, args: argparse.Namespace, workers: int, tag: str) -> None:
        self.redis = RedisServer(work)
        self.env = {
            "DIFFEXP_REDIS_URL": f"{self.redis.url}/0",
            "DIFFEXP_STORAGE_DIR": str(work / "storage"),
            "DIFFEXP_BUNDLES_DIR": str(bundle.parent),
            "DIFFEXP_DEFAULT_MODEL": bundle.name,
            "DIFFEXP_SHARD_SIZE": str(args.shard_size),
            "DIFFEXP_BATCH_SIZE": str(args.batch_size),
            "DIFFEXP_MAX_COUNT": str(max(args.zip_pairs, args.pairs)),
            "DIFFEXP_ADMIN_KEY": ADMIN_KEY,
        }
        env = worker_env(self.env)
        env["OMP_NUM_THREADS"] = str(args.threads)
        self.workers = [
            CeleryWorker(work, self.env | {"OMP_NUM_THREADS": str(args.threads)}, f"{tag}{i}")
            for i in range(workers)
        ]
        port = free_port()
        self.api = spawn(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"],
            log=work / "api.log",
            env=env,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=ADMIN_HEADERS)
        wait_for(lambda: self.client.get("/healthz").status_code == 200, 60, "api", self.api)
        for w in self.workers:
            w.wait_ready(120)

    def run(
        self, body: dict[str, Any], poll_latencies: list[float] | None = None, poll_s: float = 0.1
    ) -> float:
        t = time.perf_counter()
        loc = self.client.post("/v1/jobs", json=body).headers["location"]
        while True:
            q = time.perf_counter()
            job = self.client.get(loc).json()
            if poll_latencies is not None and job["status"] == "running":
                poll_latencies.append(time.perf_counter() - q)
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(poll_s)
        elapsed = time.perf_counter() - t
        assert job["status"] == "succeeded", job
        return elapsed

    def close(self) -> None:
        self.client.close()
        kill(self.api)
        for w in self.workers:
            w.stop()
        self.redis.stop()


def warm(svc: Service, args: argparse.Namespace) -> None:
    # one shard per worker loads the bundle in every worker process
    svc.run({"count": args.shard_size * len(svc.workers), "steps": 1, "eta": 1.0, "seed": 0})


def zip_memory(work: Path, bundle: Path, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """Store a finished job of ``zip_pairs`` pairs, then stream its zip from uvicorn and watch its RSS."""
    from app.layout import image_key, manifest_csv, manifest_key, mask_key, record_key
    from app.storage import LocalStorage

    storage = LocalStorage(work / "zipstore")
    rng_png = _sample_pngs(bundle)
    job_id = "bench" + "0" * 27
    params = {"model": bundle.name, "eta": 1.0, "sampling": {"steps": 1}}
    rows = []
    for i in range(args.zip_pairs):
        name = f"s1-{i:06d}"
        storage.put(image_key(job_id, name), rng_png[0])
        storage.put(mask_key(job_id, name), rng_png[1])
        rows.append({"name": name, "index": i, "seed": 1, "dice_loss": 0.01})
    storage.put(manifest_key(job_id), manifest_csv(rows, params))
    rec = {"id": job_id, "status": "succeeded", "input": {"count": args.zip_pairs}, "error": None,
           "params": {**params, "count": args.zip_pairs, "seed": 1, "max_attempts": args.zip_pairs,
                      "batch_size": 1, "shard_size": 1},
           "progress": {"target": args.zip_pairs, "generated": args.zip_pairs, "kept": args.zip_pairs, "discarded": 0},
           "created_at": "2026-01-01T00:00:00Z", "started_at": None, "completed_at": None}  # fmt: skip
    storage.put(record_key(job_id), json.dumps(rec).encode())
    redis = RedisServer(work)
    env = worker_env(
        {
            "DIFFEXP_REDIS_URL": f"{redis.url}/0",
            "DIFFEXP_STORAGE_DIR": str(storage.root),
            "DIFFEXP_ADMIN_KEY": ADMIN_KEY,
        }
    )
    port = free_port()
    api = spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"],
                log=work / "zipapi.log", env=env)  # fmt: skip
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=ADMIN_HEADERS)
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, "api", api)
        client.get(f"/v1/jobs/{job_id}")
        before = rss_mb(api.pid)
        peak = before
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_mb(api.pid))
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()
        t = time.perf_counter()
        size = 0
        first = None
        with client.stream("GET", f"/v1/jobs/{job_id}/pairs.zip") as resp:
            for chunk in resp.iter_bytes():
                if first is None:
                    first = time.perf_counter() - t
                size += len(chunk)
        total = time.perf_counter() - t
        stop.set()
        client.close()
        return before, peak - before, size / 1e6, total
    finally:
        kill(api)
        redis.stop()


def _sample_pngs(bundle: Path) -> tuple[bytes, bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    meta = json.loads((bundle / "bundle.json").read_text())
    r = int(meta["resolution"])
    out = []
    for arr in (
        rng.integers(0, 255, (r, r), dtype=np.uint8),
        (rng.random((r, r)) > 0.5).astype(np.uint8) * 255,
    ):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bundle", type=Path, help="bundle folder (default: train a tiny 16x16 one in a temp dir)"
    )
    p.add_argument("--pairs", type=int, default=32, help="pairs per throughput job (all kept: eta 1)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of each worker and of the direct run"
    )
    p.add_argument("--zip-pairs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--repeat", type=int, default=2, help="runs per figure; the best one counts (loaded machines)"
    )
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from tests.utils.tiny import make_tiny_bundle

            bundle = make_tiny_bundle(work / "tiny")
        bundle = bundle.resolve()
        body = {"count": args.pairs, "steps": args.steps, "eta": 1.0, "seed": args.seed}

        direct = direct_seconds(bundle, args.pairs, args)
        times: dict[int, float] = {}
        latencies: list[float] = []
        for n in (1, 2):
            svc = Service(work / f"w{n}", bundle, args, n, f"b{n}-")
            try:
                warm(svc, args)
                times[n] = min(svc.run(body) for _ in range(args.repeat))
                if n == 2:  # status polls (every 20 ms) while both workers sample
                    svc.run(body, latencies, poll_s=0.02)
            finally:
                svc.close()
        before, growth, mb, zip_s = zip_memory(work, bundle, args)

    cores = os.cpu_count()
    print(f"bundle {bundle.name}: {args.pairs} pairs, steps {args.steps}, batch {args.batch_size}, "
          f"shard {args.shard_size}, {args.threads} torch thread(s) per process, {cores} cores")  # fmt: skip
    print(f"direct generate_pairs : {direct:7.2f} s  ({args.pairs / direct:6.2f} pairs/s)")
    print(f"service, 1 worker     : {times[1]:7.2f} s  ({args.pairs / times[1]:6.2f} pairs/s)")
    print(f"service, 2 workers    : {times[2]:7.2f} s  ({args.pairs / times[2]:6.2f} pairs/s)")
    print(f"end-to-end / direct (1 worker)      : {direct / times[1]:.3f}   (goal >= 0.97)")
    print(
        f"2 workers / 1 worker                : {times[1] / times[2]:.3f}   (goal >= 1.9 where cores allow)"
    )
    print(f"zip of {args.zip_pairs} pairs ({mb:.1f} MB) in {zip_s:.1f} s: API RSS {before:.0f} MB, "
          f"growth {growth:.1f} MB   (goal < 50 MB)")  # fmt: skip
    if latencies:
        q = statistics.quantiles(latencies, n=100)
        print(f"status poll while 2 workers busy    : p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms "
              f"({len(latencies)} polls)")  # fmt: skip


if __name__ == "__main__":
    main()
