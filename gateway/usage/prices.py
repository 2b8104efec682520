"""Per-model prices: from MODEL_PRICES (JSON) or MODEL_PRICES_FILE (a JSON file).

Each model maps to either per-token prices
    {"input_cost_per_token": 5e-7, "output_cost_per_token": 1.5e-6}   (LiteLLM's names)
or per-million prices
    {"input_cost_per_million": 0.5, "output_cost_per_million": 1.5}.
Unknown models cost 0; their tokens are still counted.
"""
from __future__ import annotations

import json
import math

from gateway.core.config import ConfigError

_PER_TOKEN = ("input_cost_per_token", "output_cost_per_token")
_PER_MILLION = ("input_cost_per_million", "output_cost_per_million")


def parse_prices(text: str, source: str) -> dict[str, tuple[float, float]]:
    """{model: (input price per token, output price per token)}; ConfigError on anything odd."""
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{source} must be a JSON object of model -> prices")
    prices = {}
    for model, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: prices for {model!r} must be an object")
        names, scale = (_PER_TOKEN, 1.0) if _PER_TOKEN[0] in entry or _PER_TOKEN[1] in entry else (_PER_MILLION, 1e-6)
        unknown = set(entry) - set(names)
        if unknown:
            raise ConfigError(f"{source}: {model!r} has unknown fields {sorted(unknown)}; "
                              f"use {_PER_TOKEN} or {_PER_MILLION}")
        pair = []
        for name in names:
            value = entry.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{source}: {model!r} {name} must be a non-negative number")
            pair.append(value * scale)
        prices[model] = (pair[0], pair[1])
    return prices


def load_prices(environ) -> dict[str, tuple[float, float]]:
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


def cost(prices: dict, model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
    price_in, price_out = prices.get(model or "", (0.0, 0.0))
    return prompt_tokens * price_in + completion_tokens * price_out
