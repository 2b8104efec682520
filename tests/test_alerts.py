"""Budget alerts: threshold arithmetic, the event body, the signature (pure), and the Redis side —
once per threshold per period and the outbox's claims — on every Redis topology of conftest."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from fractions import Fraction

import pytest
import redis

from gateway.alerts import once
from gateway.alerts.once import MAX_MARKER_TTL, AlertNames, OnceGate, marker_ttl
from gateway.alerts.thresholds import (NANO_USD, Budget, crossings, levels, parse_thresholds, threshold_amount,
                                       threshold_name)
from gateway.alerts.webhook import DeliveryPolicy, Outbox, check_url, encode, event_body, sign, verify_signature
from gateway.core.redisconn import Incidents

USD = NANO_USD
THRESHOLDS = parse_thresholds("0.5,0.8,1.0")
KEY = Budget("key", "a" * 64, max_budget=10 * USD, alias="alice")
NOW = 1_780_000_000.0


# -- thresholds (pure) ---------------------------------------------------------------------------
def test_thresholds_read_as_fractions_or_percentages():
    assert parse_thresholds("0.5, 0.8,1") == parse_thresholds("50%,80%,100%") == THRESHOLDS
    assert THRESHOLDS == (Fraction(1, 2), Fraction(4, 5), Fraction(1))
    assert parse_thresholds([1.0, 0.8, 0.8]) == (Fraction(4, 5), Fraction(1))  # sorted, no duplicates
    assert parse_thresholds("") == ()


@pytest.mark.parametrize("text", ["0", "1.5", "-0.2", "abc", "110%", ",".join(str(i / 100) for i in range(1, 12))])
def test_bad_thresholds_are_refused(text):
    with pytest.raises(ValueError):
        parse_thresholds(text)


def test_threshold_names_and_exact_amounts():
    assert [threshold_name(f) for f in THRESHOLDS] == ["50%", "80%", "100%"]
    assert threshold_name(Fraction(1, 8)) == "12.5%"
    assert threshold_amount(300_000_000, Fraction(4, 5)) == 240_000_000  # 80% of 0.30 USD, no float noise
    assert threshold_amount(3, Fraction(1, 2)) == 2                         # rounded up: never fires early


@pytest.mark.parametrize("before, after, expected", [
    (0, 4 * USD, []),
    (0, 5 * USD, ["50%"]),                        # reaching the amount counts
    (5 * USD, 6 * USD, []),                       # already past it before this settle
    (4 * USD, 9 * USD, ["50%", "80%"]),           # several at once, lowest first
    (9 * USD, 12 * USD, ["100%"]),
    (6 * USD, 6 * USD, []),
    (7 * USD, 6 * USD, []),
])
def test_a_settle_crosses_the_levels_between_before_and_after(before, after, expected):
    assert [c.threshold for c in crossings(KEY, THRESHOLDS, before, after)] == expected


def test_soft_budget_is_a_level_of_its_own_with_or_without_max_budget():
    both = Budget("team", "t1", max_budget=10 * USD, soft_budget=3 * USD)
    assert [(c.threshold, c.event) for c in crossings(both, THRESHOLDS, 0, 5 * USD)] == [
        ("soft_budget", "soft_budget_crossed"), ("50%", "threshold_crossed")]
    soft_only = Budget("key", "b" * 64, soft_budget=USD)
    assert [c.threshold for c in crossings(soft_only, THRESHOLDS, 0, 2 * USD)] == ["soft_budget"]
    assert crossings(Budget("key", "c" * 64), THRESHOLDS, 0, 99 * USD) == []
    assert [c.event for c in crossings(KEY, THRESHOLDS, 0, 10 * USD)][-1] == "budget_crossed"


def test_a_zero_budget_never_alerts():
    assert crossings(Budget("key", "z" * 64, max_budget=0), THRESHOLDS, 0, 0) == []


@pytest.mark.parametrize("fields", [dict(scope="user"), dict(id=""), dict(id="x" * 300), dict(max_budget=1.5),
                                    dict(soft_budget=-1), dict(max_budget=True)])
def test_budget_refuses_what_it_cannot_count(fields):
    with pytest.raises(ValueError):
        Budget(**{"scope": "key", "id": "k", **fields})


def test_spend_must_be_integer_nano_dollars():
    with pytest.raises(ValueError):
        crossings(KEY, THRESHOLDS, 0, 5.0)


# -- the event body and the signature (pure) -----------------------------------------------------
def _body(budget=KEY, spend=8 * USD, period="3", threshold="80%"):
    crossing = next(c for c in levels(budget, THRESHOLDS) if c.threshold == threshold)
    return event_body(budget, crossing, spend, period, now=NOW, period_start=NOW - 60, reset_at=NOW + 3600)


def test_event_body_has_litellms_fields_and_ours():
    body = _body()
    assert body["event"] == "threshold_crossed" and body["event_group"] == "key"
    assert body["event_message"] == "Key budget: 80% of max_budget crossed"
    assert body["token"] == "a" * 64 and body["key_alias"] == "alice" and body["team_alias"] is None
    assert (body["spend"], body["max_budget"], body["soft_budget"], body["threshold_spend"]) == (8.0, 10.0, None, 8.0)
    assert body["budget_period"] == "3"
    assert body["budget_reset_at"] == "2026-05-28T21:26:40Z" and body["budget_period_start"] == "2026-05-28T20:25:40Z"
    assert body["timestamp"] == "2026-05-28T20:26:40.000Z"
    assert body["event_id"].startswith("evt_")


def test_team_events_name_the_team():
    team = Budget("team", "team-1", max_budget=10 * USD, alias="research")
    body = _body(team)
    assert (body["event_group"], body["team_id"], body["team_alias"], body["token"]) == ("team", "team-1", "research",
                                                                                          None)


def test_money_is_shown_as_exact_decimals():
    text = encode(_body(spend=51_000_000))
    assert '"spend":0.051,' in text


def test_alias_is_bounded():
    assert len(_body(Budget("key", "k", max_budget=10 * USD, alias="x" * 5000))["key_alias"]) == 256


def test_event_id_is_the_same_for_the_same_crossing_only():
    assert _body()["event_id"] == _body()["event_id"]
    assert _body()["event_id"] != _body(period="4")["event_id"]
    assert _body()["event_id"] != _body(Budget("key", "a" * 64, max_budget=20 * USD))["event_id"]


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    secret, body = b"whsec-test", b'{"a":1}'
    expected = hmac.new(secret, b"1780000000." + body, hashlib.sha256).hexdigest()
    assert sign(secret, 1_780_000_000, body) == "sha256=" + expected
    header = sign(secret, 1_780_000_000, body)
    assert verify_signature(secret, body, "1780000000", header, now=1_780_000_100)
    assert not verify_signature(b"other", body, "1780000000", header, now=1_780_000_100)
    assert not verify_signature(secret, body + b" ", "1780000000", header, now=1_780_000_100)
    assert not verify_signature(secret, body, "1780000000", header, now=1_780_000_301)  # replayed late
    assert not verify_signature(secret, body, None, header)
    assert not verify_signature(secret, body, "１７８", header)     # non-ASCII digits are no timestamp
    assert not verify_signature(secret, body, "1780000001", header, now=1_780_000_001)  # timestamp is signed


def test_backoff_doubles_up_to_the_cap_with_jitter():
    policy = DeliveryPolicy(backoff_base=2, backoff_cap=60)
    assert [policy.backoff(n, rand=lambda: 1.0) for n in (1, 2, 3, 6, 7, 50)] == [2, 4, 8, 60, 60, 60]
    assert policy.backoff(3, rand=lambda: 0.0) == 4   # jitter keeps at least half


@pytest.mark.parametrize("fields", [dict(max_attempts=0), dict(lease=10, connect_timeout=2, read_timeout=5),
                                    dict(backoff_base=0), dict(max_age=8 * 86400)])
def test_delivery_policy_refuses_unsafe_settings(fields):
    with pytest.raises(ValueError):
        DeliveryPolicy(**fields)


def test_url_check_never_repeats_the_url():
    for url in ("ftp://hooks.example/x?token=s3cr3t", "https:///path?token=s3cr3t", "s3cr3t",
                "http://[s3cr3t/x", "http://hooks.example:s3cr3t/x"):
        with pytest.raises(ValueError) as refused:
            check_url(url)
        assert "s3cr3t" not in str(refused.value)
    assert check_url("https://hooks.example/x?token=s3cr3t") == "/x?token=s3cr3t"


def test_marker_outlives_its_period_by_a_day_and_is_bounded():
    assert marker_ttl(NOW + 3600, NOW) == 3600 + 86400
    assert marker_ttl(NOW - 10, NOW) == 86400                 # a settle just after the reset
    assert marker_ttl(None, NOW) == MAX_MARKER_TTL             # no resets: as long as allowed
    assert marker_ttl(NOW + 10 * 365 * 86400, NOW) == MAX_MARKER_TTL


# -- once per threshold per period (Redis) ---------------------------------------------------------
@pytest.fixture
def names(redis_client):
    return AlertNames(redis_client.test_prefix)


def _gate(redis_client, names, counted=None, max_pending=100):
    count = (lambda outcome, n=1: counted.append((outcome, n))) if counted is not None else None
    return OnceGate(Outbox(redis_client, names, max_pending=max_pending), names, THRESHOLDS, count=count)


def test_two_workers_fire_a_crossing_once(redis_client, names):
    first, second = _gate(redis_client, names), _gate(redis_client, names)
    assert first.fire(KEY, "3", 4 * USD, 9 * USD, now=NOW) == ["50%", "80%"]
    assert second.fire(KEY, "3", 4 * USD, 9 * USD, now=NOW) == []          # the same settle seen twice
    assert second.fire(KEY, "3", 0, 8 * USD, now=NOW) == []
    assert first.outbox.pending() == 2
    assert first.fired(KEY, "3") == ["50%", "80%"]


def test_a_new_period_fires_again(redis_client, names):
    gate = _gate(redis_client, names)
    assert gate.fire(KEY, "3", 0, 6 * USD, now=NOW) == ["50%"]
    assert gate.fire(KEY, "4", 0, 6 * USD, now=NOW) == ["50%"]
    assert gate.fired(KEY, "5") == []


def test_a_raised_budget_arms_its_thresholds_again(redis_client, names):
    gate = _gate(redis_client, names)
    assert gate.fire(KEY, "all", 0, 6 * USD, now=NOW) == ["50%"]
    raised = Budget("key", KEY.id, max_budget=20 * USD)
    assert gate.fire(raised, "all", 6 * USD, 11 * USD, now=NOW) == ["50%"]


def test_markers_expire_a_day_after_the_period(redis_client, names):
    gate = _gate(redis_client, names)
    gate.fire(KEY, "3", 0, 5 * USD, now=NOW, reset_at=NOW + 3600)
    marker = names.sent("key", KEY.id, "3", "50%", 5 * USD)
    assert 86400 < redis_client.ttl(marker) <= 86400 + 3600


def test_a_full_outbox_refuses_and_counts(redis_client, names):
    counted = []
    gate = _gate(redis_client, names, counted, max_pending=1)
    assert gate.fire(KEY, "3", 0, 9 * USD, now=NOW) == ["50%"]
    assert ("overflow", 1) in counted and ("queued", 1) in counted
    assert gate.fired(KEY, "3") == ["50%"]     # the refused one is not marked as sent


def test_redis_down_loses_the_alert_without_raising(caplog, monkeypatch):
    monkeypatch.setattr(once, "incidents", Incidents())   # a fresh incident: its one line is ours to see
    names = AlertNames("test-down:")
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2,
                       decode_responses=True)
    counted = []
    gate = _gate(dead, names, counted)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert gate.fire(KEY, "3", 0, 9 * USD, now=NOW) == []
        assert gate.fire(KEY, "4", 0, 9 * USD, now=NOW) == []
    assert counted == [("lost", 2), ("lost", 2)]
    lines = [r.getMessage() for r in caplog.records if "Budget alerts" in r.getMessage()]
    assert len(lines) == 1 and "never sent twice" in lines[0]   # one line per incident, not per alert


def test_no_crossing_means_no_redis_call():
    gate = OnceGate(None, AlertNames("unused:"), THRESHOLDS)   # no outbox: any use would fail
    assert gate.fire(KEY, "3", 6 * USD, 7 * USD, now=NOW) == []


# -- the outbox's claims (Redis) -------------------------------------------------------------------
def _queued(redis_client, names, spend=9 * USD):
    gate = _gate(redis_client, names)
    gate.fire(KEY, "3", 0, spend, now=NOW)
    return gate.outbox


def test_a_claim_is_exclusive_for_its_lease(redis_client, names):
    outbox = _queued(redis_client, names, spend=5 * USD)
    claim = outbox.claim(lease=30)
    assert claim.attempt == 1 and json.loads(claim.body)["threshold"] == "50%"
    assert outbox.claim(lease=30) is None
    assert outbox.finish(claim)
    assert outbox.pending() == 0 and redis_client.hlen(names.events) == 0


def test_a_stale_claim_cannot_finish_or_reschedule_the_next_one(redis_client, names):
    outbox = _queued(redis_client, names, spend=5 * USD)
    stale = outbox.claim(lease=0.001)
    deadline = time.monotonic() + 5
    current = None
    while current is None and time.monotonic() < deadline:   # the lease runs out on Redis' clock
        current = outbox.claim(lease=30)
    assert current is not None and current.attempt == 2
    assert not outbox.finish(stale) and not outbox.retry(stale, 0)
    assert outbox.pending() == 1 and outbox.finish(current)


def test_a_retry_waits_its_delay(redis_client, names):
    outbox = _queued(redis_client, names, spend=5 * USD)
    claim = outbox.claim(lease=30)
    assert outbox.retry(claim, 60)
    assert outbox.claim(lease=30) is None
    assert redis_client.zscore(names.due, claim.event_id) >= claim.now + 59


def test_every_counted_outcome_is_listed_for_the_metric():
    import re
    from pathlib import Path

    import gateway.alerts as alerts

    source = "".join(Path(module.__file__).read_text() for module in (once, alerts.webhook))
    assert set(re.findall(r'count\("([a-z]+)"', source)) == set(alerts.OUTCOMES)
