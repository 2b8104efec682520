"""Per-model prices: from MODEL_PRICES (JSON) or MODEL_PRICES_FILE (a JSON file).

Each model maps to either per-token prices (LiteLLM's names)
    {"input_cost_per_token": 5e-7, "output_cost_per_token": 1.5e-6, "cache_read_input_token_cost": 1.25e-7}
or per-million prices
    {"input_cost_per_million": 0.5, "output_cost_per_million": 1.5, "cache_read_input_cost_per_million": 0.125}.
The cached price is what a prompt token vLLM served from its prefix cache costs (vLLM reports
them as usage.prompt_tokens_details.cached_tokens when started with
--enable-prompt-tokens-details); without one, cached tokens cost the input price. Unknown
models cost 0; their tokens are still counted.

Exact: the JSON is read with Decimal (1.5e-07 stays 15/10^8, not the double nearest it) and a
price is kept as an integer number of PRICE_UNITS (1e-18 USD) per token, so 1.875e-8 a token is
exact. A price with more decimal places than that (18 per token, 12 per million) is refused,
not rounded: rounding it would misprice every token. A request's cost is computed exactly in
these units from its token counts and rounded once, half up, to the nano-dollar
(gateway/usage/money.py): at most half a nano-dollar from the exact cost and unbiased, where a
ceiling would add up to 1e-9 USD to every request (0.001 USD a million requests).
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import NamedTuple

from gateway.core.config import ConfigError
from gateway.usage.money import exact_units

PRICE_PLACES = 18                      # prices are exact to 1e-18 USD a token
PRICE_UNITS_PER_NANO = 10**(PRICE_PLACES - 9)
MAX_PRICE_PER_TOKEN = 1                # USD: 1,600 times the dearest price listed today
# A request's cost is capped here (1,000,000 USD): token counts a broken or hostile upstream
# reports must not overflow the int64 spend counters, and the relay's float must carry it exactly.
MAX_REQUEST_NANOS = 10**15
# (input, output, cached input) field names of each form, and the form's decimal places to units.
_PER_TOKEN = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost")
_PER_MILLION = ("input_cost_per_million", "output_cost_per_million", "cache_read_input_cost_per_million")
_FORMS = ((_PER_TOKEN, PRICE_PLACES, 1), (_PER_MILLION, PRICE_PLACES - 6, 10**6))


class Price(NamedTuple):
    """One model's prices, in PRICE_UNITS (1e-18 USD) per token."""

    input: int
    output: int
    cached_input: int


def parse_prices(text: str, source: str) -> dict[str, Price]:
    """{model: Price}; ConfigError on anything odd."""
    try:
        table = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{source} must be a JSON object of model -> prices")
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: prices for {model!r} must be an object")
        prices[model] = _model_price(entry, f"{source}: {model!r}")
    return prices


def _model_price(entry: dict, where: str) -> Price:
    names, places, per = _FORMS[0] if set(entry) & set(_PER_TOKEN) else _FORMS[1]
    unknown = set(entry) - set(names)
    if unknown:
        raise ConfigError(f"{where} has unknown fields {sorted(unknown)}; use {_PER_TOKEN} or {_PER_MILLION}")
    price_in, price_out, cached = (_units(entry[name], f"{where} {name}", places, per) if name in entry else None
                                   for name in names)
    price_in, price_out = price_in or 0, price_out or 0
    return Price(price_in, price_out, price_in if cached is None else cached)


def _units(value, where: str, places: int, per: int) -> int:
    """A price as PRICE_UNITS per token."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value < 0:  # NaN: a float
        raise ConfigError(f"{where} must be a non-negative number")
    if value > MAX_PRICE_PER_TOKEN * per:
        raise ConfigError(f"{where} must be a non-negative number of at most {MAX_PRICE_PER_TOKEN * per} "
                          f"(USD {MAX_PRICE_PER_TOKEN} a token)")
    units = exact_units(value, places)
    if units is None:
        raise ConfigError(f"{where} = {value} has more than {places} decimal places: prices are exact to "
                          f"1e-{PRICE_PLACES} USD a token, and rounding this one would misprice every token")
    return units


def load_prices(environ) -> dict[str, Price]:
    text = environ.get("MODEL_PRICES", "").strip()
    if text:
        return parse_prices(text, "MODEL_PRICES")
    path = environ.get("MODEL_PRICES_FILE", "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return parse_prices(handle.read(), f"MODEL_PRICES_FILE ({path})")
        except OSError as exc:
            raise ConfigError(f"MODEL_PRICES_FILE cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"MODEL_PRICES_FILE ({path}) is not UTF-8 text") from None
    return {}


def cost(prices: dict, model: str | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """A request's cost in nano-dollars: exact in price units, rounded once, half up. Cached
    prompt tokens (at most all of the prompt) are charged at the cached price."""
    price = prices.get(model or "")
    if price is None:
        return 0
    cached = min(max(cached_tokens, 0), prompt_tokens)
    units = (prompt_tokens - cached) * price.input + cached * price.cached_input + completion_tokens * price.output
    return min((units + PRICE_UNITS_PER_NANO // 2) // PRICE_UNITS_PER_NANO, MAX_REQUEST_NANOS)
