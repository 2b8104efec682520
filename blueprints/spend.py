"""Spend log and end-user usage (master key only)."""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, jsonify, request

from blueprints import services

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.keys.store import KeyStore

bp = Blueprint("spend", __name__)


@bp.before_request
def master_only():
    services().auth.require_master(request.environ)


def _accounting():
    return services().accounting


def _time_arg(name: str) -> float | None:
    """ISO-8601 (date or date-time; UTC unless it says otherwise) or epoch seconds."""
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise GatewayError(400, f"{name}: use ISO-8601 (2026-01-31 or 2026-01-31T12:00:00Z) or epoch seconds",
                           param=name) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _int_arg(name: str, default: int, high: int) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise GatewayError(400, f"{name}: must be a whole number from 1 to {high}", param=name)
    return int(raw)


@bp.get("/spend/logs")
def spend_logs():
    """Newest first. Filters: key (key or token; `api_key` also accepted), key_alias, end_user
    (or `end_user_id`), request_id, start_date, end_date; pages: page, size (<= 500)."""
    key = request.args.get("key") or request.args.get("api_key")
    start, end = _time_arg("start_date"), _time_arg("end_date")
    if start is not None and end is not None and start > end:
        raise GatewayError(400, "start_date: must not be after end_date", param="start_date")
    try:
        result = _accounting().spend_logs(
            token=KeyStore.token_of(key) if key else None,
            key_alias=request.args.get("key_alias"),
            end_user=request.args.get("end_user") or request.args.get("end_user_id"),
            request_id=request.args.get("request_id"),
            start=start, end=end, page=_int_arg("page", 1, 10**6), size=_int_arg("size", 50, 500))
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify(result)


@bp.get("/end_user/info")
def end_user_info():
    end_user = request.args.get("end_user_id")
    if not end_user:
        raise GatewayError(400, "end_user_id: pass ?end_user_id=<id>", param="end_user_id")
    try:
        totals = _accounting().end_user_totals(end_user)
    except REDIS_ERRORS:
        raise unavailable() from None
    if totals is None:
        raise GatewayError(404, f"no usage recorded for end user {end_user!r}", "not_found_error",
                           param="end_user_id")
    return jsonify(totals)
