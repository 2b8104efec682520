"""The console's page and files: strict headers, no inline script or style, data shown as text."""
from __future__ import annotations

import re

import requests
from playwright.sync_api import expect

from tests.browser.conftest import CHAT
from tests.browser.helpers import go, shot, sign_in
from tests.conftest import MASTER_KEY

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def test_console_responses_carry_a_strict_policy_and_no_inline_code(console_gateway):
    gw = console_gateway
    page = requests.get(gw.console, timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    files = [page]
    for src in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text):
        files.append(requests.get(gw.url + src, timeout=5))
    assert len(files) == 4  # the page, its stylesheet, Chart.js and the entry module
    for module in ("api", "dom", "charts", "keys", "usage", "logs", "replicas", "audit", "me"):
        files.append(requests.get(f"{gw.url}/ui/static/{module}.js", timeout=5))
    for resp in files:
        assert resp.status_code == 200, resp.url
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "Set-Cookie" not in resp.headers
        if resp.url.endswith(".js"):
            assert resp.headers["Content-Type"].startswith("text/javascript"), resp.url
            if "vendor" not in resp.url:  # our modules: no HTML parsing of strings, no other storage
                assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|eval\(",
                                     resp.text), resp.url
                assert not re.search(r"localStorage\.|document\.cookie|console\.(log|info|debug)", resp.text), resp.url
    assert page.headers["Cache-Control"] == "no-store"
    # no inline script, no inline style, no event-handler attribute in the page itself
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
    assert not re.search(r"\sstyle=|<style|\son[a-z]+=", page.text)
    # /ui (no slash) leads to the page; the page needs no key, the data does
    assert requests.get(gw.url + "/ui", timeout=5).url.endswith("/ui/")
    assert requests.get(gw.url + "/key/list", timeout=5).status_code == 401


def test_html_in_aliases_metadata_and_end_users_is_shown_as_text(page, console_gateway, alias):
    gw = console_gateway
    hostile = f"<img src=x onerror=alert(1)>{alias('x')}"
    end_user = f"<svg onload=alert(3)>{alias('eu')}"
    created = gw.generate(key_alias=hostile, metadata={"note": "<script>alert(2)</script><b>bold</b>"},
                          models=["<i>model</i>"], tags=["<u>tag</u>"])
    # a request with an end-user id holding markup
    plain = gw.generate(key_alias=alias("plain"))
    headers = {"Authorization": f"Bearer {plain['key']}", "x-end-user-id": end_user}
    assert requests.post(gw.url + "/vllm/v1/chat/completions", json=CHAT, headers=headers, timeout=10).status_code == 200
    gw.wait_requests(plain["key"], 1)

    sign_in(page, MASTER_KEY)
    page.get_by_label("Search by alias").fill("<img")
    page.get_by_role("button", name="Search", exact=True).click()
    row = page.locator("#keys-list tbody tr").filter(has_text=hostile)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("<i>model</i>")
    assert page.locator("#keys-list img, #keys-list i, #page script").count() == 0
    row.get_by_role("button", name=f"Details of {hostile}").click()
    details = page.get_by_role("dialog", name=f"Key {hostile}")
    expect(details).to_contain_text("<script>alert(2)</script><b>bold</b>")
    expect(details).to_contain_text("<u>tag</u>")
    assert details.locator("b, u, script, img").count() == 0
    shot(page, "xss-as-text")
    page.keyboard.press("Escape")

    # the edit form holds the same text as values, not markup
    row.get_by_role("button", name=f"Edit {hostile}").click()
    edit = page.get_by_role("dialog", name=f"Edit {hostile}")
    expect(edit.get_by_label("Alias")).to_have_value(hostile)
    expect(edit.get_by_label("Metadata (JSON object)")).to_have_value(
        '{\n  "note": "<script>alert(2)</script><b>bold</b>"\n}')
    page.keyboard.press("Escape")

    go(page, "usage", "Usage")
    expect(page.locator("#top-end-users")).to_contain_text(end_user)
    assert page.locator("#top-end-users svg, #usage-out svg").count() == 0
    go(page, "audit", "Audit")
    expect(page.locator("#audit-list")).to_contain_text(hostile)
    assert page.locator("#audit-list img").count() == 0
    assert created["key"] not in page.content()
    # the page fixture fails the test if any alert() ran


def test_without_javascript_the_sign_in_form_sends_the_key_nowhere(browser, console_gateway):
    """The form has no action and the policy says form-action 'none': pressing Enter before the
    scripts run (or with them off) must not put the key in a URL or send it anywhere."""
    gw = console_gateway
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        sent = []
        page.on("request", lambda r: sent.append((r.method, r.url)))
        page.goto(gw.console)
        page.get_by_label("Key", exact=True).fill(MASTER_KEY)
        page.get_by_label("Key", exact=True).focus()
        page.keyboard.press("Enter")
        page.wait_for_timeout(500)
        assert page.url == gw.console
        assert all(MASTER_KEY not in url for _, url in sent)
        assert ("POST", gw.console) not in sent
    finally:
        context.close()
