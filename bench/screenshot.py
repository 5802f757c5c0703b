"""docs/page.png: the web page with a finished job and its preview grid, on the demo bundle.

    .venv/bin/python bench/screenshot.py                      # 12 pairs of cxr-lung-64, ~1 min on 2 cores
    .venv/bin/python bench/screenshot.py --count 8 --out /tmp/page.png
    .venv/bin/python bench/screenshot.py --url http://127.0.0.1:8000 --key "$(cat var/admin.key)"

Runs what ``make serve`` runs (``app.serve``: redis-server, one worker, the API; state in a temporary
folder, keys required) and drives the page in headless Chromium as a user would: enter the key,
start a job with the model's defaults, wait for it, screenshot the whole page.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: the repository root on sys.path, as pytest has it
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.integration.browser import chrome  # noqa: E402
from tests.integration.servers import free_port  # noqa: E402


def wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not there yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout}s")


def start_service(var: Path, key: str) -> tuple[str, subprocess.Popen[bytes]]:
    """``app.serve`` (what ``make serve`` runs) on a free port with state in ``var``; the demo defaults."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFEXP_")}
    env.update({"DIFFEXP_ADMIN_KEY": key, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    var.mkdir(parents=True, exist_ok=True)
    with (var / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve", "--port", str(port), "--var", str(var)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", proc


def shoot(
    url: str, key: str | None, out: Path, *, count: int, seed: int, width: int, job: str | None
) -> None:
    """Enter the key, start a job (or open ``job``), wait for it and its previews, screenshot the page."""
    driver = chrome(width=width, height=900)
    try:
        driver.get(url + "/")
        if key:
            wait(lambda: driver.find_element("id", "key-section").is_displayed(), 30, "the key form")
            driver.find_element("id", "api-key").send_keys(key)
            driver.find_element("css selector", "#key-form button[type=submit]").click()
        wait(lambda: driver.find_element("id", "app").is_displayed(), 30, "the page")
        for name, value in (("count", count), ("seed", seed)):
            field = driver.find_element("id", f"f-{name}")
            field.clear()
            field.send_keys(str(value))
        if job is None:
            driver.find_element("id", "submit-job").click()
            wait(lambda: driver.find_elements("css selector", "#jobs > li"), 30, "the job in the list")
            job = driver.find_element("css selector", "#jobs > li").get_attribute("data-id")
        selector = f'#job-{job} button[data-action="pairs"]'
        wait(lambda: driver.find_element("css selector", selector), 30, "the job in the list")
        driver.find_element("css selector", selector).click()
        started = time.monotonic()
        wait(
            lambda: (
                driver.find_element("id", f"job-{job}").get_attribute("data-status")
                in ("succeeded", "failed", "canceled")
            ),
            3600,
            "the job",
        )
        print(f"job {job} done in {time.monotonic() - started:.0f} s")
        script = (
            "const i = [...document.querySelectorAll('#grid img')];"
            "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0)"
        )
        wait(lambda: driver.execute_script(script), 60, "the previews")
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        # the whole page in one viewport (a window cannot be made taller than the headless screen)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
        time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out} ({width}x{height})")
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--url", help="a running service (e.g. `make serve`) instead of starting one")
    parser.add_argument("--key", help="its API key (with --url; none when it runs with DIFFEXP_AUTH=off)")
    parser.add_argument("--job", help="show this job of --url instead of starting one")
    args = parser.parse_args()
    options = {"count": args.count, "seed": args.seed, "width": args.width, "job": args.job}
    if args.url:
        shoot(args.url.rstrip("/"), args.key, args.out, **options)
        return 0
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        url, serve = start_service(Path(tmp) / "var", key)
        try:
            wait(lambda: httpx.get(f"{url}/readyz").status_code == 200, 240, "the service")
            shoot(url, key, args.out, **options)
        except Exception:
            log = Path(tmp) / "var" / "logs" / "worker.log"
            print(log.read_text()[-3000:] if log.exists() else "(no worker log)", file=sys.stderr)
            raise
        finally:
            serve.send_signal(signal.SIGTERM)  # app.serve stops its children
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
