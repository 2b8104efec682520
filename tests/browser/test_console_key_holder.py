"""A key holder (their own virtual key) in the console: their own figures, nothing of other keys."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.helpers import (TIMEOUT, assert_key_not_kept_outside_the_tab, check_page,
                                   clear_of_window_edge, drawn_bars, session_storage, sign_in, wait_page)


def test_a_key_holder_sees_only_their_own_figures(page, console_gateway, alias):
    gw = console_gateway
    mine, theirs = alias("holder"), alias("stranger")
    created = gw.generate(key_alias=mine, models=["fake-model"], allowed_routes=["/v1/chat/completions"],
                          max_budget=2.0, budget_duration="30d", rpm_limit=20, tpm_limit=10000, duration="7d")
    other = gw.generate(key_alias=theirs, max_budget=9.0, metadata={"secret": "stranger-metadata"})
    clear_of_window_edge(86400, 30)  # the daily buckets the API and the page are asked about are the same
    clear_of_window_edge(60, 25)  # rpm/tpm "used this minute" is read back within the same minute
    assert [r.status_code for r in gw.chat(created["key"], 2)] == [200, 200]
    assert [r.status_code for r in gw.chat(other["key"], 3, end_user="stranger-user")] == [200] * 3
    info = gw.wait_requests(created["key"], 2)
    gw.wait_requests(other["key"], 3)

    sign_in(page, created["key"], expect_page="me")
    expect(page.get_by_role("heading", level=1)).to_have_text("My key")
    nav = page.get_by_role("navigation", name="Console pages")
    assert nav.get_by_role("link").all_inner_texts() == ["My key"]
    expect(page.locator("#who-text")).to_have_text(f"Key holder: {mine}")

    summary = page.locator("#me-summary")
    expect(summary).to_contain_text(mine)
    expect(summary).to_contain_text(created["key_name"])
    expect(summary).to_contain_text("fake-model")
    expect(summary).to_contain_text("/v1/chat/completions")
    expect(summary).to_contain_text(f"{info['spend']:.3f} of 2.00")
    expect(summary).to_contain_text(info["budget_reset_at"].replace("T", " ").replace("Z", " UTC"))
    expect(summary).to_contain_text(info["expires"].replace("T", " ").replace("Z", " UTC"))
    limits = page.locator("#me-summary .limits-table tbody tr")
    rpm = limits.filter(has_text="Requests per minute").locator("td").all_inner_texts()
    assert rpm[:3] == ["20", "2", "18"]  # size, used, remaining this minute
    tpm = limits.filter(has_text="Tokens per minute").locator("td").all_inner_texts()
    assert tpm[:3] == ["10,000", "16", "9,984"]
    expect(limits.filter(has_text="Parallel requests")).to_contain_text("no limit")

    # the usage chart draws what /key/usage says
    usage = gw.admin("GET", "/key/usage", params={"key": created["token"], "interval": "day"})
    assert usage["totals"]["requests"] == 2
    day = max(i for i, n in enumerate(usage["requests"]) if n)
    for metric in ("spend", "total_tokens", "requests"):
        bars = drawn_bars(page, f"me-{metric}-chart", "your key")
        assert bars["data"] == pytest.approx(usage[metric])
        assert bars["drawn"][day] == pytest.approx(usage[metric][day], abs=2 * bars["pixelValue"])
    check_page(page, "key-holder")

    # nothing about the other key anywhere on the page
    text = page.locator("body").inner_text() + page.content()
    for secret in (theirs, other["token"], other["key"], "stranger-metadata", "stranger-user"):
        assert secret not in text
    # the operator pages are not there for a key: a typed-in route falls back to the key's own page
    page.evaluate("location.hash = '#keys'")
    wait_page(page, "me")
    expect(page.get_by_role("heading", level=1)).to_have_text("My key")
    assert "#me" in page.url

    assert_key_not_kept_outside_the_tab(page, created["key"])
    assert created["key"] in session_storage(page)

    # the key blocked while signed in: the next call is refused and the tab signs out, saying why
    gw.admin("POST", "/key/block", json={"key": created["key"]})
    page.wait_for_timeout(1200)  # the gateway's key cache lives under a second
    page.get_by_role("button", name="Refresh").click()
    expect(page.get_by_label("Key", exact=True)).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#signin-error")).to_contain_text("refused the key")
    assert session_storage(page) == "{}"
    assert "#" not in page.url


def test_a_wrong_key_is_refused_and_nothing_is_kept(page, console_gateway):
    wrong = "sk-this-is-not-a-key-of-this-gateway"
    sign_in(page, wrong, expect_page=None)
    error = page.locator("#signin-error")
    expect(error).to_contain_text("Sign-in refused")
    expect(error).to_be_visible()
    expect(page.get_by_role("navigation", name="Console pages")).to_be_hidden()
    expect(page.get_by_label("Key", exact=True)).to_be_focused()
    assert session_storage(page) == "{}"
    assert_key_not_kept_outside_the_tab(page, wrong)
    assert page.locator("#page").inner_text() == ""
    check_page(page, "sign-in-refused")
    # the console's own JSON calls were all refused; nothing is reachable without signing in
    page.evaluate("location.hash = '#keys'")
    expect(page.get_by_label("Key", exact=True)).to_be_visible()
    expect(page.get_by_role("navigation", name="Console pages")).to_be_hidden()
