"""Fault-injection benchmark (issue 9): jobs through a worker kill, a Redis restart and a storage outage.

    PYTHONPATH=. .venv/bin/python bench/faults.py --trials 20

One harness for every trial, all real servers (``tests/integration/servers.py``): a persistent
redis-server (append-only file, fsync always), SeaweedFS (S3, auth on), 2 Celery worker processes
(solo pool, one torch thread each) and the API under uvicorn, on a tiny 16x16 bundle trained at start
(or ``--bundle``). Settings (environment of every process):

  * DIFFEXP_LEASE_TTL_S=3: a killed worker's shard lease expires after 3 s (the service default is 30 s;
    a short TTL keeps the benchmark short; recovery from a kill scales with it);
  * DIFFEXP_RECONCILE_INTERVAL_S=1, DIFFEXP_RECONCILE_GRACE_S=3: the reconciler sweeps every second;
  * DIFFEXP_VISIBILITY_TIMEOUT_S=600: recovery must come from the reconciler, not Celery's redelivery;
  * DIFFEXP_OUTAGE_LIMIT_S=120: a worker retries through an outage in place for up to 120 s;
  * DIFFEXP_SHARD_SIZE=2, DIFFEXP_BATCH_SIZE=2; with API keys (DIFFEXP_ADMIN_KEY) a random admin key.

Each trial POSTs a job (``--count`` pairs, ``--steps``, eta 1.0 so every pair is kept and the exact
result is indices 0..count-1, its own seed), waits until it is running with a kept pair, injects the
fault, and waits up to ``--bound-s`` for a terminal state:

  * worker-kill: SIGKILL a worker holding one of the job's shard leases (``P:job:ID:lease:K`` holds
    "PID:token"; of the unfinished shards, the one least generated); a replacement worker is started
    at once (as a supervisor would), so 2 serve the next trial;
  * redis-restart: SIGKILL redis-server, 2 s later start it again on the same port (AOF keeps the data);
  * storage-outage: SIGKILL SeaweedFS, ``--outage-s`` later start it again (same ports and data).

Outcomes: correct (succeeded; the zip's manifest holds exactly indices 0..count-1, each pair once,
every PNG readable, every pair stored before the fault still there with the same bytes); duplicates
(a zip member twice, or more rows than count); lost (succeeded, but pairs missing, unreadable, or a
pair stored before the fault missing or changed); stuck (not terminal after ``--bound-s``; its Redis
keys and the worker logs go to the JSON); failed (failed or canceled; the reason is printed); missed
(the job ended before the fault could be injected: not counted).

Times: "resume" runs from the fault (worker-kill) or from the moment the restarted server answers
again (redis-restart, storage-outage) until the work resumes: for worker-kill until the killed shard
runs again (its attempts count reaches 2; the other worker's progress says nothing about recovery;
not counted when the victim had finished its shard just before the kill), otherwise until the job's ``progress.generated`` grows past its value at the fault (or the job ends).
"terminal" runs from the same origin until the job is terminal; "job" from the POST to terminal.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the repository root on sys.path, as pytest has it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import redis  # noqa: E402

from tests.integration.conftest import stack_env  # noqa: E402
from tests.integration.servers import (  # noqa: E402
    CeleryWorker,
    RedisServer,
    SeaweedS3,
    free_port,
    kill,
    spawn,
    wait_for,
    worker_env,
)

FAULTS = ("worker-kill", "redis-restart", "storage-outage")
OUTCOMES = ("correct", "duplicates", "lost", "stuck", "failed", "missed")
TERMINAL = ("succeeded", "failed", "canceled")
PREFIX, QUEUE = "fb", "q-faults"
REDIS_GAP_S = 2.0
POLL_S = 0.2
STALE_LOCK_S = 5.0  # the per-job lock held this long by one holder is reported (it is held for ms)
SETTINGS = {
    "DIFFEXP_LEASE_TTL_S": "3",
    "DIFFEXP_RECONCILE_INTERVAL_S": "1",
    "DIFFEXP_RECONCILE_GRACE_S": "3",
    "DIFFEXP_VISIBILITY_TIMEOUT_S": "600",
    "DIFFEXP_OUTAGE_LIMIT_S": "120",
    "DIFFEXP_SHARD_SIZE": "2",
    "DIFFEXP_BATCH_SIZE": "2",
}


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {ram} RAM, no GPU used; load average at start {load}"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def png_ok(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Harness:
    """The servers of every trial; ``workers`` always holds the 2 serving workers."""

    def __init__(self, work: Path, bundle: Path) -> None:
        self.work = work
        (work / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(work / "redis", persistent=True)
        self.s3 = SeaweedS3(work / "seaweed", bucket="diffexp-faults")
        self.admin_key = secrets.token_urlsafe(24)
        self.env = stack_env(
            f"{self.redis.url}/0", self.s3, bundle, PREFIX,
            DIFFEXP_CELERY_QUEUE=QUEUE, DIFFEXP_ADMIN_KEY=self.admin_key, **SETTINGS,
        )  # fmt: skip
        self.n_workers = 0
        self.workers = [self.new_worker() for _ in range(2)]
        port = free_port()
        self.api_log = work / "api.log"
        self.api = spawn(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"],
            log=self.api_log, env=worker_env(self.env),
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        self.client = httpx.Client(base_url=self.url, timeout=10, headers=headers)
        self.r = redis.Redis(
            port=self.redis.port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True
        )
        wait_for(
            lambda: self.client.get("/healthz").status_code == 200, 90, "uvicorn", self.api, self.api_log
        )
        for w in self.workers:
            w.wait_ready(180)
        wait_for(lambda: self.client.get("/readyz").status_code == 200, 60, "readyz", self.api, self.api_log)
        # API keys (another branch) answer 401 without a key; the bearer header is sent either way.
        self.auth = httpx.get(f"{self.url}/v1/jobs", timeout=10).status_code == 401

    def new_worker(self) -> CeleryWorker:
        self.n_workers += 1
        return CeleryWorker(self.work, self.env, f"w{self.n_workers}")

    def worker_by_pid(self, pid: int) -> CeleryWorker | None:
        return next((w for w in self.workers if w.proc.pid == pid), None)

    def key(self, job_id: str, *parts: str) -> str:
        return ":".join((PREFIX, "job", job_id, *parts))

    def quiesce(self, timeout: float = 120) -> None:
        """Wait until both workers are up, the queue is empty and no job is active."""
        for w in self.workers:
            w.wait_ready(timeout)

        def idle() -> bool:
            return self.r.llen(QUEUE) == 0 and self.r.scard(f"{PREFIX}:active") == 0

        wait_for(idle, timeout, "idle harness (queue empty, no active job)")

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as the API shows it; while a server is down, ``{"status": "<error>"}``."""
        try:
            resp = self.client.get(f"/v1/jobs/{job_id}")
            body: dict[str, Any] = resp.json()
            return body if resp.status_code == 200 else {"status": f"http {resp.status_code}"}
        except Exception as exc:
            return {"status": f"error {type(exc).__name__}"}

    def leases(self, job_id: str) -> dict[int, str]:
        out = {}
        for key in self.r.scan_iter(self.key(job_id, "lease", "*")):
            value = self.r.get(key)
            if value:
                out[int(key.rsplit(":", 1)[1])] = str(value)
        return out

    def redis_state(self, job_id: str) -> dict[str, Any]:
        """Every Redis key of the job with its value and TTL, plus the queue and the workers seen."""
        out: dict[str, Any] = {}
        try:
            for key in sorted(self.r.scan_iter(self.key(job_id) + "*")):
                kind = self.r.type(key)
                if kind == "hash":
                    value: Any = self.r.hgetall(key)
                elif kind == "string":
                    value = self.r.get(key)
                else:
                    value = kind
                out[key] = {"value": value, "pttl_ms": self.r.pttl(key)}
            out["queue_len"] = self.r.llen(QUEUE)
            out["unacked"] = self.r.hlen("unacked")
            out["active"] = sorted(self.r.smembers(f"{PREFIX}:active"))
            out["workers"] = sorted(self.r.scan_iter(f"{PREFIX}:worker:*"))
        except redis.RedisError as exc:
            out["error"] = repr(exc)
        return out

    def close(self) -> None:
        """Stop everything at once (SIGKILL): nothing here is kept."""
        self.client.close()
        kill(self.api, sig=signal.SIGKILL)
        for w in self.workers:
            w.stop(sig=signal.SIGKILL)
        self.s3.stop(sig=signal.SIGKILL)
        self.redis.stop(sig=signal.SIGKILL)


@dataclass
class Fault:
    origin: float  # when the recovery clock starts: the kill, or when the restarted server answers
    injected: float
    victim_shard: int | None = None
    victim_pid: int | None = None
    victim_shard_done: bool | None = None  # the killed worker had finished its shard already


def inject(h: Harness, fault: str, job_id: str, outage_s: float) -> Fault | None:
    """Inject ``fault``; None when no worker of ours holds a lease of the job any more (worker-kill)."""
    if fault == "worker-kill":
        # The victim: a worker of ours mid-shard, the one with the least of its shard generated.
        pids = {w.proc.pid: w for w in h.workers}
        done = set(h.r.hkeys(h.key(job_id, "done")))
        prog = h.r.hgetall(h.key(job_id, "prog"))
        candidates = []
        for shard, holder in h.leases(job_id).items():
            worker = pids.get(int(holder.split(":", 1)[0]))
            if worker is not None and str(shard) not in done:
                candidates.append((int(str(prog.get(str(shard), "0,0")).split(",")[0]), shard, worker))
        if not candidates:
            return None
        _, shard, victim = min(candidates, key=lambda c: c[:2])
        victim.stop(sig=signal.SIGKILL)
        t = time.monotonic()
        h.workers.remove(victim)
        h.workers.append(h.new_worker())  # the supervisor's replacement
        finished = bool(h.r.hexists(h.key(job_id, "done"), str(shard)))  # between the check and the kill
        return Fault(t, t, victim_shard=shard, victim_pid=victim.proc.pid, victim_shard_done=finished)
    if fault == "redis-restart":
        h.redis.stop(sig=signal.SIGKILL)
        t = time.monotonic()
        time.sleep(REDIS_GAP_S)
        h.redis.start()
        return Fault(origin=time.monotonic(), injected=t)
    if fault == "storage-outage":
        h.s3.stop(sig=signal.SIGKILL)
        t = time.monotonic()
        time.sleep(outage_s)
        h.s3.start()
        return Fault(origin=time.monotonic(), injected=t)
    raise ValueError(fault)


def progress_generated(h: Harness, job_id: str) -> int:
    return sum(int(str(v).split(",")[0]) for v in h.r.hvals(h.key(job_id, "prog")))


def check_zip(content: bytes, count: int, before: dict[int, dict[str, str]]) -> dict[str, Any]:
    """What is wrong with a succeeded job's zip (empty lists: nothing)."""
    zf = zipfile.ZipFile(io.BytesIO(content))
    names = zf.namelist()
    rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    indices = [int(r["index"]) for r in rows]
    dup_members = sorted({n for n in names if names.count(n) > 1})
    dup_rows = sorted({i for i in indices if indices.count(i) > 1})
    duplicates = dup_members + [f"index {i} twice" for i in dup_rows]
    if len(rows) > count:
        duplicates.append(f"{len(rows)} rows for count {count}")
    lost = [f"index {i} missing" for i in sorted(set(range(count)) - set(indices))]
    lost += [f"index {i} not expected" for i in sorted(set(indices) - set(range(count)))]
    members = set(names)
    by_index = {int(r["index"]): r["name"] for r in rows}
    for r in rows:
        for part in ("images", "masks"):
            member = f"{part}/{r['name']}.png"
            if member not in members:
                lost.append(f"{member} missing")
            elif not png_ok(zf.read(member)):
                lost.append(f"{member} unreadable")
    for index, pre in sorted(before.items()):  # pairs stored before the fault
        if index >= count:
            continue
        if by_index.get(index) != pre["name"]:
            lost.append(f"pair {pre['name']} (stored before the fault) missing")
            continue
        for part in ("images", "masks"):
            member = f"{part}/{pre['name']}.png"
            if member in members and sha(zf.read(member)) != pre[part]:
                lost.append(f"{member} (stored before the fault) changed")
    return {"rows": len(rows), "members": len(names), "duplicates": duplicates, "lost": lost}


def run_trial(h: Harness, fault: str, trial: int, args: argparse.Namespace) -> dict[str, Any]:
    seed = args.seed + 1000 * FAULTS.index(fault) + trial
    rec: dict[str, Any] = {"fault": fault, "trial": trial, "seed": seed}
    h.quiesce()
    body = {"count": args.count, "steps": args.steps, "eta": 1.0, "seed": seed}
    t_post = time.monotonic()
    resp = h.client.post("/v1/jobs", json=body)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    rec["job_id"] = job_id

    def ready(job: dict[str, Any]) -> bool:
        if job.get("status") != "running" or job["progress"]["kept"] < 1:
            return False
        if fault != "worker-kill":
            return True
        pids = {str(w.proc.pid) for w in h.workers}
        return any(v.split(":", 1)[0] in pids for v in h.leases(job_id).values())

    deadline = time.monotonic() + 120
    job = h.job(job_id)
    while not ready(job):
        if job.get("status") in TERMINAL or time.monotonic() > deadline:
            rec.update(outcome="missed", status=job.get("status"), job_s=time.monotonic() - t_post)
            return rec
        time.sleep(0.05)
        job = h.job(job_id)
    # What was stored before the fault: pair names and the sha256 of their objects.
    before: dict[int, dict[str, str]] = {}
    for raw in h.r.hvals(h.key(job_id, "pairs")):
        meta = json.loads(raw)
        objs = {
            part: sha(h.s3.client.get_object(Bucket=h.s3.bucket, Key=f"jobs/{job_id}/{part}/{meta['name']}.png")["Body"].read())
            for part in ("images", "masks")
        }  # fmt: skip
        before[int(meta["index"])] = {"name": meta["name"], **objs}
    gen0 = progress_generated(h, job_id)
    rec.update(kept_before=len(before), generated_before=gen0, fault_after_s=time.monotonic() - t_post)

    f = inject(h, fault, job_id, args.outage_s)
    if f is None:
        rec.update(outcome="missed", status=h.job(job_id).get("status"), job_s=None)
        return rec
    rec.update(
        victim_shard=f.victim_shard,
        victim_pid=f.victim_pid,
        victim_shard_done=f.victim_shard_done,
        downtime_s=f.origin - f.injected,
    )
    resume = grow = terminal = None
    lock: tuple[str, float] | None = None  # (token, first seen) of the job's lock, to find a stale one
    rec["lock_held_max_s"] = 0.0
    deadline = f.origin + args.bound_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        job = h.job(job_id)
        try:
            if grow is None and progress_generated(h, job_id) > gen0:
                grow = now - f.origin
            if resume is None and f.victim_shard is not None:
                attempts = int(h.r.hget(h.key(job_id, "attempts"), str(f.victim_shard)) or 0)
                if attempts >= 2 or h.r.hexists(h.key(job_id, "done"), str(f.victim_shard)):
                    resume = now - f.origin
            lock_value = h.r.get(h.key(job_id, "lock"))
            token = None if lock_value is None else str(lock_value)
            lock = None if token is None else lock if lock and lock[0] == token else (token, now)
            if lock is not None:
                held = now - lock[1]
                rec["lock_held_max_s"] = max(rec["lock_held_max_s"], held)
                if held >= STALE_LOCK_S and "stale_lock" not in rec:  # one holder this long: a dead one
                    rec["stale_lock"] = {
                        "seen_at_s": now - f.origin,
                        "held_s": held,
                        "pttl_ms": h.r.pttl(h.key(job_id, "lock")),
                        "redis": h.redis_state(job_id),
                    }
        except redis.RedisError:
            pass
        if job.get("status") in TERMINAL:
            terminal = now - f.origin
            break
        time.sleep(POLL_S)
    if grow is None and terminal is not None:
        grow = terminal
    if f.victim_shard is None:
        resume = grow
    elif f.victim_shard_done:
        resume = None  # the victim had finished its shard: nothing to redo, no resume time to count
    elif resume is None and terminal is not None:
        resume = terminal
    rec.update(resume_s=resume, generated_grows_s=grow, terminal_s=terminal, status=job.get("status"))
    rec["job_s"] = time.monotonic() - t_post if terminal is not None else None
    try:
        rec["attempts"] = {k: int(v) for k, v in h.r.hgetall(h.key(job_id, "attempts")).items()}
    except redis.RedisError:
        pass

    if terminal is None:
        rec.update(outcome="stuck", job=job, redis=h.redis_state(job_id))
        rec["logs"] = {w.name: tail(w.log) for w in h.workers} | {"api": tail(h.api_log)}
        try:  # free the workers for the next trial
            h.client.post(f"/v1/jobs/{job_id}/cancel")
        except httpx.HTTPError:
            pass
        return rec
    if job["status"] != "succeeded":
        rec.update(outcome="failed", error=job.get("error") or f"({job['status']}, no reason given)")
        return rec
    resp = h.client.get(f"/v1/jobs/{job_id}/pairs.zip")
    resp.raise_for_status()
    check = check_zip(resp.content, args.count, before)
    rec["check"] = check
    rec["outcome"] = "duplicates" if check["duplicates"] else "lost" if check["lost"] else "correct"
    if rec["outcome"] == "lost":
        rec["redis"] = h.redis_state(job_id)
    return rec


def fmt_times(values: list[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return f"{'-':>13}"
    return f"{statistics.median(xs):5.1f} / {max(xs):5.1f}"


def report(records: list[dict[str, Any]], faults: list[str]) -> list[str]:
    lines = [
        f"{'fault':<15} {'trials':>6} {'correct':>7} {'dup':>4} {'lost':>4} {'stuck':>5} {'failed':>6} "
        f"{'missed':>6}   {'resume p50/max s':>16}  {'terminal p50/max s':>18}  {'job p50 s':>9}"
    ]
    notes = []
    for fault in faults:
        rs = [r for r in records if r["fault"] == fault]
        n = {o: sum(r["outcome"] == o for r in rs) for o in OUTCOMES}
        counted = [r for r in rs if r["outcome"] != "missed"]
        jobs = [r["job_s"] for r in counted if r.get("job_s") is not None]
        job_p50 = f"{statistics.median(jobs):9.1f}" if jobs else f"{'-':>9}"
        lines.append(
            f"{fault:<15} {len(counted):>6} {n['correct']:>7} {n['duplicates']:>4} {n['lost']:>4} "
            f"{n['stuck']:>5} {n['failed']:>6} {n['missed']:>6}   "
            f"{fmt_times([r.get('resume_s') for r in counted]):>16}  "
            f"{fmt_times([r.get('terminal_s') for r in counted]):>18}  {job_p50}"
        )
        for r in rs:
            if r["outcome"] == "failed":
                notes.append(f"  {fault} trial {r['trial']}: failed: {r['error']}")
            elif r["outcome"] in ("duplicates", "lost"):
                what = r["check"]["duplicates"] or r["check"]["lost"]
                notes.append(f"  {fault} trial {r['trial']}: {r['outcome']}: {'; '.join(what[:5])}")
            elif r["outcome"] == "stuck":
                notes.append(f"  {fault} trial {r['trial']}: stuck as {r['status']!r} (job {r['job_id']})")
            if r.get("victim_shard_done"):
                notes.append(f"  {fault} trial {r['trial']}: the killed worker had just finished its shard "
                             "(no resume time counted)")  # fmt: skip
            if r.get("lock_held_max_s", 0) >= STALE_LOCK_S:
                notes.append(
                    f"  {fault} trial {r['trial']}: the job's lock was held {r['lock_held_max_s']:.0f} s by one "
                    f"holder (stale: its holder died or lost Redis); terminal after {r['terminal_s'] or 0:.0f} s"
                )
    return lines + notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="trials per fault")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, of: " + ", ".join(FAULTS))
    p.add_argument("--outage-s", type=float, default=20.0, help="how long SeaweedFS stays down")
    p.add_argument("--bound-s", type=float, default=180.0, help="a job not terminal this long after "
                   "the fault (or the restart) is stuck")  # fmt: skip
    p.add_argument("--count", type=int, default=6, help="pairs per job")
    p.add_argument("--steps", type=int, default=20, help="solver steps per phase")
    p.add_argument("--seed", type=int, default=1, help="trial t of fault f uses seed SEED + 1000 f + t")
    p.add_argument("--bundle", type=Path, help="bundle folder (default: train a tiny 16x16 one)")
    p.add_argument("--json", type=Path, help="write the raw per-trial records here")
    p.add_argument("--workdir", type=Path, help="keep the servers' data and logs here (default: a temp dir)")
    args = p.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        p.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")

    # SIGTERM unwinds like Ctrl-C: the servers are stopped and the records so far written (--json).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    where = machine()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from tests.utils.tiny import make_tiny_bundle

            bundle = make_tiny_bundle(work / "tiny")
            say(f"tiny bundle trained ({time.monotonic() - started:.0f} s)")
        h = Harness(work, bundle.resolve())
        say(f"servers up ({time.monotonic() - started:.0f} s)")
        records: list[dict[str, Any]] = []
        aborted = None
        try:
            for fault, trial in ((f, t) for f in faults for t in range(args.trials)):
                try:
                    rec = run_trial(h, fault, trial, args)
                except Exception as exc:  # the harness itself broke: report what ran, say why
                    aborted = f"{fault} trial {trial}: {exc!r}"
                    say(f"ABORTED at {aborted}")
                    break
                records.append(rec)
                times = ", ".join(f"{k} {rec[k]:.1f} s" for k in ("resume_s", "terminal_s")
                                  if rec.get(k) is not None)  # fmt: skip
                say(f"{fault} trial {trial}: {rec['outcome']}  {times}")
        except BaseException:
            say(f"interrupted after {len(records)} trials; stopping the servers")
            raise
        finally:
            auth = h.auth
            h.close()
            if args.json:
                out = {"machine": where, "settings": SETTINGS, "args": {k: str(v) for k, v in vars(args).items()},
                       "auth": h.auth, "aborted": aborted, "records": records}  # fmt: skip
                args.json.write_text(json.dumps(out, indent=1, default=str))

    print(f"machine: {where}")
    label = "tiny 16x16 (trained at start)" if args.bundle is None else str(bundle)
    print(f"bundle {label}: count {args.count}, steps {args.steps}, eta 1.0; 2 Celery workers (solo, "
          f"1 torch thread), redis-server (AOF, fsync always), SeaweedFS S3, uvicorn; API keys "
          f"{'on (admin bearer key)' if auth else 'not required by this API'}")  # fmt: skip
    print("settings: " + ", ".join(f"{k.removeprefix('DIFFEXP_')}={v}" for k, v in SETTINGS.items()))
    print(f"faults: worker SIGKILL + replacement started at once; redis-server SIGKILL, restarted after "
          f"{REDIS_GAP_S:g} s; SeaweedFS SIGKILL, restarted after {args.outage_s:g} s; bound {args.bound_s:g} s")  # fmt: skip
    print("resume: from the kill / the restarted server answering, until the killed shard runs again "
          "(worker-kill) or progress.generated grows; terminal: same origin, until terminal")  # fmt: skip
    print()
    for line in report(records, faults):
        print(line)
    print(f"\n{len(records)} trials in {time.monotonic() - started:.0f} s")
    if aborted:
        print(f"ABORTED at {aborted}")
        sys.exit(1)


if __name__ == "__main__":
    main()
