"""Spend log, usage report and end-user usage (master key only)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from blueprints import services
from blueprints.args import choice_arg, int_arg, only_args, report_window, time_range
from blueprints.audit import master_only

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.keys.store import KeyStore
from gateway.usage.usagecounters import GROUPINGS, INTERVALS, MASTER_BUCKET, in_dollars

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
            report["series"] = _by_current_key(report["series"])
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify(in_dollars(report))


def _by_current_key(series: list[dict]) -> list[dict]:
    """Key series as keys are now: a regenerated key's old token is added to the key it became
    (one series per key, not per token), and each series names its key's alias (None for the
    master key, "other" and keys gone). Spend is still nano-dollars here: the sums are exact."""
    store = services().keystore
    current = store.current_tokens([s["group"] for s in series if s["group"] not in (None, MASTER_BUCKET)])
    merged: dict = {}
    for entry in series:
        if entry["other"]:
            continue
        token = current.get(entry["group"], entry["group"])
        if token in merged:
            _add_series(merged[token], entry)
        else:
            merged[token] = {**entry, "group": token}
    records = store.records([t for t in merged if t != MASTER_BUCKET])
    for token, entry in merged.items():
        entry["key_alias"] = (records.get(token) or {}).get("key_alias")
    shown = sorted(merged.values(), key=lambda e: (-e["totals"]["spend"], -e["totals"]["requests"], e["group"]))
    return shown + [{**e, "key_alias": None} for e in series if e["other"]]


def _add_series(into: dict, entry: dict) -> None:
    for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "spend"):
        into[name] = [a + b for a, b in zip(into[name], entry[name])]
    into["totals"] = {name: into["totals"][name] + entry["totals"][name] for name in into["totals"]}


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
