"""The console (/ui/) in a real browser: Debian's Chromium driven by Playwright, against a real
gunicorn gateway, the real Redis (a key prefix of its own, removed afterwards) and the fake vLLM.

Chromium comes from the OS packages (`apt-get install chromium`; scripts/test installs it when
missing); Playwright never downloads a browser. Without Chromium these tests fail: a skipped
browser test would look like a pass.

Every test gets a fresh browser context and page; the page fixture fails the test on any
Content-Security-Policy violation, JavaScript error, `alert()` or server error the page met.
Screenshots go to test-output/console/ at the repository root. The browser and the gateway live
as long as this package's tests run (package scope), not through the rest of the suite.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import (MASTER_KEY, REAL_REDIS_URL, ROOT, TEST_PRICES, GatewayServer, gateway_environ,
                            real_redis_available, real_redis_namespace, wait_until)

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUTPUT = ROOT / "test-output" / "console"
VIEWPORT = {"width": 1280, "height": 800}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}

# Recorded in the page before any of its scripts run: CSP violations the page meets.
WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "") + " " + (e.sourceFile || ""));
});
"""
# Chromium logs every HTTP error of a fetch as a console error; refusals (4xx) are part of the
# console's flows (a wrong key, a 403), server errors (5xx) are not.
_HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


def chromium_executable() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is not installed (apt-get install -y chromium; ./scripts/test installs it): "
                    "the console's browser tests cannot run", pytrace=False)
    return path


@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


_SHOTS_TAKEN = []


@pytest.fixture(scope="package")
def screenshots():
    """The folder for this run's screenshots (emptied first); named at the end of the session."""
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)
    OUTPUT.mkdir(parents=True)
    yield OUTPUT
    _SHOTS_TAKEN.append(len(list(OUTPUT.glob("*.png"))))
    print(f"console screenshots: {OUTPUT}")


def pytest_terminal_summary(terminalreporter):
    """Name the screenshots' folder after the run (a fixture's own output is captured)."""
    if _SHOTS_TAKEN:
        terminalreporter.write_line(f"console screenshots for review ({_SHOTS_TAKEN[-1]}): {OUTPUT}")


class Gateway:
    """The gunicorn gateway under test, and the admin API as a test calls it directly."""

    def __init__(self, server: GatewayServer, prefix: str):
        self.server = server
        self.url = server.url
        self.console = server.url + "/ui/"
        self.prefix = prefix
        self.http = requests.Session()
        self.master = {"Authorization": f"Bearer {MASTER_KEY}"}

    def admin(self, method: str, path: str, **kwargs):
        resp = self.http.request(method, self.url + path, headers=self.master, timeout=10, **kwargs)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()

    def generate(self, **fields) -> dict:
        return self.admin("POST", "/key/generate", json=fields)

    def chat(self, key: str, times: int = 1, end_user: str | None = None, request_id: str | None = None) -> list:
        headers = {"Authorization": f"Bearer {key}"}
        if end_user:
            headers["x-end-user-id"] = end_user
        if request_id:
            headers["X-Request-Id"] = request_id
        return [self.http.post(self.url + "/vllm/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
                for _ in range(times)]

    def info(self, key: str) -> dict:
        return self.admin("GET", "/key/info", params={"key": key})["info"]

    def wait_requests(self, key: str, count: int) -> dict:
        """The key's record once its accounting (written in batches) shows `count` requests."""
        assert wait_until(lambda: self.info(key)["requests"] >= count, timeout=10), self.info(key)
        return self.info(key)


@pytest.fixture(scope="package")
def console_gateway(fake_vllm_server):
    """A real gunicorn gateway (two gevent workers) on the real Redis, with prices, so spend is not 0."""
    if not real_redis_available():
        pytest.fail(f"no Redis at {REAL_REDIS_URL}: the console's browser tests need the real Redis "
                    "(./scripts/test starts one)", pytrace=False)
    with real_redis_namespace("console") as (_client, prefix):
        env = gateway_environ(fake_vllm_server.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                              MODEL_PRICES=TEST_PRICES,  # reconciliation on, short windows: the Replicas page
                              RECONCILE=1, RECONCILE_WINDOW=2, RECONCILE_POLL_INTERVAL=0.25)
        server = GatewayServer(env, workers=2)
        try:
            yield Gateway(server, prefix)
        finally:
            server.stop()


class PageProblems:
    """What a page must never do: CSP violations, JS errors, alert()s, server errors."""

    def __init__(self):
        self.errors: list[str] = []
        self.dialogs: list[str] = []

    def on_console(self, message):
        if message.type != "error":
            return
        status = _HTTP_ERROR.search(message.text)
        if status and 400 <= int(status.group(1)) < 500:
            return
        self.errors.append(f"console error: {message.text}")

    def on_page_error(self, error):
        self.errors.append(f"page error: {error}")

    def on_dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


@pytest.fixture
def page(browser, console_gateway, screenshots):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True, base_url=console_gateway.url)
    context.add_init_script(WATCH_CSP)
    problems = PageProblems()
    opened = context.new_page()
    opened.on("console", problems.on_console)
    opened.on("pageerror", problems.on_page_error)
    opened.on("dialog", problems.on_dialog)
    opened.problems = problems
    yield opened
    try:
        csp = opened.evaluate("window.__cspViolations || []") if not opened.is_closed() else []
    except Exception:  # the page navigated away or closed: the console listener saw them too
        csp = []
    context.close()
    assert not problems.dialogs, f"the page opened dialogs (script ran): {problems.dialogs}"
    assert not csp, f"Content-Security-Policy violations: {csp}"
    assert not problems.errors, "\n".join(problems.errors)


@pytest.fixture
def alias():
    """A unique alias prefix for the keys of one test."""
    return lambda label: f"{label}-{uuid.uuid4().hex[:8]}"
