"""Open an HTML file in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright;
never a downloaded browser) and report what a person would see: JavaScript errors, every
plotly figure's traces, and a full-page screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # WebGL (the Scattergl traces) on the software rasteriser, since there is no GPU
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
]

# Per figure: how many traces, and how many have points (any data array with entries).
_FIGURE_CHECK = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(el => {
  const keys = ['x', 'y', 'z', 'q1', 'median', 'values'];
  const n = t => Math.max(0, ...keys.map(k => (t[k] && t[k].length) || 0));
  const data = el._fullData || [];  // decoded: el.data may hold base64 typed arrays
  return {id: el.id, traces: data.length, with_points: data.filter(t => n(t) > 0).length,
          rendered: !!el._fullLayout, height: el.getBoundingClientRect().height};
})"""


def chromium_path() -> str | None:
    return os.environ.get("UNIVERSAL_NEURONS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def open_in_browser(html_path: Path, screenshot: Path, *, width: int = 1400, timeout_ms: int = 60_000) -> dict:
    """Load `html_path` (file://, so any network fetch would fail), wait for plotly to draw,
    and return `{"console_errors", "page_errors", "requests", "figures", "screenshot"}`."""
    from playwright.sync_api import sync_playwright

    errors, page_errors, requests = [], [], []
    # Playwright starts Chromium with a new empty profile directory of its own.
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            local = ("file:", "data:", "blob:", "about:")
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(local) else None)
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            page.wait_for_function("() => Array.from(document.querySelectorAll('.plotly-graph-div'))"
                                   ".every(el => el._fullLayout)",
                                   timeout=timeout_ms)
            page.wait_for_timeout(500)  # let WebGL traces paint before the screenshot
            figures = page.evaluate(_FIGURE_CHECK)
            sort = page.evaluate("""() => {
              const t = document.getElementById('neuron-table'); if (!t) return null;
              const th = t.querySelectorAll('thead th')[3]; th.click(); th.click();
              return Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[3].getAttribute('data-v')));
            }""")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"console_errors": errors, "page_errors": page_errors, "requests": requests, "figures": figures,
            "sorted_column": sort, "screenshot": screenshot}
