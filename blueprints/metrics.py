"""`GET /metrics`: the gateway's own Prometheus metrics (vLLM's are at /vllm/metrics)."""
from flask import Blueprint, Response, current_app, request

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    """Master key required unless METRICS_PUBLIC=1."""
    if not current_app.config["GATEWAY_SETTINGS"].metrics_public:
        current_app.extensions["gateway.auth"].require_master(request.environ)
    body, content_type = current_app.extensions["gateway.metrics"].render()
    return Response(body, content_type=content_type)
