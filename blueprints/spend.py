"""Spend log, usage report and end-user usage (master key only)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from blueprints import services
from blueprints.args import choice_arg, int_arg, only_args, report_window, time_range
from blueprints.audit import master_only

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.keys.store import KeyStore
from gateway.usage.usagecounters import GROUPINGS, INTERVALS, MASTER_BUCKET

bp = Blueprint("spend", __name__)


bp.before_request(master_only)


def _spend_log():
    return services().accounting.log


@bp.get("/spend/logs")
def spend_logs():
    """Newest first. Filters: key (key or token; `api_key` also accepted), key_alias, end_user
    (or `end_user_id`), request_id, start_date, end_date; pages: page, size (<= 500)."""
    only_args("key", "api_key", "key_alias", "end_user", "end_user_id", "request_id",
              "start_date", "end_date", "page", "size")
    key = request.args.get("key") or request.args.get("api_key")
    start, end = time_range()
    try:
        result = _spend_log().query(
            token=KeyStore.token_of(key) if key else None,
            key_alias=request.args.get("key_alias"),
            end_user=request.args.get("end_user") or request.args.get("end_user_id"),
            request_id=request.args.get("request_id"),
            start=start, end=end, page=int_arg("page", 1, 1, 10**6), size=int_arg("size", 50, 1, 500))
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify(result)


@bp.get("/spend/report")
def spend_report():
    """Requests, tokens and spend per hour or day, grouped by key, model or end user, from the
    usage counters (never the log). Arguments: group_by (key|model|end_user, default key),
    interval (hour|day, default day), start_date/end_date (default: up to now, 24 hourly or
    30 daily buckets), limit (groups listed, 1..1000, default 100; the rest are summed as "other")."""
    only_args("group_by", "interval", "start_date", "end_date", "limit")
    group_by = choice_arg("group_by", GROUPINGS, "key")
    interval = choice_arg("interval", INTERVALS, "day")
    start, end = report_window(interval)
    limit = int_arg("limit", 100, 1, 1000)
    try:
        report = _spend_log().counters.report(group_by, interval, start, end, limit)
        if group_by == "key":
            _name_keys(report["series"])
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify(report)


def _name_keys(series: list[dict]) -> None:
    """Each key series gets its key's alias (None for the master key, "other" and keys gone)."""
    records = services().keystore.records([s["group"] for s in series if s["group"] not in (None, MASTER_BUCKET)])
    for entry in series:
        record = records.get(entry["group"])
        entry["key_alias"] = record.get("key_alias") if record else None


@bp.get("/end_user/info")
def end_user_info():
    """An end user's usage summed over every key that sent it, and per key under `keys`
    (token -> usage; "master" for master-key requests). Stats expire END_USER_STATS_TTL after
    their last request."""
    end_user = request.args.get("end_user_id")
    if not end_user:
        raise GatewayError(400, "end_user_id: pass ?end_user_id=<id>", param="end_user_id")
    try:
        totals = _spend_log().end_user_totals(end_user)
    except REDIS_ERRORS:
        raise unavailable() from None
    if totals is None:
        raise GatewayError(404, f"no usage recorded for end user {end_user!r}", "not_found_error",
                           param="end_user_id")
    return jsonify(totals)
