"""Open an HTML file in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright;
never a downloaded browser) and report what a person would see: JavaScript errors, every
plotly figure's traces, the Findings, the neuron cards, and screenshots (the full page, and
the Neurons section's first cards)."""

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


# The neuron cards as drawn: how many the page's data holds and the page shows, and in the first
# card the context tokens with a visible, non-transparent background (coloured by activation).
_CARDS_CHECK = """() => {
  const root = document.getElementById('neuron-cards'); if (!root) return null;
  const cards = Array.from(root.querySelectorAll('article.ncard'));
  const first = cards[0];
  const coloured = first ? Array.from(first.querySelectorAll('td.ctx span')).filter(s => {
    const bg = getComputedStyle(s).backgroundColor, r = s.getBoundingClientRect();
    return bg && bg !== 'rgba(0, 0, 0, 0)' && bg !== 'transparent' && r.width > 0 && r.height > 0;
  }).length : 0;
  return {n_data: parseInt(root.getAttribute('data-n')), shown: cards.length,
          ids: cards.map(c => c.getAttribute('data-id')), layers: cards.map(c => c.getAttribute('data-layer')),
          families: cards.map(c => c.getAttribute('data-family')),
          count: root.querySelector('.cards-count').textContent, coloured: coloured,
          contexts: first ? first.querySelectorAll('td.ctx').length : 0,
          first_drawn_ms: window.unCardsFirstDrawn || null};
}"""

_FINDINGS_CHECK = """() => Array.from(document.querySelectorAll('#findings li')).map(li => ({
  topic: li.getAttribute('data-topic'), text: li.textContent,
  visible: li.getBoundingClientRect().height > 0 && li.getBoundingClientRect().top < window.innerHeight}))"""


def chromium_path() -> str | None:
    return os.environ.get("UNIVERSAL_NEURONS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _wait_for_cards(page, timeout_ms: int, drawn: int = 1) -> None:
    """Wait until the card browser has drawn `drawn` times (no-op without one)."""
    page.wait_for_function(f"""() => {{ const r = document.getElementById('neuron-cards');
        return !r || parseInt(r.getAttribute('data-drawn') || '0') >= {drawn}; }}""", timeout=timeout_ms)


def open_in_browser(html_path: Path, screenshot: Path, *, cards_screenshot: Path | None = None, width: int = 1400,
                    timeout_ms: int = 60_000) -> dict:
    """Load `html_path` (file://, so any network fetch would fail), wait for plotly to draw,
    and return `{"console_errors", "page_errors", "requests", "figures", "sorted_column",
    "findings", "cards", "screenshot"}`; with `cards_screenshot`, also a screenshot of the
    Neurons section's first cards."""
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
            _wait_for_cards(page, timeout_ms)
            page.wait_for_timeout(500)  # let WebGL traces paint before the screenshot
            figures = page.evaluate(_FIGURE_CHECK)
            findings = page.evaluate(_FINDINGS_CHECK)
            cards = page.evaluate(_CARDS_CHECK)
            sort = page.evaluate("""() => {
              const t = document.getElementById('neuron-table'); if (!t) return null;
              const th = t.querySelectorAll('thead th')[3]; th.click(); th.click();
              return Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[3].getAttribute('data-v')));
            }""")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            if cards_screenshot is not None and cards:
                # the filter bar and the first card, as a reader who scrolled to them sees it (page coordinates)
                clip = page.evaluate("""() => {
                  const root = document.getElementById('neuron-cards').getBoundingClientRect();
                  const card = document.querySelector('#neuron-cards article.ncard').getBoundingClientRect();
                  return {x: Math.max(0, root.left + window.scrollX - 12), y: root.top + window.scrollY - 8,
                          width: root.width + 24, height: Math.min(card.bottom - root.top + 18, 1800)};
                }""")
                page.screenshot(path=str(cards_screenshot), full_page=True, clip=clip)
        finally:
            browser.close()
    return {"console_errors": errors, "page_errors": page_errors, "requests": requests, "figures": figures,
            "sorted_column": sort, "findings": findings, "cards": cards, "screenshot": screenshot}


def exercise_cards(html_path: Path, screenshot: Path, *, layer: int, family: str, width: int = 1400,
                   timeout_ms: int = 120_000) -> dict:
    """Load a report and use its card browser as a reader would: the first page, the next page,
    a layer filter, a family filter. Returns what each step showed, the time the first page was
    drawn (ms after navigation began) and the JavaScript errors; screenshots the first page."""
    from playwright.sync_api import sync_playwright

    errors, page_errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            _wait_for_cards(page, timeout_ms)
            first = page.evaluate(_CARDS_CHECK)
            page.evaluate("document.getElementById('neuron-cards').scrollIntoView()")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            page.click("#neuron-cards .cards-pager button[data-step='1']")
            _wait_for_cards(page, timeout_ms, 2)
            second = page.evaluate(_CARDS_CHECK)
            page.select_option("#neuron-cards select[data-filter=layer]", str(layer))
            _wait_for_cards(page, timeout_ms, 3)
            by_layer = page.evaluate(_CARDS_CHECK)
            page.select_option("#neuron-cards select[data-filter=layer]", "")
            page.select_option("#neuron-cards select[data-filter=family]", family)
            _wait_for_cards(page, timeout_ms, 5)
            by_family = page.evaluate(_CARDS_CHECK)
        finally:
            browser.close()
    return {"console_errors": errors, "page_errors": page_errors, "first": first, "second": second,
            "by_layer": by_layer, "by_family": by_family}
