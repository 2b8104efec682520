"""A request on a key of a team: the team's models, rate limits and budget, besides the key's own.

The tighter rule wins because both must pass. Each subject's limits are one atomic script in its
own slot (the key's `{token}`, the team's `{team:<id>}`: a Redis Cluster cannot run one script
over both), taken key first, then team; when the team refuses, the key's admission is refunded,
so a refused request keeps nothing. Counts stay exact: a team's rpm window only counts requests
the team admitted, minus refunds — a request refused by the key after the team (its budget,
below) gives the team's count back too.

The team's budget is reserved exactly like a key's (gateway/usage/budgets.py, the same script on
the team's spend hash), so the exact-budgets bound holds for the team as a whole across workers
and instances; the accounting flush settles the team's charge as it settles the key's.
"""
from __future__ import annotations

from gateway.core.errors import GatewayError
from gateway.keys import policy
from gateway.usage.accounting import budget_period


class TeamShare:
    """What one request holds of its key's team: its limiter slot and its budget reservation."""

    __slots__ = ("team", "subject", "slot", "hold")

    def __init__(self, team: dict, subject: str):
        self.team = team
        self.subject = subject
        self.slot = None
        self.hold = None

    @property
    def team_id(self) -> str:
        return self.team["team_id"]

    def refund(self, limiter) -> None:
        """The request was refused after the team admitted it: its rpm count and lease go back."""
        if self.slot is not None:
            limiter.refund(self.slot)


def admit_headers(limiter, names, identity, request_id: str, key_slot=None) -> TeamShare | None:
    """Before the body: the team's rate limits (429 refunds the key's admission)."""
    team = identity.team
    if team is None:
        return None
    share = TeamShare(team, names.team_subject(team["team_id"]))
    if limiter.applies(team):
        try:
            share.slot = limiter.acquire(share.subject, team, request_id, subject="team")
        except GatewayError:
            if key_slot is not None:
                limiter.refund(key_slot)
            raise
    return share


def check_model(fields: dict | None, team: dict, has_body: bool) -> None:
    """With a team model list, the body's model must be on it (as for a key's list)."""
    policy.check_model_list(fields, team.get("models"), has_body, "this key's team", "team_model_access_denied")


def admit_body(share: TeamShare | None, budgets, fields, has_body: bool, wall: float, request_id: str) -> None:
    """After the body: the team's model list, then its budget reservation (400/429 as a key's,
    the message saying it is the team's budget)."""
    if share is None:
        return
    check_model(fields, share.team, has_body)
    try:
        share.hold = budgets.reserve(share.subject, share.team, budget_period(share.team, wall), fields, request_id)
    except GatewayError as exc:
        if exc.type in ("budget_exceeded", "rate_limit_error"):
            exc.message = f"Team {share.team_id}: {exc.message}"
        raise
