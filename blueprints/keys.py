"""Admin API for virtual keys, in LiteLLM's names and shapes (master key only), and the two
routes a key's holder may call about that key alone: GET /key/info and GET /key/usage."""
from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from blueprints import services
from blueprints.args import bool_arg, choice_arg, int_arg, only_args, report_window
from blueprints.audit import admin_caller, master_only
from blueprints.jsonbody import json_object

from gateway.core.durations import parse_duration
from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.core.timefmt import iso
from gateway.keys.auth import Identity, credential_from, hash_key
from gateway.keys.fields import KEY_FIELDS, MONEY_FIELDS, encodable, reject_unknown, validate_fields
from gateway.keys.store import KeyStore
from gateway.usage.budgetalerts import alerts_sent
from gateway.usage import modellimits
from gateway.usage.usagecounters import INTERVALS, in_dollars

bp = Blueprint("keys", __name__, url_prefix="/key")

UPDATABLE = set(KEY_FIELDS) - {"key"}
# Routes a virtual key may call too, about itself only (LiteLLM lets a key read its own /key/info).
SELF_SERVICE = {"keys.info", "keys.usage"}


@bp.before_request
def master_or_holder():
    """The master key on every route; on SELF_SERVICE routes a virtual key as well."""
    if request.endpoint not in SELF_SERVICE:
        master_only()
        return
    identity = services().auth.authenticate(request.environ)
    g.identity = identity
    record = g.get("record")
    if record is not None:
        record.caller = identity.label


def own_record(identity: Identity, key: str | None) -> dict:
    """The calling key's current record; 403 when `key` names another key. A regenerated key's
    old copy (in its grace period) reads the key it now belongs to."""
    token = identity.token  # the head's token, also for an old copy
    if key is not None and KeyStore.token_of(key) not in (token, hash_key(credential_from(request.environ))):
        raise GatewayError(403, "A virtual key may read only its own information", "permission_error")
    record = store().get(token)
    if record is None:  # deleted since it authenticated (the cache lags by up to a few seconds)
        raise GatewayError(401, "Invalid API key", "auth_error", kind="invalid_key")
    return record


def store():
    return services().keystore


def json_body() -> dict:
    """The request's JSON object, money read exactly (model_max_budget holds amounts too)."""
    return json_object(MONEY_FIELDS, nested_money=("model_max_budget",))


def public(record: dict, totals: dict | None = None) -> dict:
    """A record as shown to admins: internal fields dropped, spend merged in (`totals`, when
    read already), the live copies it was regenerated from listed with their ends (a superseded
    copy says so itself)."""
    shown = {k: v for k, v in record.items() if k not in ("expires_at", "created_epoch")}
    if "previous_tokens" in record:
        head_end = record.get("expires_at") or float("inf")  # a copy never outlives its head
        shown["previous_tokens"] = [{"token": token, "expires": iso(min(end, head_end))}
                                    for token, end in sorted(record["previous_tokens"].items(), key=lambda i: i[1])]
    if totals is None:
        try:
            totals = services().accounting.key_totals(record["token"], record)
        except REDIS_ERRORS:
            raise unavailable() from None
    shown.update(totals)
    if services().alerts is not None:  # budget alerts on: which thresholds this period already alerted
        try:
            shown["budget_alerts_sent"] = alerts_sent(services().alerts, record["token"], record)
        except REDIS_ERRORS:
            raise unavailable() from None
    return shown


def _identified(payload: dict) -> dict:
    """The record named by `key` (key or token) or else `key_alias`."""
    for field in ("key", "key_alias"):
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or not value or not encodable(value):
            raise GatewayError(400, f"{field}: must be a non-empty string of valid Unicode text", param=field)
        return store().find(key=value) if field == "key" else store().find(alias=value)
    raise GatewayError(400, "key: give the key (or its token), or key_alias", param="key")


@bp.post("/generate")
def generate():
    fields = validate_fields(json_body(), KEY_FIELDS)
    services().teams.require(fields.get("team_id"))  # a key's team must exist (400 otherwise)
    created = store().generate(fields, caller=admin_caller())
    return jsonify(public(created))


@bp.get("/info")
def info():
    """The master key: any key's record by ?key= (no key: just the role). A virtual key: its own
    record, with what its rate limits leave this minute."""
    only_args("key")
    key = request.args.get("key") or None
    identity: Identity = g.identity
    if identity.is_master:
        if key is None:
            return jsonify({"role": "master", "key": None, "info": None})
        record = store().find(key=key)
        return jsonify({"role": "master", "key": record["token"], "info": public(record)})
    record = own_record(identity, key)
    shown = public(record)
    try:
        limiter = services().limiter
        shown["limits"] = limiter.remaining(record["token"], record)
        models = modellimits.remaining(limiter.redis, limiter.names, record["token"], record)
        if models is not None:  # per-model limits: what each model has left
            shown["limits"]["models"] = models
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify({"role": "key", "key": record["token"], "info": shown})


@bp.get("/usage")
def usage():
    """A key's requests, tokens and spend per hour or day (interval, start_date, end_date as in
    /spend/report). A virtual key reads its own; the master key names one with ?key=."""
    only_args("key", "interval", "start_date", "end_date")
    key = request.args.get("key") or None
    identity: Identity = g.identity
    if identity.is_master:
        if key is None:
            raise GatewayError(400, "key: pass ?key=<key or token>", param="key")
        record = store().find(key=key)
    else:
        record = own_record(identity, key)
    interval = choice_arg("interval", INTERVALS, "day")
    start, end = report_window(interval)
    tokens = [record["token"], *record.get("previous_tokens", {})]
    try:
        report = services().accounting.log.counters.key_report(tokens, interval, start, end)
    except REDIS_ERRORS:
        raise unavailable() from None
    return jsonify({"key": record["token"], "key_alias": record.get("key_alias"), **in_dollars(report)})


@bp.get("/list")
def list_keys():
    """Live keys, newest first; a regenerated key's old copy still in its grace period is listed
    too (its full object says `status: "superseded"`)."""
    only_args("page", "size", "key_alias", "user_id", "team_id", "return_full_object", "search")
    full = bool_arg("return_full_object")
    search = request.args.get("search") or None
    if search is not None and (len(search) > 256 or not encodable(search)):
        raise GatewayError(400, "search: must be valid text of at most 256 characters", param="search")
    result = store().list(
        page=int_arg("page", 1, 1, 10**6), size=int_arg("size", 10, 1, 100),
        key_alias=request.args.get("key_alias"), user_id=request.args.get("user_id"),
        team_id=request.args.get("team_id"), full=full, search=search)
    if full:
        try:
            totals = services().accounting.keys_totals(result["keys"])
        except REDIS_ERRORS:
            raise unavailable() from None
        result["keys"] = [public(r, t) for r, t in zip(result["keys"], totals)]
    return jsonify(result)


@bp.post("/update")
def update():
    payload = json_body()
    record = _identified(payload)
    changes = {k: v for k, v in payload.items() if k != "key" and not (k == "key_alias" and "key" not in payload)}
    never = changes.get("duration") in ("-1", -1)
    if never:
        changes.pop("duration")
    changes = validate_fields(changes, UPDATABLE)
    services().teams.require(changes.get("team_id"))
    if never:
        changes["duration"] = None
    updated = store().update(record, changes, caller=admin_caller())
    return jsonify(public(updated))


@bp.post("/delete")
def delete():
    payload = reject_unknown(json_body(), {"keys", "key_aliases"})
    keys, aliases = payload.get("keys"), payload.get("key_aliases")
    if not keys and not aliases:
        raise GatewayError(400, "keys: give a non-empty list of keys, or key_aliases", param="keys")
    for field, value in (("keys", keys), ("key_aliases", aliases)):
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise GatewayError(400, f"{field}: must be a list of strings", param=field)
    records = [store().find(key=k) for k in keys or []] + [store().find(alias=a) for a in aliases or []]
    store().delete(records, caller=admin_caller())
    return jsonify({"deleted_keys": (keys or []) + (aliases or [])})


@bp.post("/regenerate")
def regenerate():
    payload = reject_unknown(json_body(), {"key", "key_alias", "grace_period", "new_key"})
    record = _identified(payload)
    grace = payload.get("grace_period")
    grace_seconds = None
    if grace is not None:
        try:
            grace_seconds = parse_duration(grace)
        except ValueError as exc:
            raise GatewayError(400, f"grace_period: {exc}", param="grace_period") from None
    custom = KEY_FIELDS["key"]("new_key", payload.get("new_key"))
    return jsonify(public(store().regenerate(record, grace_seconds, custom, caller=admin_caller())))


def _set_blocked(blocked: bool):
    payload = reject_unknown(json_body(), {"key", "key_alias"})
    record = _identified(payload)
    action = "block" if blocked else "unblock"
    return jsonify(public(store().update(record, {"blocked": blocked}, caller=admin_caller(), action=action)))


@bp.post("/block")
def block():
    return _set_blocked(True)


@bp.post("/unblock")
def unblock():
    return _set_blocked(False)
