"""An operator (master key) in the console: keys, usage, logs, replicas, audit."""
from __future__ import annotations

import csv
import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser.helpers import (TIMEOUT, assert_accessible, assert_key_not_kept_outside_the_tab, check_page,
                                   clear_of_window_edge, drawn_bars, go, session_storage, sign_in, wait_page)
from tests.conftest import MASTER_KEY, wait_until


def key_row(page, alias):
    return page.locator("#keys-list tbody tr").filter(has=page.get_by_role("button", name=f"Details of {alias}"))


def test_operator_creates_lists_regenerates_and_blocks_a_key(page, console_gateway, alias):
    gw = console_gateway
    name = alias("ops")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    sign_in(page, MASTER_KEY)
    assert_accessible(page)

    # create, with several of the fields the API takes
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog", name="Create a key")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Alias")).to_be_focused()
    dialog.get_by_label("Alias").fill(name)
    dialog.get_by_label("Expires after").fill("30d")
    dialog.get_by_label("Models").fill("fake-model, other-model")
    dialog.get_by_label("Max budget").fill("5")
    dialog.get_by_label("Budget period").fill("30d")
    dialog.get_by_label("Requests per minute (rpm)").fill("100")
    dialog.get_by_label("Parallel requests").fill("4")
    dialog.get_by_label("Tags").fill("ops, test")
    dialog.get_by_label("Metadata (JSON object)").fill('{"owner": "ops team"}')
    check_page(page, "operator-create-dialog")
    dialog.get_by_role("button", name="Create key", exact=True).click()

    # the plaintext key, once, with a copy button
    shown = page.get_by_role("dialog", name="Key created")
    expect(shown).to_be_visible()
    first_key = shown.get_by_label(f"New key of {name}").input_value()
    assert first_key.startswith("sk-")
    copy = shown.get_by_role("button", name="Copy key")
    expect(copy).to_be_focused()
    copy.click()
    expect(shown.get_by_role("status")).to_contain_text("Copied to the clipboard")
    assert page.evaluate("navigator.clipboard.readText()") == first_key
    check_page(page, "operator-key-shown-once")
    assert "only time the key is shown" in shown.inner_text()
    info = gw.info(first_key)
    assert (info["key_alias"], info["models"], info["max_budget"], info["rpm_limit"], info["max_parallel_requests"],
            info["tags"], info["metadata"], info["budget_duration"]) == (
        name, ["fake-model", "other-model"], 5.0, 100, 4, ["ops", "test"], {"owner": "ops team"}, "30d")
    assert info["expires"] is not None
    shown.get_by_role("button", name="Done").click()
    expect(shown).to_be_hidden()
    assert first_key not in page.content()  # gone with its dialog

    # listed, and found by a search on its alias (any case)
    row = key_row(page, name)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("fake-model, other-model")
    expect(row).to_contain_text("100 rpm")
    expect(row).to_contain_text("4 parallel")
    expect(row).to_contain_text("of 5.00")
    expect(row).to_contain_text("active")
    gw.generate(key_alias=alias("unrelated"))
    page.get_by_label("Search by alias").fill(name.upper()[:10])
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#keys-list caption")).to_contain_text("starts with")
    expect(key_row(page, name)).to_have_count(1)
    for cell in page.locator("#keys-list tbody tr th").all_inner_texts():
        assert cell.lower().startswith(name[:10].lower())

    # used once: "last used" fills in
    assert gw.chat(first_key)[0].status_code == 200
    gw.wait_requests(first_key, 1)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(key_row(page, name)).not_to_contain_text("never", timeout=TIMEOUT)  # expiry set, last used set

    # regenerate with a grace period: a new key shown once; the old one works during the grace
    key_row(page, name).get_by_role("button", name=f"Regenerate {name}").click()
    regen = page.get_by_role("dialog", name=f"Regenerate {name}")
    regen.get_by_label("Grace period for the old key").fill("1h")
    regen.get_by_role("button", name="Regenerate").click()
    shown = page.get_by_role("dialog", name="Key regenerated")
    new_key = shown.get_by_label(f"New key of {name}").input_value()
    assert new_key.startswith("sk-") and new_key != first_key
    shown.get_by_role("button", name="Done").click()
    assert gw.chat(new_key)[0].status_code == 200
    assert gw.chat(first_key)[0].status_code == 200  # in its grace period
    assert gw.info(new_key)["previous_tokens"], "the old copy is listed on the new key"
    expect(page.locator("#keys-list tbody .badge.superseded")).to_have_count(1)  # the old copy, listed

    # block: the status says so, and the gateway refuses both copies
    key_row(page, name).filter(has_not=page.locator(".badge.superseded")).get_by_role(
        "button", name=f"Block {name}").click()
    head = key_row(page, name).filter(has_not=page.locator(".badge.superseded"))
    expect(head.locator(".badge")).to_have_text("blocked")
    expect(head.get_by_role("button", name=f"Unblock {name}")).to_be_visible()
    expect(page.get_by_role("status").first).to_contain_text(f"Key {name} blocked")
    assert wait_until(lambda: gw.chat(new_key)[0].status_code == 401, timeout=5)
    assert wait_until(lambda: gw.chat(first_key)[0].status_code == 401, timeout=5)
    assert gw.info(new_key)["blocked"] is True
    check_page(page, "operator-keys")

    # the audit log shows the changes
    go(page, "audit", "Audit")
    page.get_by_label("Key alias").fill(name)
    with page.expect_response(lambda r: "/audit/logs" in r.url and "key_alias=" in r.url):
        page.get_by_role("button", name="Filter").click()
    actions = page.locator("#audit-list tbody tr td:nth-child(2)")
    expect(actions).to_have_count(3, timeout=TIMEOUT)
    assert actions.all_inner_texts() == ["block", "regenerate", "generate"]
    expect(page.locator("#audit-list")).to_contain_text('"rpm_limit":100')
    check_page(page, "operator-audit")

    # no key in the URL, a cookie or localStorage; the master key only in this tab's session storage
    assert_key_not_kept_outside_the_tab(page, MASTER_KEY, first_key, new_key)
    assert MASTER_KEY in session_storage(page)
    assert first_key not in session_storage(page) and new_key not in session_storage(page)
    # and never in the gateway's log lines
    logs = gw.server.stdout.text() + gw.server.stderr.text()
    for key in (MASTER_KEY, first_key, new_key):
        assert key not in logs


def test_operator_edits_and_deletes_a_key_with_confirmation(page, console_gateway, alias):
    gw = console_gateway
    name = alias("edit")
    created = gw.generate(key_alias=name, rpm_limit=10, models=["fake-model"], metadata={"a": 1})
    sign_in(page, MASTER_KEY)
    page.get_by_label("Search by alias").fill(name)
    page.get_by_label("Search by alias").press("Enter")
    row = key_row(page, name)
    expect(row).to_have_count(1)

    row.get_by_role("button", name=f"Edit {name}").click()
    dialog = page.get_by_role("dialog", name=f"Edit {name}")
    expect(dialog.get_by_label("Requests per minute (rpm)")).to_have_value("10")
    dialog.get_by_label("Requests per minute (rpm)").fill("50")
    dialog.get_by_label("Tokens per minute (tpm)").fill("5000")
    dialog.get_by_label("Models").fill("")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog).to_be_hidden()
    expect(row).to_contain_text("50 rpm")
    expect(row).to_contain_text("5,000 tpm")
    info = gw.info(created["key"])
    assert (info["rpm_limit"], info["tpm_limit"], info["models"], info["metadata"]) == (50, 5000, [], {"a": 1})

    # a refused change names its field in the dialog
    row.get_by_role("button", name=f"Edit {name}").click()
    dialog = page.get_by_role("dialog", name=f"Edit {name}")
    dialog.get_by_label("Budget period").fill("soon")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog.get_by_role("alert")).to_contain_text("budget_duration")
    expect(dialog.get_by_label("Budget period")).to_have_attribute("aria-invalid", "true")
    dialog.press("Escape")
    expect(dialog).to_be_hidden()

    # delete asks first: cancelling (Escape) keeps the key
    row.get_by_role("button", name=f"Delete {name}").click()
    confirm = page.get_by_role("dialog", name=f"Delete {name}?")
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(confirm).to_be_hidden()
    assert gw.info(created["key"])["key_alias"] == name
    row.get_by_role("button", name=f"Delete {name}").click()
    page.get_by_role("dialog", name=f"Delete {name}?").get_by_role("button", name="Delete key").click()
    expect(key_row(page, name)).to_have_count(0)
    resp = gw.http.get(gw.url + "/key/info", params={"key": created["key"]}, headers=gw.master, timeout=5)
    assert resp.status_code == 404


def _report(gw, group_by):
    return gw.admin("GET", "/spend/report", params={"group_by": group_by, "interval": "hour"})


def test_traffic_shows_in_the_usage_chart_table_and_csv(page, console_gateway, alias):
    gw = console_gateway
    busy, quiet = alias("busy"), alias("quiet")
    busy_key = gw.generate(key_alias=busy)["key"]
    quiet_key = gw.generate(key_alias=quiet)["key"]
    end_user = alias("end-user")
    clear_of_window_edge(3600, 30)  # the chart's hourly buckets are the ones the API was asked about
    assert [r.status_code for r in gw.chat(busy_key, 3, end_user=end_user)] == [200] * 3
    assert gw.chat(quiet_key)[0].status_code == 200
    busy_token = gw.wait_requests(busy_key, 3)["token"]
    gw.wait_requests(quiet_key, 1)

    def series_of(report, group):
        return next((s for s in report["series"] if s["group"] == group), None)

    assert wait_until(lambda: (series_of(_report(gw, "key"), busy_token) or {}).get("totals", {}).get("requests") == 3)
    report = _report(gw, "key")
    api = series_of(report, busy_token)
    assert api["key_alias"] == busy
    bucket = max(i for i, n in enumerate(api["requests"]) if n)

    sign_in(page, MASTER_KEY)
    go(page, "usage", "Usage")
    expect(page.locator("#usage-spend-chart")).to_be_visible()

    # the drawn bars are the API's numbers
    for metric in ("spend", "total_tokens", "requests"):
        bars = drawn_bars(page, f"usage-{metric}-chart", busy)
        assert bars["data"] == pytest.approx(api[metric])
        tolerance = 2 * bars["pixelValue"]
        assert bars["drawn"][bucket] == pytest.approx(api[metric][bucket], abs=tolerance), metric
        assert bars["drawn"][bucket] > 0
    assert drawn_bars(page, "usage-requests-chart", busy)["drawn"][bucket] == pytest.approx(3, abs=0.05)
    assert drawn_bars(page, "usage-requests-chart", quiet)["drawn"][bucket] == pytest.approx(1, abs=0.05)
    assert api["spend"][bucket] == pytest.approx(3 * (3 * 0.001 + 5 * 0.002))

    # the same numbers as a table
    section = page.locator("#usage-spend")
    section.get_by_text("Spend as a table").click()
    table = section.locator("table")
    heads = table.locator("thead th").all_inner_texts()
    column = heads.index(busy)
    rows = table.locator("tbody tr")
    cells = rows.nth(bucket).locator("th, td").all_inner_texts()
    assert float(cells[column]) == pytest.approx(api["spend"][bucket], abs=1e-6)
    assert rows.nth(bucket).locator("th").inner_text() == report["buckets"][bucket][:13].replace("T", " ") + ":00"

    # and as CSV
    with page.expect_download() as download_info:
        section.get_by_role("button", name="Download Spend per hour, stacked by key as CSV").click()
    download = download_info.value
    assert download.suggested_filename == "usage-spend-by-key-hour.csv"
    with open(download.path(), newline="", encoding="utf-8") as handle:
        table_rows = list(csv.reader(handle))
    header, body = table_rows[0], table_rows[1:]
    assert header[0] == "bucket_start_utc" and header[-1] == "total"
    assert [row[0] for row in body] == report["buckets"]
    assert [float(row[header.index(busy)]) for row in body] == pytest.approx(api["spend"])
    assert [float(row[header.index(quiet)]) for row in body] == pytest.approx(series_of(report, gw.info(quiet_key)["token"])["spend"])

    # top keys and top end users
    top_keys = page.locator("#top-keys tbody tr").filter(has_text=busy)
    expect(top_keys.locator("td").first).to_have_text("3")
    top_users = page.locator("#top-end-users tbody tr").filter(has_text=end_user)
    expect(top_users.locator("td").first).to_have_text("3")

    # stacked by model: the model's series holds at least this traffic
    page.get_by_label("Stack by").select_option("model")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#usage-requests h2")).to_have_text("Requests per hour, stacked by model")
    model_api = series_of(_report(gw, "model"), "fake-model")
    assert drawn_bars(page, "usage-requests-chart", "fake-model")["data"] == model_api["requests"]
    page.get_by_label("Stack by").select_option("key")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#usage-requests h2")).to_have_text("Requests per hour, stacked by key")
    check_page(page, "operator-usage")


def test_logs_show_the_request_and_its_full_record(page, console_gateway, alias):
    gw = console_gateway
    name = alias("logged")
    key = gw.generate(key_alias=name)["key"]
    request_id = alias("req")
    assert gw.chat(key, request_id=request_id, end_user="log-user")[0].status_code == 200
    gw.wait_requests(key, 1)
    assert wait_until(lambda: gw.admin("GET", "/spend/logs", params={"request_id": request_id})["logs"])

    sign_in(page, MASTER_KEY)
    go(page, "logs", "Logs")
    page.get_by_label("Key alias").fill(name)
    page.get_by_role("button", name="Filter").click()
    row = page.locator("#logs-list tbody tr").filter(has_text=request_id)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("POST /v1/chat/completions")
    expect(row).to_contain_text("fake-model")
    expect(row).to_contain_text("log-user")
    expect(row).to_contain_text("3 / 5")
    check_page(page, "operator-logs")

    # the request-id search opens the full record
    page.get_by_label("Request id").fill(request_id)
    page.get_by_role("button", name="Find request").click()
    record = page.get_by_role("dialog", name=f"Request {request_id}")
    expect(record).to_be_visible()
    entry = gw.admin("GET", "/spend/logs", params={"request_id": request_id})["logs"][0]
    text = record.inner_text()
    for field in ("request_id", "token", "key_alias", "end_user", "model", "route", "status", "prompt_tokens",
                  "completion_tokens", "spend", "duration_ms"):
        assert field in text
        assert str(entry[field]) in text, field
    check_page(page, "operator-request-record")
    record.get_by_role("button", name="Close").click()
    expect(record).to_be_hidden()
    # the same record from the table's request-id link
    row.get_by_role("button", name=f"Record of request {request_id}").click()
    expect(page.get_by_role("dialog", name=f"Request {request_id}")).to_contain_text(entry["token"])
    page.keyboard.press("Escape")

    # filtered by the plaintext key: the browser sends only its token
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/spend/logs" in r.url else None)
    page.get_by_label("Key alias").fill("")
    page.get_by_label("Key or token").fill(key)
    with page.expect_response(lambda r: "/spend/logs" in r.url and "key=" in r.url) as answered:
        page.get_by_role("button", name="Filter").click()
    assert answered.value.ok and f"key={entry['token']}" in answered.value.url
    expect(page.locator("#logs-list tbody tr").filter(has_text=request_id)).to_have_count(1)
    assert sent and all(key not in url for url in sent)

    # an unknown id says so
    page.get_by_label("Request id").fill("no-such-request-id")
    page.get_by_role("button", name="Find request").click()
    expect(page.locator("#status")).to_contain_text("No request no-such-request-id")


def test_replicas_page_shows_the_fake_vllm_up_with_its_load(page, console_gateway):
    gw = console_gateway
    sign_in(page, MASTER_KEY)
    go(page, "replicas", "Replicas")
    api = gw.admin("GET", "/replicas")["replicas"]
    rows = page.locator("#replicas-out tbody tr")
    expect(rows).to_have_count(len(api))
    heads = page.locator("#replicas-out thead th").all_inner_texts()
    shown = dict(zip(heads, rows.first.locator("th, td").all_inner_texts()))
    replica, load = api[0], api[0]["vllm"]

    def figure(value, as_text=str):
        return "not reported" if value is None else as_text(value)

    assert shown["Replica"] == replica["name"]
    assert shown["State"] == replica["status"] == "up"
    assert shown["Last error"] == (replica["last_error"] or "none")
    # vLLM's own figures, read from the fake vLLM's /metrics (it serves running, waiting, KV cache)
    assert load["error"] is None and shown["vLLM metrics"] == "read"
    assert load["requests_running"] is not None and load["kv_cache_usage"] is not None
    assert shown["Running"] == figure(load["requests_running"], lambda v: f"{v:,.0f}")
    assert shown["Waiting"] == figure(load["requests_waiting"], lambda v: f"{v:,.0f}")
    assert shown["KV-cache use"] == figure(load["kv_cache_usage"], lambda v: f"{v * 100:.1f}%")
    assert shown["Preemptions"] == figure(load["preemptions_total"], lambda v: f"{v:,.0f}")
    check_page(page, "operator-replicas")
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#replicas-updated")).to_contain_text("Updated")


def test_replicas_page_shows_the_last_reconciliation_window(page, console_gateway):
    gw = console_gateway
    for _ in range(3):  # some tokens for the window
        gw.admin("POST", "/vllm/v1/chat/completions",
                 json={"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]})

    def closed_with_requests():
        window = gw.admin("GET", "/replicas")["replicas"][0].get("reconciliation")
        return window is not None and window["gateway"]["requests"] > 0
    assert wait_until(closed_with_requests, timeout=15)
    sign_in(page, MASTER_KEY)
    go(page, "replicas", "Replicas")
    table = page.locator("#reconcile-table")
    expect(table.locator("tbody tr")).to_have_count(1)
    heads = table.locator("thead th").all_inner_texts()
    shown = dict(zip(heads, table.locator("tbody tr").first.locator("th, td").all_inner_texts()))
    assert re.fullmatch(r"[0-9,]+ / [0-9,]+ \([+-]?[0-9.]+%\)", shown["Prompt tokens: gateway / vLLM (drift)"]), shown
    assert re.fullmatch(r"\d+ s, closed \d+ s ago", shown["Window"]), shown
    assert shown["Verdict"] in ("within threshold", "drift beyond 5.0% (prompt)", "drift beyond 5.0% (generation)",
                                "drift beyond 5.0% (prompt, generation)"), shown
    expect(page.locator("#reconcile-summary")).to_contain_text("over the last closed window of 2 s")


def test_every_operator_page_passes_the_accessibility_check(page, console_gateway):
    sign_in(page, MASTER_KEY)
    for name, text in (("usage", "Usage"), ("logs", "Logs"), ("replicas", "Replicas"), ("audit", "Audit"),
                       ("keys", "Keys")):
        go(page, name, text)
        expect(page.get_by_role("heading", level=1)).to_have_text(text)
        expect(page.get_by_role("heading", level=1)).to_be_focused()
        expect(page.get_by_role("link", name=text, exact=True)).to_have_attribute("aria-current", "page")
        assert_accessible(page)
    go(page, "keys", "Keys")
    page.get_by_role("button", name="Create key").click()
    assert_accessible(page)
    page.keyboard.press("Escape")
    go(page, "usage", "Usage")
    for summary in page.locator("details summary").all():
        summary.click()
    assert_accessible(page)


def test_keyboard_only_sign_in_navigation_and_dialog(page, console_gateway):
    page.goto("/ui/")
    wait_key = page.get_by_label("Key", exact=True)
    expect(wait_key).to_be_focused()
    page.keyboard.type(MASTER_KEY)
    page.keyboard.press("Enter")
    wait_page(page, "keys")
    expect(page.get_by_role("heading", level=1, name="Keys")).to_be_focused()

    # Tab (backwards, through the header) to the Audit link and follow it with Enter
    for _ in range(20):
        if page.evaluate("document.activeElement.id") == "nav-audit":
            break
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "nav-audit"
    page.keyboard.press("Enter")
    wait_page(page, "audit")
    expect(page.get_by_role("heading", level=1, name="Audit")).to_be_focused()

    # back to Keys; open the create dialog from the keyboard; Escape closes it and gives focus back
    page.keyboard.press("Shift+Tab")  # from the h1: Sign out
    page.keyboard.press("Shift+Tab")  # Audit
    page.keyboard.press("Shift+Tab")  # Replicas
    page.keyboard.press("Shift+Tab")  # Logs
    page.keyboard.press("Shift+Tab")  # Usage
    page.keyboard.press("Shift+Tab")  # Keys
    assert page.evaluate("document.activeElement.id") == "nav-keys"
    page.keyboard.press("Enter")
    wait_page(page, "keys")
    for _ in range(15):
        if page.evaluate("document.activeElement.id") == "create-key":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "create-key"
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Create a key")
    expect(dialog.get_by_label("Alias")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert page.evaluate("document.activeElement.id") == "create-key"

    # sign out from the keyboard: the key is forgotten
    for _ in range(30):
        if page.evaluate("document.activeElement.id") == "sign-out":
            break
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_label("Key", exact=True)).to_be_focused()
    assert session_storage(page) == "{}"
    assert json.loads(session_storage(page)) == {}


def test_keys_are_paged_through_the_api_never_loaded_whole(page, console_gateway, alias):
    gw = console_gateway
    prefix = alias("paged")
    for n in range(12):
        gw.generate(key_alias=f"{prefix}-{n:02d}")
    listed = []
    page.on("request", lambda r: listed.append(r.url) if "/key/list" in r.url else None)
    sign_in(page, MASTER_KEY)
    page.get_by_label("Keys per page").select_option("10")
    page.get_by_label("Search by alias").fill(prefix)
    page.get_by_role("button", name="Search", exact=True).click()
    rows = page.locator("#keys-list tbody tr")
    expect(page.locator("#keys-count")).to_have_text("Page 1 of 2 · 12 keys")
    expect(rows).to_have_count(10)
    first_page = rows.locator("th").all_inner_texts()
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#keys-count")).to_have_text("Page 2 of 2 · 12 keys")
    expect(rows).to_have_count(2)
    second_page = rows.locator("th").all_inner_texts()
    assert sorted(first_page + second_page) == [f"{prefix}-{n:02d}" for n in range(12)]
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    page.get_by_role("button", name="Previous page").click()
    expect(page.locator("#keys-count")).to_have_text("Page 1 of 2 · 12 keys")
    # every call asked for one page of at most 100 keys
    assert listed
    for url in listed:
        query = parse_qs(urlsplit(url).query)
        assert 1 <= int(query["size"][0]) <= 100 and "page" in query, url
