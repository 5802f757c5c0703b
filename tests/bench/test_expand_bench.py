"""bench/expand.py --compare-reference runs end to end and ends with the line docs/speed.md quotes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # the benchmark scripts, run end to end in a subprocess


def test_compare_reference_prints_the_ratio_line(tiny_bundle: Path) -> None:
    cmd = [sys.executable, "bench/expand.py", "--compare-reference", "--bundle", str(tiny_bundle), "--pairs", "2",
           "--batch-size", "2", "--eta", "1.0", "--no-compile", "--threads", "1"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(
        r"kept/s ratio \d+\.\d\d, false rejections \d+\.\d %, yield \d+\.\d % vs \d+\.\d %", lines[-1]
    )
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("reference", "default")}
    assert rows["reference"][2] == rows["default"][2] == "2"  # 2 kept pairs each, as requested
