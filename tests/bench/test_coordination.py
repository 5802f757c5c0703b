"""bench/coordination.py runs end to end (real API, Redis, storage, a Celery worker with the stand-in
sampler) and ends with its summary line (figures: docs/coordination.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts redis-server, uvicorn and a Celery worker

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^shards/s (\d+(?:\.\d+)?), jobs/s (\d+(?:\.\d+)?)$")


def test_coordination_benchmark_reports_shards_and_jobs_per_second() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFEXP_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "coordination.py"), "--seconds", "3", "--workers", "1",
           "--jobs", "20", "--count", "8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    found = LAST_LINE.match(lines[-1])
    assert found, lines[-5:]
    assert float(found.group(1)) > 0
    assert "Redis commands per shard" in proc.stdout and "shard task runs by outcome: done" in proc.stdout
