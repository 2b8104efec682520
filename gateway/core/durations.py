"""LiteLLM's duration grammar: `30s`, `15m`, `12h`, `30d`, `2w`, `1mo` — the whole string.

LiteLLM matched only a prefix (`30dx` meant `30d`) and answered 500 on a bad unit; here the
whole string must match and anything else is a clear ValueError.
"""
from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}
_GRAMMAR = re.compile(r"([1-9][0-9]{0,9})(s|m|h|d|w|mo)")
# Past this nothing expires in any meaningful sense, and datetime arithmetic stays in range.
MAX_SECONDS = 100 * 365 * 86400


def parse_duration(text) -> int:
    """Seconds in a duration string; ValueError with the accepted forms otherwise."""
    if not isinstance(text, str):
        raise ValueError("must be a string such as '30s', '15m', '12h', '30d', '2w' or '1mo'")
    match = _GRAMMAR.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a number and one of s, m, h, d, w, mo (e.g. '30d')")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_SECONDS:
        raise ValueError(f"{text!r} is longer than 100 years")
    return seconds
