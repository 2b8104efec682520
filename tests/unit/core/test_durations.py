"""gateway/core/durations.py: LiteLLM's duration grammar, matched on the whole string."""
from __future__ import annotations

import pytest

from gateway.core.durations import MAX_SECONDS, parse_duration


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30),
    ("15m", 15 * 60),
    ("12h", 12 * 3600),
    ("30d", 30 * 86400),
    ("2w", 14 * 86400),
    ("1mo", 30 * 86400),
    ("3mo", 90 * 86400),
    ("1s", 1),
    (" 30d ", 30 * 86400),   # surrounding whitespace is ignored
    ("36500d", MAX_SECONDS),  # exactly 100 years
])
def test_valid_durations_give_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "30dx", "30d ago", "x30d", "30 d", "1mon", "1mos", "30s30s",   # whole string must match
    "30y", "30ms", "30S", "30D", "1MO", "30",  "d", "mo",          # bad or missing unit
    "0s", "030s", "-1d", "+1d", "1.5h", "1e3s", "",  "   ",         # bad number
    "\u0663\u0660d",                                                 # non-ASCII digits
    "12345678901s",                                                  # more than 10 digits
])
def test_invalid_durations_raise_a_clear_value_error(text):
    with pytest.raises(ValueError) as err:
        parse_duration(text)
    assert "is not a duration" in str(err.value)
    assert "s, m, h, d, w, mo" in str(err.value)


@pytest.mark.parametrize("value", [30, 30.0, None, True, b"30d", ["30d"]])
def test_non_strings_raise_value_error(value):
    with pytest.raises(ValueError, match="must be a string"):
        parse_duration(value)


@pytest.mark.parametrize("text", ["36501d", "5215w", "1217mo", "9999999999s"])
def test_durations_over_100_years_are_refused(text):
    with pytest.raises(ValueError, match="longer than 100 years"):
        parse_duration(text)
