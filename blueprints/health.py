"""Liveness and readiness probes; public, no key needed."""
from flask import Blueprint, jsonify

from blueprints import services

bp = Blueprint("health", __name__, url_prefix="/health")


@bp.get("/liveliness")
@bp.get("/liveness")
def liveness():
    """The process answers: LiteLLM's exact reply, so existing probes keep matching."""
    return jsonify("I'm alive!")


@bp.get("/readiness")
def readiness():
    """Each dependency's state; 503 when any is down."""
    checks = {}
    replicas = services().replicas.status()
    up = sum(r["status"] == "up" for r in replicas)
    checks["upstream"] = {"status": "up" if up else "down",
                          "detail": f"{up} of {len(replicas)} vLLM replicas answer",
                          "replicas": replicas}
    keystore = services().keystore
    if keystore is not None:
        ok, detail = keystore.ping()
        checks["keystore"] = {"status": "up" if ok else "down", "detail": detail}
    healthy = all(c["status"] == "up" for c in checks.values())
    status = "healthy" if healthy else "unhealthy"
    if healthy and up < len(replicas):
        status = "degraded"  # still serving on the replicas that answer
    return jsonify({"status": status, "dependencies": checks}), 200 if healthy else 503
