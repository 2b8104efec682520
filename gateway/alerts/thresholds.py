"""Which budget thresholds one settle crossed: pure arithmetic, no Redis, no clock.

Money is integer nano-dollars (NANO_USD units per US dollar), the unit the accounting keeps
spend in, so a threshold's amount is exact: 80% of 0.30 USD is 240_000_000, never float noise.
A fraction's amount is rounded up (ceil(max_budget × fraction)): "80% reached" then never
fires below 80%.

A budget has one level per configured fraction of `max_budget` (named "50%", "80%", "100%")
and one more at `soft_budget` (named "soft_budget") when that is set; either budget may be
absent. A settle crosses a level when it moves the period's spend from below the level's amount
to at or above it (`before < amount <= after`). Spend within a budget period only grows, so each
level is crossed at most once per period; gateway/alerts/once.py makes that hold also for a
batch that is retried or settled twice.

Limits (by design): lowering `max_budget` below what was already spent fires nothing until a
later settle crosses a level of the new budget; several levels crossed by one settle are all
reported, lowest first.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from gateway.usage.money import NANOS_PER_USD

NANO_USD = NANOS_PER_USD  # money units per US dollar: the accounting's nano-dollars (gateway/usage/money.py)
DEFAULT_THRESHOLDS = (Fraction(1, 2), Fraction(4, 5), Fraction(1))
MAX_THRESHOLDS = 10       # a handful is what anyone reads; it also bounds the markers per period
SCOPES = ("key", "team")
MAX_ID_CHARS = 256        # ids end up in Redis key names and webhook bodies
SOFT_BUDGET = "soft_budget"

# LiteLLM's webhook event names (litellm/proxy/_types.py WebhookEvent.event).
BUDGET_CROSSED = "budget_crossed"
SOFT_BUDGET_CROSSED = "soft_budget_crossed"
THRESHOLD_CROSSED = "threshold_crossed"


@dataclass(frozen=True)
class Budget:
    """One key's or team's budget as of a settle. `id` is the key's token (its SHA-256, never the
    key itself) or the team id; amounts are nano-dollars, None when not set."""

    scope: str
    id: str
    max_budget: int | None = None
    soft_budget: int | None = None
    alias: str | None = None       # key_alias or team_alias, for the receiver's eyes only
    team_id: str | None = None     # a key's team (a team's own id is `id`)

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        if not isinstance(self.id, str) or not 0 < len(self.id) <= MAX_ID_CHARS:
            raise ValueError(f"id must be a string of 1 to {MAX_ID_CHARS} characters")
        for name in ("max_budget", "soft_budget"):
            _check_money(name, getattr(self, name), optional=True)


@dataclass(frozen=True)
class Crossing:
    """A level a settle crossed: its name, LiteLLM's event name, and its amount (nano-dollars)."""

    threshold: str
    event: str
    amount: int


def _check_money(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer of nano-dollars (1e-9 USD)")


def as_fraction(value) -> Fraction:
    """0.8, "0.8", "80%", Decimal("0.8") or Fraction(4, 5) -> Fraction(4, 5), exactly (a float is
    read as the decimal it prints as, so 0.8 is 4/5, not the binary number nearest to it)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise ValueError("a threshold is a number, not a boolean")
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = Fraction(Decimal(text[:-1] if percent else text))
    except (InvalidOperation, ValueError):
        raise ValueError(f"{text[:20]!r} is not a number such as 0.8 or 80%") from None
    return number / 100 if percent else number


def parse_thresholds(values) -> tuple[Fraction, ...]:
    """Thresholds from a setting ("0.5,0.8,1" or "50%,80%,100%") or a sequence: sorted, without
    duplicates, each in (0, 1]. An empty setting means no percentage alerts (soft_budget still
    alerts). ValueError says what is wrong, without echoing more than a few characters."""
    if isinstance(values, str):
        values = [part for part in values.split(",") if part.strip()]
    fractions = sorted({as_fraction(value) for value in values})
    if len(fractions) > MAX_THRESHOLDS:
        raise ValueError(f"at most {MAX_THRESHOLDS} thresholds")
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError("each threshold must be above 0 and at most 1 (100%)")
    return tuple(fractions)


def threshold_name(fraction: Fraction) -> str:
    """Fraction(4, 5) -> "80%", Fraction(1, 8) -> "12.5%"."""
    percent = Decimal(fraction.numerator) * 100 / Decimal(fraction.denominator)
    return f"{percent.normalize():f}%"


def threshold_amount(max_budget: int, fraction: Fraction) -> int:
    """ceil(max_budget × fraction) in integers: the spend at which the level counts as reached."""
    return -(-max_budget * fraction.numerator // fraction.denominator)


def levels(budget: Budget, thresholds) -> list[Crossing]:
    """Every level `budget` has with these thresholds, lowest amount first."""
    found = []
    if budget.max_budget is not None:
        for fraction in thresholds:
            event = BUDGET_CROSSED if fraction == 1 else THRESHOLD_CROSSED
            found.append(Crossing(threshold_name(fraction), event, threshold_amount(budget.max_budget, fraction)))
    if budget.soft_budget is not None:
        found.append(Crossing(SOFT_BUDGET, SOFT_BUDGET_CROSSED, budget.soft_budget))
    return sorted(found, key=lambda level: level.amount)


def crossings(budget: Budget, thresholds, before: int, after: int) -> list[Crossing]:
    """The levels one settle crossed: `before` and `after` are the budget period's spend just
    before and just after it (before = 0 when the settle opened the period)."""
    _check_money("before", before)
    _check_money("after", after)
    if after <= before:
        return []
    return [level for level in levels(budget, thresholds) if before < level.amount <= after]
