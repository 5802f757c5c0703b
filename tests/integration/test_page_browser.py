"""The web page in headless Chromium against the real service: uvicorn, Celery workers on the tiny
bundle, redis-server and SeaweedFS (the ``stack`` of tests/integration/conftest.py), keys required; and a
second API process on the same stack with ``DIFFEXP_AUTH=off``.

Skipped, with the reason, only when no chromium/chromedriver is installed (``make test`` installs them
when it runs as root)."""

from __future__ import annotations

import csv
import io
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS, ADMIN_KEY
from tests.integration.browser import chrome, find_browser
from tests.integration.conftest import Stack
from tests.integration.servers import free_port, kill, spawn, wait_for, worker_env

FOUND = find_browser()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(isinstance(FOUND, str), reason=f"no browser: {FOUND}"),
]
ETA = 0.42  # the tiny bundle keeps about half its pairs at this threshold


@pytest.fixture()
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture()
def browser(downloads: Path) -> Iterator[Any]:
    driver = chrome(downloads)
    try:
        yield driver
    finally:
        base = service_url(driver)
        driver.quit()
        if base:
            cancel_unfinished(base)  # a failed test must not leave a long job in front of the next ones


def service_url(driver: Any) -> str | None:
    url = str(driver.current_url or "")
    return "/".join(url.split("/")[:3]) if url.startswith("http") else None


def server_job_ids(base: str) -> list[dict[str, Any]]:
    page = httpx.get(f"{base}/v1/jobs", params={"limit": 100}, headers=ADMIN_HEADERS, timeout=30)
    return list(page.json()["data"])


def cancel_unfinished(base: str) -> None:
    for job in server_job_ids(base):
        if job["status"] in ("queued", "running"):
            httpx.post(f"{base}/v1/jobs/{job['id']}/cancel", headers=ADMIN_HEADERS, timeout=30)


def until(driver: Any, check: Callable[[Any], Any], timeout: float = 30, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, what)


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def shown(driver: Any, element_id: str) -> bool:
    return bool(by_id(driver, element_id).is_displayed())


def enter_key(driver: Any, key: str) -> None:
    until(driver, lambda d: shown(d, "key-section"), what="the key form")
    field = by_id(driver, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#key-form button[type=submit]").click()


def fill(driver: Any, **values: Any) -> None:
    for name, value in values.items():
        field = by_id(driver, f"f-{name}")
        field.clear()
        field.send_keys(str(value))


def submit_job(driver: Any, **values: Any) -> str:
    """Fill the form, start the job; returns its id (the entry the page adds to the list).

    The jobs known before come from the server, not the page: the page's list may still be loading,
    and an older job appearing late would pass for the new one."""
    base = service_url(driver)
    assert base is not None
    before = {job["id"] for job in server_job_ids(base)}
    fill(driver, **values)
    by_id(driver, "submit-job").click()

    def new_id(d: Any) -> str | None:
        ids = [li.get_attribute("data-id") for li in d.find_elements("css selector", "#jobs > li")]
        fresh = [i for i in ids if i not in before]
        return fresh[0] if fresh else None

    job_id: str = until(driver, new_id, 15, "the new job in the list")
    return job_id


def job_item(driver: Any, job_id: str) -> Any:
    return by_id(driver, f"job-{job_id}")


def action(driver: Any, job_id: str, name: str) -> Any:
    return job_item(driver, job_id).find_element("css selector", f'button[data-action="{name}"]')


def watch_until_done(driver: Any, job_id: str, timeout: float = 120) -> tuple[list[str], list[str]]:
    """The statuses and progress lines the page showed, sampled until the job ended (no reload)."""
    statuses: list[str] = []
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        li = job_item(driver, job_id)
        status = li.get_attribute("data-status")
        line = li.find_element("css selector", ".counts").text
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if not lines or lines[-1] != line:
            lines.append(line)
        if status in ("succeeded", "failed", "canceled"):
            return statuses, lines
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} not done in {timeout}s: {statuses} {lines[-1:]}")


def grid_ready(count: int) -> Callable[[Any], bool]:
    script = """
        const imgs = [...document.querySelectorAll('#grid img')];
        return imgs.length === arguments[0] &&
            imgs.every(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'));
    """
    return lambda d: bool(d.execute_script(script, count))


def csp_violations(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def test_submit_watch_preview_download_delete(stack: Stack, browser: Any, downloads: Path) -> None:
    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"), what="the page after the key")
    assert d.execute_script("return sessionStorage.getItem('diffexp.apiKey')") == ADMIN_KEY
    model = d.find_element("id", "f-model")
    assert model.get_attribute("value") == stack.env["DIFFEXP_DEFAULT_MODEL"]
    defaults = stack.client.get("/v1/models").json()["data"][0]
    assert float(by_id(d, "f-tau").get_attribute("value")) == defaults["sampling_defaults"]["tau"]
    assert float(by_id(d, "f-eta").get_attribute("value")) == defaults["eta_default"]

    job_id = submit_job(d, count=3, eta=ETA, steps=4, seed=1234)
    job = stack.client.get(f"/v1/jobs/{job_id}").json()
    assert job["params"]["count"] == 3 and job["params"]["eta"] == ETA and job["params"]["seed"] == 1234
    assert job["params"]["sampling"]["steps"] == 4
    assert job["params"]["sampling"]["tau"] == defaults["sampling_defaults"]["tau"]  # defaults not sent

    statuses, lines = watch_until_done(d, job_id)
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded", statuses
    assert len(lines) >= 2 and lines[-1].startswith("3 of 3 pairs · generated "), lines
    bar = job_item(d, job_id).find_element("css selector", "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "3"

    # the grid of the new job opened by itself; its previews are the service's, fetched with the key
    until(d, grid_ready(3), 30, "three previews loaded")
    listed = stack.client.get(f"/v1/jobs/{job_id}/pairs").json()
    assert listed["final"] is True
    figures = d.find_elements("css selector", "#grid figure")
    assert [f.get_attribute("data-name") for f in figures] == [p["name"] for p in listed["data"]]
    for fig, pair in zip(figures, listed["data"], strict=True):
        assert f"Dice loss {pair['dice_loss']:.4f}" in fig.text
        assert pair["dice_loss"] <= ETA
    sizes = d.execute_script(
        "return [...document.querySelectorAll('#grid img')].map(i => [i.naturalWidth, i.clientWidth])"
    )
    assert all(natural == 16 and shown_px >= 100 for natural, shown_px in sizes), sizes  # scaled up
    assert "3 of 3" in by_id(d, "pairs-summary").text or "1–3 of 3" in by_id(d, "pairs-summary").text

    action(d, job_id, "download").click()
    until(d, lambda d: [p for p in downloads.iterdir() if p.suffix == ".zip"], 30, "the zip downloaded")
    (path,) = [p for p in downloads.iterdir() if p.suffix == ".zip"]
    assert path.name == f"{job_id}.zip"
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        names = [r["name"] for r in rows]
        assert names == [p["name"] for p in listed["data"]]
        for name in names:
            assert zf.read(f"images/{name}.png").startswith(b"\x89PNG")
            assert zf.read(f"masks/{name}.png").startswith(b"\x89PNG")

    action(d, job_id, "delete").click()
    until(d, lambda d: d.switch_to.alert, 5, "the confirmation").accept()
    until(d, lambda d: not d.find_elements("id", f"job-{job_id}"), 15, "the job gone from the list")
    assert not shown(d, "pairs-section")
    assert stack.client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not shown(d, "error")
    assert csp_violations(d) == []


def test_cancel_a_running_job_then_delete_it(stack: Stack, browser: Any) -> None:
    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    job_id = submit_job(
        d, count=50, eta=ETA, steps=60, seed=5
    )  # the most the stack allows: still running at the click
    # the grid shows the pairs kept so far while the job runs
    until(d, lambda d: d.find_elements("css selector", "#grid img"), 90, "a kept pair in the grid")
    assert "kept so far" in by_id(d, "pairs-summary").text
    action(d, job_id, "cancel").click()
    until(d, lambda d: job_item(d, job_id).get_attribute("data-status") == "canceled", 15, "canceled")
    assert not action(d, job_id, "cancel").is_displayed()
    assert stack.client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert action(d, job_id, "download").text == "Download kept so far"

    action(d, job_id, "delete").click()
    until(d, lambda d: d.switch_to.alert, 5, "the confirmation").accept()
    until(d, lambda d: not d.find_elements("id", f"job-{job_id}"), 15, "the job gone")
    assert stack.client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_a_wrong_key_shows_the_problem_and_a_key_can_be_forgotten(stack: Stack, browser: Any) -> None:
    d = browser
    d.get(stack.url + "/")
    enter_key(d, "not-a-key")
    until(d, lambda d: shown(d, "error"), 10, "the error")
    error = by_id(d, "error").text
    assert "Unauthorized (401)" in error and "invalid or revoked key" in error
    assert shown(d, "key-section") and not shown(d, "app")
    assert d.execute_script("return sessionStorage.getItem('diffexp.apiKey')") is None

    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"), 10, "the page")
    assert not shown(d, "error")
    by_id(d, "forget-key").click()
    until(d, lambda d: shown(d, "key-section"), 10, "the key form again")
    assert d.execute_script("return sessionStorage.getItem('diffexp.apiKey')") is None
    assert not d.find_elements("css selector", "#jobs > li")  # nothing of the key's stays on screen


def test_a_bad_parameter_shows_the_problem_details(stack: Stack, browser: Any) -> None:
    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"))
    fill(d, count=51)  # DIFFEXP_MAX_COUNT is 50 here: only the service knows
    by_id(d, "submit-job").click()
    until(d, lambda d: shown(d, "error"), 10, "the error")
    text = by_id(d, "error").text
    assert "Unprocessable Entity (422)" in text and "count:" in text and "50" in text


def test_a_job_with_real_masks_from_the_form_shows_each_pairs_mask_source(stack: Stack, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"))
    assert not shown(d, "real-share-field") and not shown(d, "masks-hint")  # the tiny model has masks.npz
    Select(by_id(d, "f-mask_source")).select_by_value("mixed")
    until(d, lambda d: shown(d, "real-share-field"), 5, "the share of real masks")
    fill(d, real_share=1)
    by_id(d, "f-clean_masks").click()
    job_id = submit_job(d, count=2, eta=1, steps=2, seed=8)
    masks = stack.client.get(f"/v1/jobs/{job_id}").json()["params"]["masks"]
    assert masks == {"source": "mixed", "real_share": 1.0, "clean": True}
    statuses, _ = watch_until_done(d, job_id)
    assert statuses[-1] == "succeeded", statuses
    until(d, grid_ready(2), 30, "two previews loaded")
    listed = stack.client.get(f"/v1/jobs/{job_id}/pairs").json()["data"]
    figures = d.find_elements("css selector", "#grid figure")
    for fig, pair in zip(figures, listed, strict=True):
        assert pair["mask_source"].startswith("real:") and f"mask: {pair['mask_source']}" in fig.text


def test_the_page_loads_nothing_from_other_origins(stack: Stack, browser: Any) -> None:
    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"))
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(stack.url + "/") for r in resources), resources
    refs = d.execute_script("return [...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)")
    assert all(r.startswith((stack.url + "/", "blob:")) for r in refs), refs
    # the CSP is in force: a request to another origin is refused by the browser itself
    blocked = d.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        document.addEventListener('securitypolicyviolation', e => done(e.effectiveDirective));
        fetch('http://198.51.100.7/x').catch(() => {});
        setTimeout(() => done('no violation'), 5000);
        """
    )
    assert blocked == "connect-src"


@pytest.fixture(scope="module")
def open_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the same Redis, storage and workers, with ``DIFFEXP_AUTH=off``."""
    port = free_port()
    log = tmp_path_factory.mktemp("open-api") / "api.log"
    env = worker_env({**stack.env, "DIFFEXP_AUTH": "off", "DIFFEXP_HOST": "127.0.0.1"})
    proc = spawn(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        log=log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "open API", proc, log)
        yield url
    finally:
        kill(proc)


def test_without_keys_the_page_works_and_fits_a_phone(open_api: str, browser: Any) -> None:
    d = browser
    d.get(open_api + "/")
    until(d, lambda d: shown(d, "app"), 15, "the page without a key")
    assert not shown(d, "key-section") and not by_id(d, "forget-key").is_displayed()
    assert "No API key needed" in by_id(d, "key-status").text
    job_id = submit_job(d, count=2, eta=ETA, steps=4, seed=99)
    statuses, _ = watch_until_done(d, job_id)
    assert statuses[-1] == "succeeded"
    until(d, grid_ready(2), 30, "two previews loaded")

    d.set_window_size(360, 800)
    until(d, lambda d: d.execute_script("return window.innerWidth") <= 360, 5)
    overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a 360px screen"
    for element_id in ("submit-job", "f-count", "grid"):
        rect = d.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [r.left, r.right]", by_id(d, element_id)
        )
        assert rect[0] >= 0 and rect[1] <= 360, (element_id, rect)
    labels = d.execute_script(
        "return [...document.querySelectorAll('#job-form input, #job-form select')]"
        '.filter(i => !document.querySelector(`label[for="${i.id}"]`)).map(i => i.id)'
    )
    assert labels == []  # every field has its label
    action(d, job_id, "delete").click()
    until(d, lambda d: d.switch_to.alert, 5).accept()
    until(d, lambda d: not d.find_elements("id", f"job-{job_id}"), 15)


def test_the_event_stream_is_read_when_the_service_has_one(stack: Stack, browser: Any) -> None:
    """Live progress comes from GET /v1/jobs/{id}/events when the service serves it (else polling, which
    the tests above exercise whichever the service has): the page must say which it used."""
    d = browser
    d.get(stack.url + "/")
    enter_key(d, ADMIN_KEY)
    until(d, lambda d: shown(d, "app"))
    has_events = stack.client.get("/openapi.json").json()["paths"].get("/v1/jobs/{job_id}/events") is not None
    job_id = submit_job(d, count=2, eta=ETA, steps=4, seed=7)
    statuses, _ = watch_until_done(d, job_id)
    assert statuses[-1] == "succeeded"
    assert by_id(d, "live-mode").get_attribute("data-mode") == ("events" if has_events else "polling")
    action(d, job_id, "delete").click()
    until(d, lambda d: d.switch_to.alert, 5).accept()
