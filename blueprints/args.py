"""Query arguments of the admin routes, parsed one way everywhere.

Whole numbers are ASCII digits only: `str.isdigit` accepts '²' (which `int` then refuses, a 500
before this module existed) and `int` accepts '١٢', ' 12 ' and '1_2'. An argument a route does
not know is a 400 naming it, rather than a filter silently ignored (a typo'd filter returning
everything looks exactly like a match).
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from flask import request

from gateway.core.errors import GatewayError

_WHOLE = re.compile(r"[0-9]{1,15}")
_EPOCH = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


def only_args(*allowed: str) -> None:
    """400 for the first query argument this route does not take."""
    for name in request.args:
        if name not in allowed:
            raise GatewayError(400, f"{name}: unknown query argument; this route takes "
                               + ", ".join(sorted(allowed)), param=name)


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """A whole number between `low` and `high`; absent or empty gives `default`."""
    raw = request.args.get(name, "")
    if raw == "":
        return default
    if not _WHOLE.fullmatch(raw) or not low <= int(raw) <= high:
        raise GatewayError(400, f"{name}: must be a whole number from {low} to {high}", param=name)
    return int(raw)


def choice_arg(name: str, choices, default: str) -> str:
    """One of `choices` (the default when absent or empty), else 400 naming them."""
    raw = request.args.get(name, "") or default
    if raw not in choices:
        raise GatewayError(400, f"{name}: must be one of " + ", ".join(choices), param=name)
    return raw


def bool_arg(name: str, default: bool = False) -> bool:
    raw = request.args.get(name, "").lower()
    if raw == "":
        return default
    if raw not in ("true", "false", "1", "0"):
        raise GatewayError(400, f"{name}: must be true or false", param=name)
    return raw in ("true", "1")


def time_arg(name: str) -> float | None:
    """ISO-8601 (date or date-time; UTC unless it says otherwise) or epoch seconds."""
    raw = request.args.get(name, "")
    if raw == "":
        return None
    if _EPOCH.fullmatch(raw):
        return float(raw)
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    except (ValueError, OverflowError):
        raise GatewayError(400, f"{name}: use ISO-8601 (2026-01-31 or 2026-01-31T12:00:00Z) or epoch seconds",
                           param=name) from None


def time_range(start_name: str = "start_date", end_name: str = "end_date") -> tuple[float | None, float | None]:
    start, end = time_arg(start_name), time_arg(end_name)
    if start is not None and end is not None and start > end:
        raise GatewayError(400, f"{start_name}: must not be after {end_name}", param=start_name)
    return start, end


def report_window(interval: str) -> tuple[float, float]:
    """start_date/end_date of a usage report; by default up to now, 24 hourly or 30 daily buckets
    (the last one partial)."""
    start, end = time_range()
    end = time.time() if end is None else end
    if start is None:
        start = end - (29 * 86400 if interval == "day" else 23 * 3600)
    if start > end:
        raise GatewayError(400, "start_date: must not be after end_date", param="start_date")
    return start, end
