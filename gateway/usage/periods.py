"""Budget periods: which period a moment falls in, when it started and when it resets.

Two ways to cut a `budget_duration` into periods (BUDGET_RESETS):

- `creation` (the default, and what this gateway always did): periods of exactly the duration,
  counted from the key's (or team's) creation. A key made at 14:37 with `1d` resets at 14:37.
- `calendar` (LiteLLM's "predictable reset times"): periods start at midnight in BUDGET_TIMEZONE
  (an IANA name, default UTC; daylight-saving changes are followed):
    1d (= 24h)         every day at midnight
    7d (= 1w)          every Monday at midnight
    30d (= 1mo)        the 1st of every month at midnight
    N days / weeks / months (N x 1d, 1w or 1mo)
                       blocks of N of them, counted from 1970-01-01 (weeks: Monday 1970-01-05,
                       months: January 1970), so every key and instance agrees on the edges
    anything else      blocks of the duration aligned to the clock (1h: on the hour; 15m: at
                       :00, :15, :30, :45), counted in local time
  All keys with one duration then reset together, whenever they were made.

A period is named by a string every worker computes alike: the period's index for `creation`,
`c<start, Unix seconds>` for `calendar`, and "all" without a duration. Budget scripts replace a
stored period only by a newer one of the same kind (gateway/usage/budgets.py `newer`); switching
BUDGET_RESETS starts a new period for every key at its next request.
"""
from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.core.durations import parse_duration

RESET_MODES = ("creation", "calendar")
DAY = 86400
WEEK = 7 * DAY
MONTH = 30 * DAY  # what `mo` means in durations (gateway/core/durations.py)
_MONDAY_1970 = datetime.date(1970, 1, 5)
_EPOCH_DAY = datetime.date(1970, 1, 1)


def timezone(name: str) -> ZoneInfo:
    """The zone for BUDGET_TIMEZONE; ValueError naming the setting when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"BUDGET_TIMEZONE {name!r} is not an IANA time zone such as UTC or Europe/Paris") from None


class BudgetCalendar:
    """How this deployment cuts budget durations into periods (one per process, configured at
    start-up from the settings; tests configure their own)."""

    def __init__(self, mode: str = "creation", zone: str = "UTC"):
        if mode not in RESET_MODES:
            raise ValueError(f"BUDGET_RESETS must be creation or calendar, got {mode!r}")
        self.mode = mode
        self.zone = timezone(zone)

    def bounds(self, record: dict, now: float) -> tuple[str, float | None, float | None]:
        """(period name, start, reset at) of the period `now` falls in, for a key or team record
        (`budget_duration`, `created_epoch`); (\"all\", None, None) without a duration."""
        duration = record.get("budget_duration")
        if not duration:
            return "all", None, None
        seconds = parse_duration(duration)
        if self.mode == "creation":
            origin = record.get("created_epoch", 0)
            index = int((now - origin) // seconds)
            return str(index), origin + index * seconds, origin + (index + 1) * seconds
        start, end = self._calendar(seconds, now)
        return f"c{int(start)}", start, end

    def _calendar(self, seconds: int, now: float) -> tuple[float, float]:
        local = datetime.datetime.fromtimestamp(now, self.zone)
        if seconds % MONTH == 0:
            months = seconds // MONTH
            index = ((local.year - 1970) * 12 + local.month - 1) // months * months
            return self._month(index), self._month(index + months)
        if seconds % WEEK == 0:
            return self._days(local.date(), _MONDAY_1970, seconds // DAY)
        if seconds % DAY == 0:
            return self._days(local.date(), _EPOCH_DAY, seconds // DAY)
        # Sub-day (or odd) durations: aligned to the local clock.
        offset = local.utcoffset().total_seconds()
        start = (now + offset) // seconds * seconds - offset
        return start, start + seconds

    def _days(self, today: datetime.date, anchor: datetime.date, days: int) -> tuple[float, float]:
        first = anchor + datetime.timedelta(days=(today - anchor).days // days * days)
        return self._midnight(first), self._midnight(first + datetime.timedelta(days=days))

    def _month(self, index: int) -> float:
        return self._midnight(datetime.date(1970 + index // 12, index % 12 + 1, 1))

    def _midnight(self, day: datetime.date) -> float:
        return datetime.datetime.combine(day, datetime.time(), self.zone).timestamp()


# The process's calendar: gateway start-up replaces it from BUDGET_RESETS / BUDGET_TIMEZONE.
_calendar = BudgetCalendar()


def configure(mode: str, zone: str) -> None:
    global _calendar
    _calendar = BudgetCalendar(mode, zone)


def calendar() -> BudgetCalendar:
    return _calendar
