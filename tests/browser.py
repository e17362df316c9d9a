"""A real browser for the tests: Chromium from the distribution's packages, driven by Playwright.

``browser`` is a module-scoped pytest fixture (import it into a test module); it skips, with
the reason, where Playwright or Chromium cannot start. ``open_offline(browser, url)`` opens a
page with every request that is not a file: URL aborted, collecting console errors, page
errors and the requests that were blocked.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The browser to drive: $DYN_CHROMIUM, else the first of CHROMIUM_NAMES on PATH or in /usr/bin."""
    if os.environ.get("DYN_CHROMIUM"):
        return os.environ["DYN_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set DYN_CHROMIUM)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        except Error as e:
            pytest.skip(f"Chromium at {path} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@dataclass
class PageLog:
    """What a page did that a test checks: console errors and uncaught errors, warnings, requests blocked."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def open_page(browser, url: str, allow: tuple[str, ...] = ("file:",), timeout_ms: int = 20000):
    """(page, log): ``url`` opened with every request whose URL does not start with one of ``allow``
    aborted and recorded, console errors and page errors recorded."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    log = PageLog()

    def route(r):
        if r.request.url.startswith(allow):
            r.continue_()
        else:
            log.blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: {"error": log.errors, "warning": log.warnings}.get(m.type, []).append(m.text))
    page.on("pageerror", lambda e: log.errors.append(str(e)))
    page.goto(url, timeout=timeout_ms)
    return page, log
