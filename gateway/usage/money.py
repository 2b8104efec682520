"""Money as integer nano-dollars, from the prices to the JSON.

Float dollars summed request by request showed binary noise (0.051000000000000004) and could
drift, so every amount the gateway keeps, adds or compares is an integer number of nano-dollars
(1e-9 USD): spend in Redis (HINCRBY; int64 holds 9.2e9 USD), charges, reservations, budgets,
usage counters. Nano, not micro: a short request at 1.5e-7 USD a token costs under a
micro-dollar. Prices are finer still and a request's cost is rounded once, half up, to the
nano-dollar (gateway/usage/prices.py).

At the edges amounts are dollars:
- in: API money fields are read from the JSON as Decimal, never through a float, and must be
  exact in nano-dollars (`api_nanos`);
- out: a JSON number, the double nearest the exact amount (`as_json`). The shortest repr of
  that double, which JSON encoders print, is the exact decimal for every amount of at most 15
  significant digits (any amount under 1,000,000 USD, to the nano-dollar); larger amounts are
  rounded to 15 significant digits first, so no binary noise is ever printed. A client reads a
  JSON number as a double: it could not keep more digits anyway;
- the relay hands a request's cost over as such a double (entry["spend"], the Prometheus
  counter): below 2^51 nano-dollars (2.2 million USD) it gives its nano-dollars back exactly
  (`to_nanos`).

Spend written by the previous version (float dollars from HINCRBYFLOAT) is read with
`legacy_nanos`, rounded exactly as the Lua scripts round it when they fold it into the integer
fields, so an amount reads the same before and after its fold.
"""
from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation

NANOS_PER_USD = 10**9
API_MAX_USD = 10**9      # a money input above a billion dollars is a typo (and int64 stays far)
JSON_DIGITS = 15         # significant digits a double always prints back exactly
_PRINTS_EXACTLY = 10**JSON_DIGITS   # nano-dollar amounts below this have <= 15 digits
_CARRIED = 2**51         # below this, round(n / 1e9 * 1e9) == n: a double carries n exactly
_ROUND_TO_JSON = Context(prec=JSON_DIGITS, rounding=ROUND_HALF_UP)
# Exact arithmetic: an operation that would round raises instead.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def as_json(nanos: int) -> float:
    """The JSON number of an amount: prints as its exact decimal (rounded to 15 significant
    digits from 1,000,000 USD up)."""
    if -_PRINTS_EXACTLY < nanos < _PRINTS_EXACTLY:
        return nanos / NANOS_PER_USD  # correctly rounded, so its repr is the decimal itself
    return float(_ROUND_TO_JSON.create_decimal(nanos).scaleb(-9))


def dollars(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


def to_nanos(amount) -> int:
    """Dollars (int, Decimal, or a float read as the decimal it prints as) to nano-dollars,
    half up. A float the gateway made from nano-dollars (`as_json`) gives them back exactly."""
    if isinstance(amount, int):
        return amount * NANOS_PER_USD
    if isinstance(amount, float):
        nanos = round(amount * NANOS_PER_USD)
        if abs(nanos) < _CARRIED and nanos / NANOS_PER_USD == amount:
            return nanos  # the common case: a cost the relay passed on
        amount = Decimal(repr(amount))
    return int(amount.scaleb(9).to_integral_value(ROUND_HALF_UP))


def exact_units(value, places: int) -> int | None:
    """`value` (an int or a finite Decimal) as a whole number of 10^-places units, or None when
    it has more decimal places than that (nothing is rounded). Check its size first."""
    if isinstance(value, int):
        return value * 10**places
    try:
        return int(value.quantize(Decimal(1).scaleb(-places), context=_EXACT).scaleb(places, context=_EXACT))
    except (Inexact, InvalidOperation):
        return None


def api_nanos(value) -> int:
    """An API money field (max_budget) as nano-dollars. ValueError says what is wrong: it must be
    a JSON number (read as Decimal), finite, 0..API_MAX_USD, with at most 9 decimal places and
    15 significant digits (so the JSON number shown back is exactly what was sent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValueError("must be a number or null")
    if isinstance(value, float):  # NaN/Infinity literals (the JSON decoder's parse_constant)
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        value = Decimal(repr(value))
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError("must be a finite number")
    if value < 0:
        raise ValueError("must not be negative")
    if value > API_MAX_USD:  # before any arithmetic: 1e999999 is a valid Decimal
        raise ValueError(f"must be at most {API_MAX_USD} (10^9)")
    nanos = exact_units(value, 9)
    if nanos is None:
        raise ValueError("must have at most 9 decimal places (spend is counted in nano-dollars)")
    if len(str(nanos).rstrip("0")) > JSON_DIGITS:
        raise ValueError(f"must have at most {JSON_DIGITS} significant digits (what a JSON number holds exactly)")
    return nanos


def legacy_nanos(text) -> int:
    """A float dollar amount the previous version wrote, as nano-dollars: the same double
    arithmetic as the scripts' fold (math.floor(x * 1e9 + 0.5)), so both agree to the unit."""
    if text is None:
        return 0
    try:
        value = float(text)
    except ValueError:
        return 0
    return math.floor(value * 1e9 + 0.5) if math.isfinite(value) else 0


def stored_nanos(integer, legacy=None) -> int:
    """An amount kept in an integer field, plus what the previous version's float field holds
    until a script folds it in."""
    return int(integer or 0) + legacy_nanos(legacy)


def usd_text(nanos: int) -> str:
    """An amount in a message: exact, with at least 6 decimals ("0.026000", "0.00000015")."""
    amount = dollars(nanos)
    return f"{amount:.6f}" if nanos % 1000 == 0 else f"{amount.normalize():f}"
