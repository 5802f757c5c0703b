"""The page's pure logic (app/static/app.js), run in Node when it is installed (the browser tests,
tests/integration/test_page_browser.py, drive the whole page where Chromium is)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

APP_JS = (Path(__file__).resolve().parents[2] / "app" / "static" / "app.js").read_text()
NODE = shutil.which("node") or shutil.which("nodejs")


def call(function: str, *args: Any) -> Any:
    """``function(*args)`` of app.js, its source cut out of the file and run alone in Node."""
    if NODE is None:
        pytest.skip("no node on PATH: the page's logic is tested in the browser tests only")
    match = re.search(rf"^function {function}\(.*?^\}}$", APP_JS, flags=re.M | re.S)
    assert match is not None, f"no function {function} in app.js"
    script = f"{match.group(0)}\nprocess.stdout.write(JSON.stringify({function}(...{json.dumps(args)})));"
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def job(status: str, kept: int, target: int = 16) -> dict[str, Any]:
    return {"status": status, "progress": {"kept": kept, "target": target, "generated": kept}}


@pytest.mark.parametrize(
    ("status", "kept", "state"),
    [
        ("queued", 0, {"max": 16, "value": 0}),
        ("running", 0, {"max": 16, "value": None}),  # the first batch: busy, not stuck at 0
        ("running", 5, {"max": 16, "value": 5}),
        ("running", 20, {"max": 16, "value": 16}),  # later shards may keep more than asked
        ("succeeded", 16, {"max": 16, "value": 16}),
        ("canceled", 0, {"max": 16, "value": 0}),
    ],
)
def test_the_progress_bar_is_indeterminate_until_a_pair_is_kept(
    status: str, kept: int, state: dict[str, Any]
) -> None:
    assert call("barState", job(status, kept)) == state
