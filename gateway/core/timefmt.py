"""Timestamps as the API shows them: ISO-8601 in UTC with a `Z`."""
from __future__ import annotations

from datetime import datetime, timezone


def iso(epoch: float | None, timespec: str = "seconds") -> str | None:
    """Seconds since the epoch as `2026-01-31T12:00:00Z` (`timespec="milliseconds"`:
    `…:00.123Z`); None stays None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")
