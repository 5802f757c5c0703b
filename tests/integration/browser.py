"""Headless Chromium through selenium, on the system's browser: Debian's ``chromium`` and
``chromium-driver`` (``make test`` installs them when it runs as root), never a downloaded one.

``DIFFEXP_TEST_CHROMIUM`` / ``DIFFEXP_TEST_CHROMEDRIVER`` name other executables.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str, str] | str:
    """``(chromium, chromedriver)``, or why there is none (the reason a test skips with)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    named = os.environ.get("DIFFEXP_TEST_CHROMIUM")
    browser = shutil.which(named) if named else next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which(os.environ.get("DIFFEXP_TEST_CHROMEDRIVER") or "chromedriver")
    if not browser or not driver:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
        return (
            f"no {missing} on PATH: `apt-get install chromium chromium-driver` "
            "(`make test` does it when it runs as root)"
        )
    return browser, driver


def chrome(downloads: Path | None = None, *, width: int = 1280, height: int = 1000) -> Any:
    """A headless Chrome session; files the page downloads land in ``downloads``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if isinstance(found, str):
        raise RuntimeError(found)
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # the browser itself phones nowhere during tests
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(downloads),
                "download.prompt_for_download": False,
                "download.directory_upgrade": True,
                "safebrowsing.enabled": False,
            },
        )
    return webdriver.Chrome(options=options, service=Service(driver))
