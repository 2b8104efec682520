"""`GET /metrics`: the gateway's own Prometheus metrics (vLLM's are at /vllm/metrics)."""
from flask import Blueprint, Response, request

from blueprints import services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    """Master key required unless METRICS_PUBLIC=1."""
    if not services().settings.metrics_public:
        services().auth.require_master(request.environ)
    body, content_type = services().metrics.render()
    return Response(body, content_type=content_type)
