"""The JSON object an admin route takes, with its money read exactly.

JSON numbers are parsed as floats, and 0.1 must not arrive as the double nearest 0.1: when the
body carries a money field as a float (or a nested field that holds money), those fields are
taken from a second parse that reads numbers as Decimal (gateway/usage/money.py). Only those:
everything else keeps its usual types.
"""
from __future__ import annotations

import json
from decimal import Decimal

from flask import request

from gateway.core.errors import GatewayError
from gateway.keys.fields import require_object


def json_object(money_fields=(), nested_money=()) -> dict:
    """The request's JSON object ({} for an empty body; anything else a 400). `money_fields`:
    top-level money amounts; `nested_money`: fields whose objects hold amounts (taken whole from
    the exact parse)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        payload = require_object(json.loads(raw))
        inexact = [name for name in money_fields if isinstance(payload.get(name), float)]
        inexact += [name for name in nested_money if isinstance(payload.get(name), (dict, list))]
        if inexact:
            exact = json.loads(raw, parse_float=Decimal)
            payload.update({name: exact[name] for name in inexact})
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise GatewayError(400, "the body must be valid JSON") from None
    return payload
