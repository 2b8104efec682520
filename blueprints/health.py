"""Liveness and readiness probes; public, no key needed.

Readiness shows anyone the states (so load balancers and uptime checks work without a key);
replica URLs, in-flight counts and error details (the internal vLLM address, its last error)
only to a caller presenting the master key.
"""
from flask import Blueprint, jsonify, request

from blueprints import services
from gateway.core.redisconn import check_health
from gateway.keys.auth import credential_from

bp = Blueprint("health", __name__, url_prefix="/health")


@bp.get("/liveliness")
@bp.get("/liveness")
def liveness():
    """The process answers: LiteLLM's exact reply, so existing probes keep matching."""
    return jsonify("I'm alive!")


def _is_master() -> bool:
    # Only the master key's digest is compared: no key store lookup, no 401 for a probe.
    credential = credential_from(request.environ)
    return bool(credential) and services().auth.is_master(credential)


def _keystore_check() -> dict:
    # PING; a cluster's state and Sentinel's current master too (the detail is for the master key only).
    ok, detail = check_health(services().redis)
    check = {"status": "up" if ok else "down", "detail": detail}
    if not services().settings.redis_url:
        # ALLOW_EPHEMERAL_KEYSTORE: ready, but every key is lost when this process stops.
        check["ephemeral"] = True
        check["detail"] += "; in-process store (no REDIS_URL): keys are lost at restart"
    return check


@bp.get("/readiness")
def readiness():
    """Each dependency's state; 503 when any is down."""
    replicas = services().replicas.status()
    up = sum(r["status"] == "up" for r in replicas)
    checks = {
        "upstream": {"status": "up" if up else "down", "detail": f"{up} of {len(replicas)} vLLM replicas answer",
                     "replicas": replicas},
        "keystore": _keystore_check(),
    }
    healthy = all(c["status"] == "up" for c in checks.values())
    status = "healthy" if healthy else "unhealthy"
    if healthy and up < len(replicas):
        status = "degraded"  # still serving on the replicas that answer
    if not _is_master():
        checks = {name: _public(check) for name, check in checks.items()}
    return jsonify({"status": status, "dependencies": checks}), 200 if healthy else 503


def _public(check: dict) -> dict:
    """States only: no addresses, counts of in-flight requests or error texts."""
    shown = {k: v for k, v in check.items() if k in ("status", "ephemeral")}
    if "replicas" in check:
        shown["replicas"] = [{"status": r["status"]} for r in check["replicas"]]
    return shown
