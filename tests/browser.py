"""Headless Chromium for the HTML report's tests (and the README's screenshot): the
system's Chromium driven by the ``playwright`` package, which never downloads a browser
here. ``why_unavailable()`` says what is missing, for ``pytest.skip``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1100, "height": 900}

# Per <svg>: its box, its drawn shapes and how many of them have a non-empty box.
PLOTS_JS = """() => [...document.querySelectorAll('svg')].map(s => {
  const box = s.getBoundingClientRect();
  const shapes = [...s.querySelectorAll('rect, circle, path, polyline')];
  return {label: s.getAttribute('aria-label'), width: box.width, height: box.height,
          shapes: shapes.length,
          visible: shapes.filter(e => { const b = e.getBBox(); return b.width > 0 || b.height > 0; }).length};
})"""


def chromium_path() -> str | None:
    """The system Chromium, if installed."""
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


def why_unavailable() -> str | None:
    """``None`` when the tests can drive Chromium, else what is missing."""
    if chromium_path() is None:
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def render(page_path: Path, screenshot: Path | None = None, selector: str | None = None) -> dict:
    """Load the HTML file ``page_path`` in headless Chromium. Returns ``errors`` (console
    errors and uncaught page errors), ``requests`` (every URL the page asked for besides
    itself) and ``plots`` (``PLOTS_JS`` per SVG); saves a PNG of the page (or of the
    element ``selector``) at ``screenshot``."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    url = Path(page_path).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if r.url != url else None)
            page.goto(url, wait_until="load")
            plots = page.evaluate(PLOTS_JS)
            if screenshot is not None:
                target = page.locator(selector) if selector else page
                target.screenshot(path=str(screenshot), **({} if selector else
                                                           {"full_page": True}))
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "plots": plots}


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.browser REPORT.json OUT.png [SELECTOR]``: render a JSON report
    and save a PNG of the page, or of one element (e.g. ``#plan``: the planner section),
    as the README's picture was made."""
    import sys
    import tempfile

    from graphopt import html_report

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit(main.__doc__)
    missing = why_unavailable()
    if missing:
        raise SystemExit(missing)
    page = html_report.render(html_report.read(args[0]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.html"
        path.write_text(page, encoding="utf-8")
        seen = render(path, Path(args[1]), args[2] if len(args) == 3 else None)
    if seen["errors"]:
        raise SystemExit(f"the page had errors: {seen['errors']}")
    print(f"{args[1]}: {Path(args[1]).stat().st_size:,} bytes, {len(seen['plots'])} plots")


if __name__ == "__main__":
    main()
