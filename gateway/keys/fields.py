"""Validation of the fields a virtual key carries; every error names its field (400)."""
from __future__ import annotations

from gateway.core.durations import parse_duration
from gateway.core.errors import GatewayError
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


MONEY_FIELDS = ("max_budget",)  # read from the request as Decimal, not float

# Field name -> validator. These are stored on the key; limits and budgets are enforced per request.
KEY_FIELDS = {
    "key_alias": _text,
    "duration": _duration,
    "models": _text_list,
    "max_budget": _money,
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
    """Check each given field against its validator; unknown fields are refused by name."""
    return {name: KEY_FIELDS[name](name, value) for name, value in reject_unknown(payload, allowed).items()}
