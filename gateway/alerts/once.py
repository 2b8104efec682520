"""Once per threshold per budget period, across workers and gateway instances.

A crossing (gateway/alerts/thresholds.py) becomes an alert through one Lua script that checks
and sets a marker (`sent:…`, SET with a TTL, only if absent) and puts the event in the webhook
outbox (gateway/alerts/webhook.py) in the same step: an alert is either marked *and* queued, or
neither. Whichever worker or instance runs it first wins; any later attempt for the same
threshold of the same budget in the same period finds the marker and queues nothing.

A threshold is its name *and* amount ("80%" of 10 USD is not "80%" of 20 USD): raising
max_budget mid-period (LiteLLM users' way to top up a key without a reset) arms its
thresholds again.

The marker outlives its period by a day (late settles of the previous period, clock skew
between gateway hosts), bounded to MAX_MARKER_TTL; a budget without resets ("all") keeps
markers that long. Once a marker expires nothing re-fires by itself: spend within a period
only grows, so its thresholds are not crossed again.

Redis unreachable (or refusing) when a crossing happens: the alert is not sent — not queued,
not marked — and `count("lost")` with one log line per incident; the settle is not delayed
beyond the one failing round trip, and nothing is retried later, so an outage can lose an
alert but never send one twice (the next settle is already past the threshold). The script is
atomic, so a reply lost after it ran leaves the alert marked and queued: it is delivered once.
A full outbox (`max_pending`) refuses new alerts (`count("overflow")`, one log line each).
"""
from __future__ import annotations

import logging

from gateway.alerts.thresholds import Budget, crossings, levels
from gateway.alerts.webhook import Outbox, encode, event_body, event_id
from gateway.core.redisconn import REDIS_ERRORS, incidents

log = logging.getLogger("gateway")

MARKER_GRACE = 86400               # a marker outlives its period by this much
MAX_MARKER_TTL = 400 * 86400       # and never lives longer than this (a yearly budget fits)
MAX_PERIOD_CHARS = 64              # the period identity is part of a key name


class AlertNames:
    """Redis names of budget alerts (proposed for gateway/core/redisnames.py). All carry the
    hash tag {outbox}: one slot, so one script may write a marker and the outbox on a Redis
    Cluster. Alerts are a handful per budget per period, so one slot is no hot spot."""

    def __init__(self, prefix: str = "vgw:"):
        self.prefix = prefix
        self.events = prefix + "alerts:{outbox}:events"   # hash: id -> body, id:n -> claims, id:at -> queued
        self.due = prefix + "alerts:{outbox}:due"         # sorted set: id -> next attempt / lease end

    def sent(self, scope: str, budget_id: str, period: str, threshold: str, amount: int) -> str:
        """The marker of one threshold (name@nano-dollars) of one budget in one period."""
        return f"{self.prefix}alerts:{{outbox}}:sent:{scope}:{budget_id}:{period}:{threshold}@{amount}"


def marker_ttl(reset_at: float | None, now: float) -> int:
    """Seconds a marker lives: to the period's end plus MARKER_GRACE, within [grace, MAX_MARKER_TTL]."""
    if reset_at is None:
        return MAX_MARKER_TTL
    return int(min(max(reset_at - now, 0) + MARKER_GRACE, MAX_MARKER_TTL))


class OnceGate:
    """What the settle path calls: crossings -> alerts, each queued at most once per period."""

    def __init__(self, outbox: Outbox, names: AlertNames, thresholds, count=None):
        self.outbox = outbox
        self.names = names
        self.thresholds = tuple(thresholds)
        self.count = count or (lambda outcome, n=1: None)   # "queued", "lost", "overflow"

    def fire(self, budget: Budget, period: str, before: int, after: int, *, now: float,
             period_start: float | None = None, reset_at: float | None = None) -> list[str]:
        """Queue an alert for each threshold this settle crossed and nobody queued yet this period;
        returns their threshold names. No crossing: no Redis call. Never raises REDIS_ERRORS."""
        if not isinstance(period, str) or not 0 < len(period) <= MAX_PERIOD_CHARS:
            raise ValueError(f"period must be a string of 1 to {MAX_PERIOD_CHARS} characters")
        found = crossings(budget, self.thresholds, before, after)
        if not found:
            return []
        ttl = marker_ttl(reset_at, now)
        items = [(self.names.sent(budget.scope, budget.id, period, c.threshold, c.amount), ttl,
                  event_id(budget, period, c),
                  encode(event_body(budget, c, after, period, now=now, period_start=period_start, reset_at=reset_at)))
                 for c in found]
        try:
            results = self.outbox.enqueue_once(items)
        except REDIS_ERRORS as exc:
            self.count("lost", len(found))
            incidents.report(exc, "Budget alerts crossed meanwhile are not sent (and never sent twice).")
            return []
        return self._tally(found, results, items)

    def _tally(self, found, results, items) -> list[str]:
        queued = []
        for crossing, result, (_, _, event, _) in zip(found, results, items):
            if result == "queued":
                queued.append(crossing.threshold)
                self.count("queued")
            elif result == "full":
                self.count("overflow")
                log.warning("budget alert %s (%s) not sent: the outbox holds %d events already (is the webhook "
                            "receiver down?)", event, crossing.threshold, self.outbox.max_pending)
        return queued

    def fired(self, budget: Budget, period: str) -> list[str]:
        """The thresholds of `budget` already alerted in `period` (for /key/info); one MGET.
        Raises REDIS_ERRORS."""
        marks = levels(budget, self.thresholds)
        if not marks:
            return []
        names = [self.names.sent(budget.scope, budget.id, period, m.threshold, m.amount) for m in marks]
        return [m.threshold for m, value in zip(marks, self.outbox.redis.mget(names)) if value is not None]
