"""Validation of the fields a virtual key carries; every error names its field (400)."""
from __future__ import annotations

from gateway.core.durations import parse_duration
from gateway.core.errors import GatewayError
from gateway.keys.compat import without_unsupported
from gateway.usage.money import api_nanos, as_json

MAX_TEXT = 256
MAX_LIST = 1000
MIN_CUSTOM_KEY_LENGTH = 16


def encodable(text: str) -> bool:
    """UTF-8 encodable: JSON can spell lone surrogates (\\ud800) that no store can keep."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad(field: str, message: str) -> GatewayError:
    return GatewayError(400, f"{field}: {message}", "bad_request_error", param=field)


def _text(field, value, allow_none=True):
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(field, "must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise _bad(field, f"must be at most {MAX_TEXT} characters")
    if not encodable(value):
        raise _bad(field, "must be valid Unicode text (JSON allows lone surrogates; this does not)")
    return value


def _text_list(field, value):
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise _bad(field, f"must be a list of at most {MAX_LIST} strings")
    return [_text(f"{field}[{i}]", item, allow_none=False) for i, item in enumerate(value)]


def _count(field, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, "must be a whole number or null")
    if value < 0 or value > 10**12:
        raise _bad(field, "must be between 0 and 10^12")
    return value


def _money(field, value):
    """Dollars, read exactly (the API parses money fields as Decimal), kept as the JSON number
    that prints as exactly that decimal (gateway/usage/money.py: at most 9 decimal places and
    15 significant digits, so nothing is rounded on the way in or out)."""
    if value is None:
        return None
    try:
        return as_json(api_nanos(value))
    except ValueError as exc:
        raise _bad(field, str(exc)) from None


def _duration(field, value):
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError as exc:
        raise _bad(field, str(exc)) from None
    return value.strip()


def _routes(field, value):
    routes = _text_list(field, value)
    for i, route in enumerate(routes):
        if not route.startswith("/"):
            raise _bad(f"{field}[{i}]", "must be a path starting with '/', e.g. '/v1/chat/completions' or '/v1/*'")
    return routes


def _custom_key(field, value):
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("sk-"):
        raise _bad(field, "a custom key must be a string starting with 'sk-'")
    if len(value) < MIN_CUSTOM_KEY_LENGTH or len(value) > 256:
        raise _bad(field, f"a custom key must be {MIN_CUSTOM_KEY_LENGTH} to 256 characters long")
    if any(not (0x21 <= ord(c) <= 0x7E) for c in value):
        raise _bad(field, "a custom key may contain only printable ASCII without spaces")
    return value


def _metadata(field, value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(field, "must be a JSON object")
    return value


def _blocked(field, value):
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(field, "must be true or false")
    return value


ALL_PROXY_MODELS = "all-proxy-models"  # LiteLLM's name for "every model": no restriction


def _models(field, value):
    """A model allow-list; `all-proxy-models` (LiteLLM's spelling of "every model") is kept as
    given and lifts the restriction (gateway/keys/policy.py check_model)."""
    return _text_list(field, value)


def _model_map(field, value, check) -> dict:
    """{model name: setting}, each setting checked by `check(field[model], setting)`."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LIST:
        raise _bad(field, f"must be a JSON object of at most {MAX_LIST} models")
    return {_text(f"{field}.{model}", model, allow_none=False): check(f"{field}.{model}", setting)
            for model, setting in value.items()}


def _aliases(field, value):
    """{"alias": "real-model"}: the body's `model` named by an alias is rewritten before vLLM."""
    return _model_map(field, value, lambda name, target: _text(name, target, allow_none=False))


def _model_counts(field, value):
    """model_rpm_limit / model_tpm_limit: {"model": whole number per minute} (LiteLLM's shape)."""
    def count(name, limit):
        if limit is None:
            raise _bad(name, "must be a whole number (leave the model out for no limit)")
        return _count(name, limit)
    return _model_map(field, value, count)


def _model_budgets(field, value):
    """model_max_budget: {"model": {"budget_limit": dollars, "time_period": "1d"}} (LiteLLM's
    BudgetConfig); the budget is exact like max_budget, the period any duration."""
    def budget(name, config):
        if not isinstance(config, dict) or set(config) - {"budget_limit", "time_period"}:
            raise _bad(name, 'must be {"budget_limit": <dollars>, "time_period": "<duration, e.g. 1d>"}')
        if config.get("budget_limit") is None or config.get("time_period") is None:
            raise _bad(name, "needs both budget_limit and time_period")
        return {"budget_limit": _money(f"{name}.budget_limit", config["budget_limit"]),
                "time_period": _duration(f"{name}.time_period", config["time_period"])}
    return _model_map(field, value, budget)


MONEY_FIELDS = ("max_budget", "soft_budget")  # read from the request as Decimal, not float

# Field name -> validator. These are stored on the key; limits and budgets are enforced per request.
KEY_FIELDS = {
    "key_alias": _text,
    "duration": _duration,
    "models": _models,
    "max_budget": _money,
    "soft_budget": _money,  # alerts only (gateway/alerts/): crossing it never refuses a request
    "budget_duration": _duration,
    "metadata": _metadata,
    "user_id": _text,
    "team_id": _text,
    "rpm_limit": _count,
    "tpm_limit": _count,
    "max_parallel_requests": _count,
    "allowed_routes": _routes,
    "key": _custom_key,
    "blocked": _blocked,
    "tags": _text_list,
    "aliases": _aliases,
    "model_rpm_limit": _model_counts,
    "model_tpm_limit": _model_counts,
    "model_max_budget": _model_budgets,
}


def require_object(payload) -> dict:
    if not isinstance(payload, dict):
        raise GatewayError(400, "the body must be a JSON object", "bad_request_error")
    return payload


def reject_unknown(payload, allowed) -> dict:
    """The payload as an object, refusing any field not in `allowed` by name."""
    for name in require_object(payload):
        if name not in allowed:
            raise _bad(name, f"unknown field; accepted fields are {', '.join(sorted(allowed))}")
    return payload


def validate_fields(payload: dict, allowed) -> dict:
    """Check each given field against its validator; unknown fields are refused by name, and a
    LiteLLM field this gateway lacks with a message saying what to use (gateway/keys/compat.py)."""
    payload = without_unsupported(require_object(payload))
    return {name: KEY_FIELDS[name](name, value) for name, value in reject_unknown(payload, allowed).items()}
