"""`GET /replicas` (master key): each vLLM replica as the gateway sees it, and as it sees itself.

The gateway's view: up or down (its /health and /v1/models answer), requests this worker has in
flight there, the cool-off left after a failure and the last error. vLLM's view: requests running
and waiting and KV-cache use, read from its /metrics at the time of the call (`vllm`), and the
figures routing uses, shared through Redis, with their age (`load`; null when load-aware routing
is off). `routing` says how this worker routes: the poller lease and the admission queue.
Token reconciliation: each replica's last closed window (`reconciliation`: the gateway's and
vLLM's token totals, drift ratios, the share of requests whose usage was estimated; null until a
window closed, or when reconciliation is off), read from Redis, and the settings it runs with.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from blueprints import services
from blueprints.args import only_args
from blueprints.audit import master_only
from gateway.relay.vllmload import FIGURES, LoadUnreadable, read_load

bp = Blueprint("replicas", __name__)
bp.before_request(master_only)

LOAD_TIMEOUT = 1.0  # seconds per read of a replica's /metrics


def _vllm_load(upstream) -> dict:
    try:
        return {**read_load(upstream, LOAD_TIMEOUT), "error": None}
    except LoadUnreadable as exc:
        return {**dict.fromkeys(FIGURES), "error": str(exc)}


@bp.get("/replicas")
def replicas():
    only_args()
    replicas = services().replicas
    windows, now = _last_windows(replicas)
    shown = []
    for replica, state in zip(replicas.replicas, replicas.status()):
        shown.append({
            "name": state["base"], "status": state["status"], "detail": state["detail"],
            "inflight": state["inflight"], "cooling_off_s": state["cooling_off_s"],
            "last_error": state["last_error"], "vllm": _vllm_load(replica.upstream),
            "load": state.get("load"),
            "reconciliation": _window(windows.get(replica.name), now),
        })
    return jsonify({"replicas": shown, "routing": _routing(services()),
                    "reconciliation": _reconciliation(services(), now is not None)})


def _last_windows(replicas) -> tuple[dict, float | None]:
    """Every replica's last closed window and Redis' clock ({} when off)."""
    gateway = services()
    if replicas.reconciler is None or gateway.redis is None:
        return {}, None
    return replicas.reconciler.read_last(gateway.redis)


def _window(window, now):
    return None if window is None else window.as_json(now)


def _reconciliation(gateway, readable: bool) -> dict:
    settings, replicas = gateway.settings, gateway.replicas
    if replicas.reconciler is None:
        return {"on": False}
    poller = replicas.poller or replicas.reconcile_poller
    return {
        "on": True, "readable": readable,  # False: Redis did not answer, windows unknown
        "window_s": settings.reconcile_window, "drift_threshold": settings.reconcile_drift_threshold,
        "min_tokens": settings.reconcile_min_tokens, "poll_interval_s": settings.poll_interval,
        "poller": {"instance": poller.instance_id, "worker": poller.worker_id, "this_worker_polls": poller.holder},
    }


def _routing(gateway) -> dict:
    replicas, admission = gateway.replicas, gateway.admission
    poller = replicas.poller
    return {
        "load_aware": replicas.load_aware,
        "affinity": bool(replicas.policy and replicas.policy.affinity),
        "poller": None if poller is None else {"instance": poller.instance_id, "worker": poller.worker_id,
                                               "this_worker_polls": poller.holder},
        "queue": None if admission is None else {"length": admission.length, "max": admission.max_waiting,
                                                 "timeout_s": admission.timeout},
    }
