"""The client and the remote CLI import neither torch nor the service (a fresh interpreter checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import diffuseexpand
from diffuseexpand import AsyncClient, Client
import models.cli_remote
heavy = sorted(m for m in ("torch", "fastapi", "pydantic", "numpy", "app", "models.cli") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""


def test_importing_the_client_and_remote_cli_leaves_torch_out() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
