"""gateway/core/timefmt.py: timestamps as ISO-8601 UTC with a Z."""
from __future__ import annotations

import pytest

from gateway.core.timefmt import iso


def test_none_stays_none():
    assert iso(None) is None
    assert iso(None, timespec="milliseconds") is None


@pytest.mark.parametrize("epoch, expected", [
    (0, "1970-01-01T00:00:00Z"),
    (1769860800, "2026-01-31T12:00:00Z"),
    (1769860800.987, "2026-01-31T12:00:00Z"),   # fraction dropped, not rounded up
])
def test_seconds_in_utc_with_z(epoch, expected):
    assert iso(epoch) == expected


@pytest.mark.parametrize("epoch, expected", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1769860800.123, "2026-01-31T12:00:00.123Z"),
    (1769860800.5, "2026-01-31T12:00:00.500Z"),
])
def test_milliseconds_in_utc_with_z(epoch, expected):
    assert iso(epoch, timespec="milliseconds") == expected


def test_no_utc_offset_is_left_in_the_text():
    assert "+00:00" not in iso(1769860800.5, timespec="milliseconds")
