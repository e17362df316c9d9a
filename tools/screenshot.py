"""Take a screenshot of an HTML file in headless Chromium (the distribution's, driven by Playwright).

Usage: python tools/screenshot.py PAGE.html OUT.png [WIDTH HEIGHT]

``make demo`` uses it for the README's picture of docs/report.html. Without Playwright or Chromium it
says so in one line and exits 1, leaving no file.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def main(page: str, out: str, width: int = 1400, height: int = 1600) -> int:
    chromium = os.environ.get("DYN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("screenshot: no Playwright or Chromium here (apt-get install chromium); skipped", file=sys.stderr)
        return 1
    target, tmp = Path(out), Path(out + ".tmp.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": width, "height": height})
        tab.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
        tab.goto(Path(page).resolve().as_uri())
        tab.wait_for_timeout(1500)  # plotly draws after load
        tab.screenshot(path=str(tmp))
        browser.close()
    os.replace(tmp, target)
    print(f"screenshot: {target}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 4):
        print(__doc__.splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args[0], args[1], *(int(a) for a in args[2:])))
