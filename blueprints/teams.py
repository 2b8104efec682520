"""Admin API for teams, in LiteLLM's names and shapes (master key only): /team/new, /team/info,
/team/list, /team/update, /team/delete, /team/block, /team/unblock.

Deleting a team that still has keys is refused (409): detaching them would silently lift the
team's budget and limits off keys an admin gave to the team.
"""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from blueprints import services
from blueprints.args import int_arg, only_args
from blueprints.audit import admin_caller, master_only
from blueprints.jsonbody import json_object
from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable
from gateway.keys.fields import reject_unknown
from gateway.usage.budgetalerts import alerts_sent
from gateway.teams.fields import TEAM_MONEY_FIELDS, team_id_field, validate_team

bp = Blueprint("teams", __name__, url_prefix="/team")
bp.before_request(master_only)

KEYS_SHOWN = 100  # /team/info lists this many of the team's keys (key_count counts them all)


def teams():
    return services().teams


def json_body() -> dict:
    """The request's JSON object, money read exactly."""
    return json_object(TEAM_MONEY_FIELDS)


def _team_keys(team_id: str, size: int = KEYS_SHOWN) -> dict:
    """The team's live keys (tokens, newest first) and how many there are."""
    return services().keystore.list(page=1, size=size, team_id=team_id)


def shown(team: dict, with_keys: bool = False) -> dict:
    """A team as admins see it: its fields, its spend (all time and this budget period), when
    the period resets, and what its rate limits leave this minute."""
    svc = services()
    subject = svc.accounting.names.team_subject(team["team_id"])
    try:
        totals = svc.accounting.key_totals(subject, team)
        limits = svc.limiter.remaining(subject, team)
    except REDIS_ERRORS:
        raise unavailable() from None
    info = {k: v for k, v in team.items() if k != "created_epoch"}
    info.update(totals, limits=limits)
    if svc.alerts is not None:
        try:
            info["budget_alerts_sent"] = alerts_sent(svc.alerts, subject, team)
        except REDIS_ERRORS:
            raise unavailable() from None
    keys = _team_keys(team["team_id"])
    info["key_count"] = keys["total_count"]
    if with_keys:
        info["keys"] = keys["keys"]
    return info


@bp.post("/new")
def new():
    payload = json_body()
    team_id = payload.get("team_id")
    team_id = None if team_id is None else team_id_field(team_id)
    team = teams().create(team_id, validate_team(payload), caller=admin_caller())
    return jsonify(shown(team))


@bp.get("/info")
def info():
    only_args("team_id")
    team_id = request.args.get("team_id")
    if not team_id:
        raise GatewayError(400, "team_id: pass ?team_id=<team id>", param="team_id")
    team = shown(teams().find(team_id_field(team_id)), with_keys=True)
    return jsonify({"team_id": team["team_id"], "team_info": team, "keys": team.pop("keys")})


@bp.get("/list")
def list_teams():
    """Every team (a JSON array, as LiteLLM answers), newest first; `page`/`size` (≤ 100) page it."""
    only_args("page", "size")
    result = teams().list(page=int_arg("page", 1, 1, 10**6), size=int_arg("size", 100, 1, 100))
    return jsonify([shown(team) for team in result["teams"]])


def _named_team(payload: dict) -> dict:
    if "team_id" not in payload:
        raise GatewayError(400, "team_id: name the team", param="team_id")
    return teams().find(team_id_field(payload["team_id"]))


@bp.post("/update")
def update():
    payload = json_body()
    team = _named_team(payload)
    changes = validate_team(payload)
    return jsonify(shown(teams().update(team["team_id"], changes, caller=admin_caller())))


@bp.post("/delete")
def delete():
    payload = reject_unknown(json_body(), {"team_ids"})
    team_ids = payload.get("team_ids")
    if not isinstance(team_ids, list) or not team_ids or len(team_ids) > 100:
        raise GatewayError(400, "team_ids: give a list of 1 to 100 team ids", param="team_ids")
    team_ids = [team_id_field(t) for t in team_ids]
    counts = {t: _team_keys(t, 1)["total_count"] for t in team_ids}
    teams().delete(team_ids, counts, caller=admin_caller())
    return jsonify({"deleted_teams": team_ids})


def _set_blocked(blocked: bool):
    team = _named_team(reject_unknown(json_body(), {"team_id"}))
    action = "team_block" if blocked else "team_unblock"
    return jsonify(shown(teams().update(team["team_id"], {"blocked": blocked}, caller=admin_caller(), action=action)))


@bp.post("/block")
def block():
    return _set_blocked(True)


@bp.post("/unblock")
def unblock():
    return _set_blocked(False)


