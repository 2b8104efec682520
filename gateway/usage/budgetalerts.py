"""Budget alerts from the settle path: which key or team a settled charge belongs to, and the
gate call (gateway/alerts/once.py) with the period spend before and after it.

The settle script returns the budget period's spend right after the charge, in the same script
that added it, so `before = after - charge` is exact even when other workers and instances
settle the same budget at the same moment: each threshold is crossed by exactly one charge.
Called by the accounting flusher after its batch, never in a request; never raises (an alert
must not cost accounting), and costs no Redis call unless a threshold was crossed.
"""
from __future__ import annotations

import logging
import time

from gateway.alerts.thresholds import Budget
from gateway.usage import periods
from gateway.usage.money import to_nanos

log = logging.getLogger("gateway")
TEAM_PREFIX = "team:"  # a team's subject (gateway/core/redisnames.py team_subject)


def _nanos(value) -> int | None:
    return None if value is None else to_nanos(value)


def budget_of(subject: str, record: dict) -> Budget | None:
    """The alerting budget of a key (its token) or a team (`team:<id>`); None without
    max_budget or soft_budget (nothing to alert on)."""
    max_budget, soft_budget = _nanos(record.get("max_budget")), _nanos(record.get("soft_budget"))
    if max_budget is None and soft_budget is None:
        return None
    if subject.startswith(TEAM_PREFIX):
        return Budget("team", record["team_id"], max_budget=max_budget, soft_budget=soft_budget,
                      alias=record.get("team_alias"), team_id=record["team_id"])
    return Budget("key", subject, max_budget=max_budget, soft_budget=soft_budget,
                  alias=record.get("key_alias"), team_id=record.get("team_id"))


def fire_for_settled(gate, charges: list, replies: list) -> None:
    """For each charge the batch settled in its current period, the gate's alerts."""
    now = time.time()
    for charge, reply in zip(charges, replies):
        if not isinstance(reply, (list, tuple)) or len(reply) != 2 or charge.owner is None:
            continue
        try:
            budget = budget_of(charge.token, charge.owner)
            if budget is None:
                continue
            after = int(reply[1])
            period, start, reset = periods.calendar().bounds(charge.owner, now)
            if period != charge.period:
                start = reset = None  # a period that ended while the batch was in flight
            gate.fire(budget, charge.period, after - charge.spend, after, now=now, period_start=start,
                      reset_at=reset)
        except Exception:  # a bug must not stop accounting; the gate itself never raises Redis errors
            log.exception("budget alert check failed for a settled charge")


def alerts_sent(gate, subject: str, record: dict, now: float | None = None) -> list[str]:
    """The thresholds already alerted in the current budget period (`budget_alerts_sent`).
    Raises Redis errors."""
    budget = budget_of(subject, record) if gate is not None else None
    if budget is None:
        return []
    return gate.fired(budget, periods.calendar().bounds(record, time.time() if now is None else now)[0])
