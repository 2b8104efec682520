"""gateway/usage/money.py: nano-dollars in, exact decimals out, floats only as exact carriers, and
the previous version's float dollars read exactly as the Lua scripts fold them."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from gateway.usage.money import (API_MAX_USD, api_nanos, as_json, exact_units, legacy_nanos, stored_nanos, to_nanos,
                                 usd_text)

NANO = Decimal("1e-9")


@given(st.integers(0, 10**15 - 1))
def test_an_amount_under_a_million_dollars_prints_as_its_exact_decimal(nanos):
    shown = as_json(nanos)
    assert Decimal(json.dumps(shown)) == nanos * NANO  # the JSON text itself, no binary noise
    assert to_nanos(shown) == nanos                   # and the float gives its nano-dollars back


@given(st.integers(10**15, 2**63 - 1))
def test_a_larger_amount_prints_rounded_to_15_significant_digits_never_noise(nanos):
    text = json.dumps(as_json(nanos))
    digits = Decimal(text).normalize().as_tuple().digits
    assert len(digits) <= 15
    assert abs(Decimal(text) - nanos * NANO) <= Decimal(nanos) * NANO / 10**14


@pytest.mark.parametrize("nanos, text", [(51_000_000, "0.051"), (0, "0.0"), (1, "1e-09"), (13_000_000_000, "13.0"),
                                         (999_999_999_999_999, "999999.999999999")])
def test_json_text(nanos, text):
    assert json.dumps(as_json(nanos)) == text


@pytest.mark.parametrize("amount, nanos", [
    (0.013, 13_000_000), (5, 5_000_000_000), (Decimal("0.0000000015"), 2), (Decimal("0.0000000025"), 3),
    (1.5e-9, 2), (0.1234567891234, 123_456_789), (0.1 + 0.2, 300_000_000), (0.0, 0),
])
def test_to_nanos_reads_dollars_half_up(amount, nanos):
    assert to_nanos(amount) == nanos


@pytest.mark.parametrize("value, places, units", [
    (Decimal("1.5e-07"), 18, 150_000_000_000), (Decimal("1e-18"), 18, 1), (Decimal("1e-19"), 18, None),
    (Decimal("1.500000000000000000000"), 18, 1_500_000_000_000_000_000), (Decimal("1e-999999999"), 9, None),
    (3, 9, 3_000_000_000), (Decimal("0.051"), 9, 51_000_000),
])
def test_exact_units_never_rounds(value, places, units):
    assert exact_units(value, places) == units


@pytest.mark.parametrize("value, says", [
    (Decimal("NaN"), "finite"), (float("nan"), "finite"), (Decimal("Infinity"), "finite"), (Decimal("-1"), "negative"),
    (Decimal(API_MAX_USD) + NANO, "at most"), (Decimal("0.0000000005"), "9 decimal places"),
    (Decimal("1234567.123456789"), "15 significant digits"), ("1", "a number"), (True, "a number"), (None, "a number"),
])
def test_api_money_refuses_what_it_cannot_keep_exactly(value, says):
    with pytest.raises(ValueError, match=says):
        api_nanos(value)


def test_api_money_accepts_up_to_the_limits():
    assert api_nanos(Decimal("999999.999999999")) == 999_999_999_999_999
    assert api_nanos(API_MAX_USD) == API_MAX_USD * 10**9
    assert api_nanos(Decimal("0.000000001")) == 1


@pytest.mark.parametrize("text, nanos", [
    ("0.051000000000000004", 51_000_000), ("1.3000000000000001e-05", 13_000), ("5", 5_000_000_000), ("0", 0),
    ("0.30000000000000004", 300_000_000), ("2.4999999999999999e-09", 3),  # the double of 2.5e-09: half up
    (None, 0), ("garbage", 0), ("inf", 0),
])
def test_legacy_float_dollars_are_rounded_to_the_nano_dollar(text, nanos):
    assert legacy_nanos(text) == nanos


LEGACY = ["0.051000000000000004", "1.3000000000000001e-05", "123.45600000000002", "0.0000000015", "7",
          "2.4999999999999999e-09", "9007199.2547409917", "0.30000000000000004", "1e-10"]


def test_the_scripts_fold_legacy_floats_to_what_python_reads(redis_client):
    """A legacy amount must read the same before its fold (Python) and after it (Lua): the same
    double arithmetic on both sides, on every Redis topology and on fakeredis."""
    folded = redis_client.eval("local out = {} for i, text in ipairs(ARGV) do "
                               "out[i] = string.format('%.0f', math.floor((tonumber(text) or 0) * 1e9 + 0.5)) end "
                               "return out", 0, *LEGACY)
    assert [int(n) for n in folded] == [legacy_nanos(text) for text in LEGACY]


def test_stored_amounts_add_the_integer_and_the_legacy_field():
    assert stored_nanos("51000000", "0.013") == 64_000_000
    assert stored_nanos(None, None) == 0 and stored_nanos("7") == 7


@pytest.mark.parametrize("nanos, text", [(26_000_000, "0.026000"), (150, "0.00000015"), (0, "0.000000"),
                                         (123_456_789_012, "123.456789012"), (10**18, "1000000000.000000")])
def test_messages_show_amounts_exactly(nanos, text):
    assert usd_text(nanos) == text
