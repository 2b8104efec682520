"""The audit log of admin changes (GET /audit/logs), and the one guard of every admin route.

`master_only` is the before-request hook of /key/*, /spend/*, /end_user/* and /audit/*: only
the master key passes, and the caller's label ("master"; a team admin later) goes into the access
log line and into the audit entries of the changes it makes.
"""
from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from blueprints import services
from blueprints.args import int_arg, only_args, time_range
from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.keys.audit import ACTIONS
from gateway.keys.store import KeyStore

bp = Blueprint("audit", __name__, url_prefix="/audit")


def master_only() -> None:
    """Admin routes: the master key or 401/403; the caller is named in the access log."""
    identity = services().auth.require_master(request.environ)
    g.admin_caller = identity.label
    record = g.get("record")
    if record is not None:
        record.caller = identity.label


def admin_caller() -> str:
    """Who is making this admin change (set by `master_only`)."""
    return g.admin_caller


bp.before_request(master_only)


@bp.get("/logs")
def audit_logs():
    """Newest first. Filters: key (key or token), key_alias, action, caller, start_date,
    end_date (ISO-8601 or epoch seconds, inclusive); pages: page, size (<= 500)."""
    only_args("key", "key_alias", "action", "caller", "start_date", "end_date", "page", "size")
    action = request.args.get("action")
    if action is not None and action not in ACTIONS:
        raise GatewayError(400, "action: must be one of " + ", ".join(ACTIONS), param="action")
    key = request.args.get("key")
    start, end = time_range()
    try:
        result = services().audit.query(
            token=KeyStore.token_of(key) if key else None, key_alias=request.args.get("key_alias"),
            action=action, caller=request.args.get("caller"), start=start, end=end,
            page=int_arg("page", 1, 1, 10**6), size=int_arg("size", 50, 1, 500))
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify(result)
