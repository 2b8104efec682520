"""`GET /metrics`: the gateway's own Prometheus metrics (vLLM's are at /vllm/metrics)."""
from flask import Blueprint, Response, g, request

from blueprints import services
from gateway.core.metrics import PROBE_DEADLINE
from gateway.core.redisconn import check_health
from gateway.keys.auth import credential_from

bp = Blueprint("metrics", __name__)

# A replica's probe is two requests (/health, then /v1/models with the upstream key, as
# /health/readiness does): both fit in the deadline.
PROBE_TIMEOUT = PROBE_DEADLINE / 2


@bp.get("/metrics")
def metrics():
    """The master key or METRICS_TOKEN (which opens this route and nothing else); no key at all
    with METRICS_PUBLIC=1. Anything else is refused as require_master refuses it."""
    gateway = services()
    if gateway.metrics.scrape_token.matches(credential_from(request.environ)):
        _caller("metrics_token")
    elif not gateway.settings.metrics_public:
        _caller(gateway.auth.require_master(request.environ).label)
    # The answering worker probes vLLM and Redis (waiting PROBE_DEADLINE at most) for the *_up gauges.
    redis = gateway.redis
    gateway.metrics.probe({replica.name: _replica_check(replica) for replica in gateway.replicas.replicas},
                          lambda: check_health(redis)[0])
    if gateway.replicas.load_aware:  # the shared figures and their age, as this worker holds them
        gateway.metrics.show_load({replica.name: gateway.replicas.load(replica) for replica in gateway.replicas.replicas})
    body, content_type = gateway.metrics.render()
    return Response(body, content_type=content_type)


def _replica_check(replica):
    return lambda: replica.upstream.probe(PROBE_TIMEOUT)[0]


def _caller(label: str) -> None:
    record = g.get("record")
    if record is not None:
        record.caller = label
