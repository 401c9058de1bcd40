"""Drive a viewer from headless Chromium (Playwright with the system's `chromium`): what the browser test and
bench/viewer_speed.py use to open the page, wait for frames, click on the canvas and take screenshots."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable

# Chromium on a machine with a closed network: without these it retries Google's services at every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader"]


def find_chromium() -> str | None:
    """Path of a Chromium to drive: $DFIELD_CHROMIUM, else `chromium` / `chromium-browser` on PATH, else None."""
    env = os.environ.get("DFIELD_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(url: str, width: int = 800, height: int = 800, chromium: str | None = None):
    """A headless Chromium page opened on `url` (yields (page, seconds the page took to load)); closed after."""
    from playwright.sync_api import sync_playwright  # optional: only browser tests and benchmarks need it

    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found (install Debian's 'chromium' package or set DFIELD_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            t0 = time.perf_counter()
            page.goto(url)
            yield page, time.perf_counter() - t0
        finally:
            browser.close()


def click_canvas(page, fx: float, fy: float, modifiers: list[str] | None = None) -> None:
    """Click the viewer's canvas at fractions (fx, fy) of its size (0..1, top-left origin)."""
    box = page.locator("canvas").first.bounding_box()
    page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    for m in modifiers or []:
        page.keyboard.down(m)
    page.mouse.down()
    page.mouse.up()
    for m in modifiers or []:
        page.keyboard.up(m)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> float | None:
    """Seconds until `predicate()` held, or None when `timeout` passed first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter() - t0
        time.sleep(poll)
    return None
