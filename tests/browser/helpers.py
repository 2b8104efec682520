"""What the console's browser tests do again and again: sign in, wait for a page, take a
screenshot, check accessibility and where the key may (not) be, read a chart back."""
from __future__ import annotations

import time

from playwright.sync_api import Page, expect

from tests.browser.conftest import OUTPUT

TIMEOUT = 10_000  # ms


def clear_of_window_edge(window: int, margin: float) -> None:
    """Wait for the next window (minute, hour) when fewer than `margin` seconds of this one are left,
    so figures counted per window are read back in the window they were counted in."""
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.5)


def open_console(page: Page) -> None:
    page.goto("/ui/")
    expect(page.get_by_label("Key", exact=True)).to_be_visible(timeout=TIMEOUT)


def sign_in(page: Page, key: str, expect_page: str | None = "keys") -> None:
    open_console(page)
    page.get_by_label("Key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()
    if expect_page:
        wait_page(page, expect_page)


def wait_page(page: Page, name: str) -> None:
    """The hash route `name` has rendered (its data loaded or its error shown)."""
    page.wait_for_selector(f"#page[data-page='{name}'][data-ready='true']", timeout=TIMEOUT)


def go(page: Page, name: str, link_text: str) -> None:
    page.get_by_role("navigation", name="Console pages").get_by_role("link", name=link_text, exact=True).click()
    wait_page(page, name)


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


# Every visible control has an accessible name; tables have captions and scoped heads; dialogs
# are labelled; charts are images with a label.
_A11Y_PROBLEMS = """
() => {
  const problems = [];
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const text = (el) => (el.textContent || "").trim();
  const byIds = (ids) => ids.split(/\\s+/).map((id) => document.getElementById(id)).filter(Boolean).map(text).join(" ").trim();
  const named = (el) => {
    if ((el.getAttribute("aria-label") || "").trim()) return true;
    if (el.getAttribute("aria-labelledby") && byIds(el.getAttribute("aria-labelledby"))) return true;
    if (el.labels && Array.from(el.labels).some((l) => text(l))) return true;
    if (el.tagName === "BUTTON" && text(el)) return true;
    if (el.tagName === "A" && text(el)) return true;
    if ((el.getAttribute("title") || "").trim()) return true;
    return false;
  };
  const describe = (el) => el.outerHTML.slice(0, 160);
  for (const el of document.querySelectorAll("input, select, textarea, button, a[href], summary")) {
    if (!visible(el) || el.type === "hidden") continue;
    if (el.tagName === "SUMMARY") { if (!text(el)) problems.push("summary without text: " + describe(el)); continue; }
    if (!named(el)) problems.push("no accessible name: " + describe(el));
    if (el.tabIndex < 0 && !el.disabled) problems.push("not reachable with Tab: " + describe(el));
  }
  for (const table of document.querySelectorAll("table")) {
    if (!visible(table)) continue;
    if (!table.querySelector("caption") || !text(table.querySelector("caption"))) problems.push("table without caption");
    for (const th of table.querySelectorAll("th")) {
      if (!["col", "row"].includes(th.getAttribute("scope"))) problems.push("th without scope: " + describe(th));
    }
  }
  for (const dialog of document.querySelectorAll("dialog[open]")) {
    if (!named(dialog)) problems.push("dialog without a name: " + describe(dialog));
  }
  for (const canvas of document.querySelectorAll("canvas")) {
    if (canvas.getAttribute("role") !== "img" || !named(canvas)) problems.push("chart without role img and label");
  }
  if (!document.documentElement.lang) problems.push("no lang on <html>");
  if (document.querySelectorAll("h1").length < 1) problems.push("no h1");
  return problems;
}
"""


def assert_accessible(page: Page) -> None:
    problems = page.evaluate(_A11Y_PROBLEMS)
    assert not problems, "\n".join(problems)


def check_page(page: Page, name: str) -> None:
    """Screenshot `name` and check accessibility of what is on screen."""
    shot(page, name)
    assert_accessible(page)


def assert_key_not_kept_outside_the_tab(page: Page, *keys: str) -> None:
    """The key never in the URL, a cookie or localStorage (only the tab's sessionStorage)."""
    assert page.context.cookies() == []
    local = page.evaluate("JSON.stringify(Object.assign({}, window.localStorage))")
    for key in keys:
        assert key not in page.url
        assert key not in local


def session_storage(page: Page) -> str:
    return page.evaluate("JSON.stringify(Object.assign({}, window.sessionStorage))")


# The values a stacked bar chart draws, read back from its pixels: for dataset `label`, each bar's
# top and base pixel through the y scale (a stacked bar spans from its base to its top).
_DRAWN = """
([canvasId, label]) => {
  const chart = Chart.getChart(document.getElementById(canvasId));
  if (!chart) return null;
  const index = chart.data.datasets.findIndex((d) => d.label === label);
  if (index < 0) return {labels: chart.data.datasets.map((d) => d.label)};
  const y = chart.scales.y;
  const bars = chart.getDatasetMeta(index).data;
  return {
    drawn: bars.map((bar) => y.getValueForPixel(bar.y) - y.getValueForPixel(bar.base)),
    data: chart.data.datasets[index].data,
    buckets: chart.data.labels,
    pixelValue: (y.max - y.min) / Math.max(Math.abs(y.bottom - y.top), 1),
  };
}
"""


def drawn_bars(page: Page, canvas_id: str, label: str) -> dict:
    result = page.evaluate(_DRAWN, [canvas_id, label])
    assert result is not None, f"no chart on #{canvas_id}"
    assert "drawn" in result, f"no dataset {label!r} in #{canvas_id}: {result}"
    return result
