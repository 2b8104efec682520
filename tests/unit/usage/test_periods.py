"""Budget periods (gateway/usage/periods.py): from creation, or aligned to the calendar."""
import datetime

import pytest

from gateway.core.config import ConfigError, load_settings
from gateway.usage.periods import BudgetCalendar


def at(text: str, zone: str = "UTC") -> float:
    """Unix seconds of a local ISO date-time in `zone`."""
    from zoneinfo import ZoneInfo
    return datetime.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def bounds(mode, zone, duration, now, created="2026-01-10T14:37:00"):
    record = {"budget_duration": duration, "created_epoch": at(created)}
    return BudgetCalendar(mode, zone).bounds(record, now)


def test_without_a_duration_there_is_one_period():
    assert BudgetCalendar("calendar").bounds({"created_epoch": 5}, 1e9) == ("all", None, None)


def test_creation_periods_count_whole_durations_from_creation():
    name, start, end = bounds("creation", "UTC", "1d", at("2026-01-12T10:00:00"))
    assert (name, start, end) == ("1", at("2026-01-11T14:37:00"), at("2026-01-12T14:37:00"))


@pytest.mark.parametrize("duration, now, start, end", [
    ("1d", "2026-03-15T23:59:59", "2026-03-15T00:00:00", "2026-03-16T00:00:00"),
    ("24h", "2026-03-15T00:00:00", "2026-03-15T00:00:00", "2026-03-16T00:00:00"),
    ("7d", "2026-03-15T12:00:00", "2026-03-09T00:00:00", "2026-03-16T00:00:00"),  # Sunday: week from Monday
    ("1w", "2026-03-16T00:00:00", "2026-03-16T00:00:00", "2026-03-23T00:00:00"),
    ("30d", "2026-02-28T18:00:00", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
    ("1mo", "2026-12-31T23:00:00", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("3mo", "2026-05-20T00:00:00", "2026-04-01T00:00:00", "2026-07-01T00:00:00"),  # quarters
    ("1h", "2026-03-15T10:59:59", "2026-03-15T10:00:00", "2026-03-15T11:00:00"),
    ("15m", "2026-03-15T10:44:00", "2026-03-15T10:30:00", "2026-03-15T10:45:00"),
])
def test_calendar_periods_start_at_midnight_monday_the_first_or_on_the_clock(duration, now, start, end):
    name, got_start, got_end = bounds("calendar", "UTC", duration, at(now))
    assert (got_start, got_end) == (at(start), at(end))
    assert name == f"c{int(at(start))}"


def test_calendar_periods_are_the_same_whenever_the_key_was_made():
    now = at("2026-03-15T12:00:00")
    assert bounds("calendar", "UTC", "1d", now, created="2026-01-01T03:00:00") == \
        bounds("calendar", "UTC", "1d", now, created="2026-03-14T22:10:00")


def test_calendar_days_follow_the_time_zone_and_daylight_saving():
    # Paris moves to summer time on 2026-03-29: that day is 23 hours long.
    name, start, end = bounds("calendar", "Europe/Paris", "1d", at("2026-03-29T12:00:00", "Europe/Paris"))
    assert start == at("2026-03-29T00:00:00", "Europe/Paris") and end - start == 23 * 3600
    # Midnight in Kolkata (+05:30) is 18:30 UTC; an hour there starts at :30 UTC.
    _, start, _ = bounds("calendar", "Asia/Kolkata", "1d", at("2026-03-15T20:00:00"))
    assert start == at("2026-03-15T18:30:00")
    _, start, end = bounds("calendar", "Asia/Kolkata", "1h", at("2026-03-15T20:10:00"))
    assert (start, end) == (at("2026-03-15T19:30:00"), at("2026-03-15T20:30:00"))


def test_the_settings_refuse_an_unknown_mode_or_zone_in_one_line():
    base = {"HOSTED_VLLM_API_BASE": "http://vllm:8000", "LITELLM_MASTER_KEY": "sk-" + "k" * 32}
    settings = load_settings({**base, "BUDGET_RESETS": "Calendar", "BUDGET_TIMEZONE": "Europe/Paris"})
    assert (settings.budget_resets, settings.budget_timezone) == ("calendar", "Europe/Paris")
    assert load_settings(base).budget_resets == "creation"
    with pytest.raises(ConfigError, match="BUDGET_RESETS must be creation or calendar"):
        load_settings({**base, "BUDGET_RESETS": "weekly"})
    with pytest.raises(ConfigError, match="BUDGET_TIMEZONE 'Mars/Olympus' is not an IANA time zone"):
        load_settings({**base, "BUDGET_TIMEZONE": "Mars/Olympus"})
