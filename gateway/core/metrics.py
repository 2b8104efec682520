"""Prometheus metrics of the gateway itself (vLLM's own are at /vllm/metrics).

Under gunicorn every worker writes its values to files in PROMETHEUS_MULTIPROC_DIR (set up by
gunicorn.conf.py) and /metrics adds them up with prometheus_client's multiprocess collector, so
the figures are the same whichever worker answers. Without that variable (tests, one process)
an ordinary per-app registry is used.

Label children are cached per label tuple: `labels()` takes a lock and builds a key each time,
which is measurable at thousands of requests per second.

The refusal and upstream-error counters exist from start-up, at 0, for every label value the
code can produce (AUTH_FAILURE_REASONS, RATE_LIMIT_KINDS, UPSTREAM_ERROR_KINDS × replica), so a
dashboard or an alert sees 0 -> 1 rather than a series that appears with its first event. The
two `*_up` gauges are set by the worker that renders /metrics, from probes bounded in time.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

from gateway.relay.admission import SHED_REASONS
from gateway.relay.choice import ROUTE_REASONS

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# vLLM path prefix -> route group (first match wins)
_GROUPS = (
    ("/v1/chat/completions", "chat_completions"), ("/v1/completions", "completions"),
    ("/v1/responses", "responses"), ("/v1/messages", "messages"), ("/v1/embeddings", "embeddings"),
    ("/v2/embed", "embeddings"), ("/v1/audio/", "audio"), ("/v1/models", "models"),
    ("/tokenize", "tokenize"), ("/detokenize", "tokenize"), ("/pooling", "pooling"),
    ("/classify", "pooling"), ("/score", "scoring"), ("/v1/score", "scoring"), ("/rerank", "scoring"),
    ("/v1/rerank", "scoring"), ("/v2/rerank", "scoring"), ("/invocations", "invocations"),
    ("/metrics", "vllm_metrics"), ("/health", "vllm_health"), ("/ping", "vllm_health"),
    ("/version", "vllm_health"), ("/load", "vllm_health"),
)


# Every label value the refusal and upstream-error counters can take, created at 0 at start-up.
# The ONE list: tests/unit/core/test_metrics_startup_series.py reads the raising code (every
# GatewayError with status 401, 429 or a kind=..., every upstream_error(...) call and
# gateway.relay.upstream's failure kinds) and fails when a value raised is missing here or a
# value here is raised nowhere.
AUTH_FAILURE_REASONS = ("missing_key", "invalid_key", "expired_key", "regenerated_key", "blocked_key",
                        "keystore_unavailable")
RATE_LIMIT_KINDS = ("rpm", "tpm", "parallel", "budget_held")
UPSTREAM_ERROR_KINDS = (
    "connection_refused", "name_resolution_failed", "timed_out", "connection_reset",  # never connected
    "response_head_too_large", "connection_closed_without_a_response",
    "connect_timeout", "read_timeout", "head_timeout", "bad_response", "bad_request", "stream_broken",
)
# A transport failure failure_kind() cannot name is labelled with its exception's class name:
# those few are the only upstream kinds that appear with their first event.

# Load-aware routing (gateway/relay/choice.py, admission.py): the decision and shed reasons are
# fixed sets, created at 0 (for every replica) at start-up like the upstream errors.
# The figures of vgw_replica_load (set by the worker answering the scrape, from its shared copy).
LOAD_FIGURES = ("waiting", "running", "kv", "preemption_rate", "prefix_cache_hit_rate", "age")
# Token reconciliation (gateway/relay/reconcile.py): the kinds compared and how a window ended.
RECONCILE_KINDS = ("prompt", "generation")
RECONCILE_OUTCOMES = ("ok", "drift", "void")
_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

PROBE_DEADLINE = 2.0  # /metrics waits this long at most for the vLLM and Redis probes
PROBE_REUSE = 1.0     # a finished probe started less than this ago is reused (scrapes cannot multiply probes)


def route_group(vllm_path: str) -> str:
    for prefix, group in _GROUPS:
        if vllm_path.startswith(prefix):
            return group
    return "other"


# Label values a caller can choose are bounded, so no caller (with or without a key) can
# create series at will: methods outside HTTP's registered set, statuses outside 100-599 and
# names past a per-worker budget all share one "other" series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
MAX_KEY_ALIAS_LABELS = 1000
MAX_MODEL_LABELS = 100
OTHER = "other"


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else OTHER


def status_label(status) -> str:
    return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER


class LabelBudget:
    """The first `limit` distinct values pass as they are; later new ones become "other"."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


def _cached(metric):
    children = {}

    def child(*labels):
        found = children.get(labels)
        if found is None:
            found = children[labels] = metric.labels(*labels)
        return found
    return child


class ScrapeToken:
    """METRICS_TOKEN: a credential that opens GET /metrics and nothing else. Compared in
    constant time on digests (the time depends neither on the token's length nor its content)."""

    __slots__ = ("_digest",)

    def __init__(self, token: str | None):
        self._digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest() if token else None

    def matches(self, credential: str | None) -> bool:
        if self._digest is None or not credential:
            return False
        digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._digest)


class _Probe:
    __slots__ = ("thread", "started", "up")

    def __init__(self, check):
        self.started = time.monotonic()
        self.up = False
        self.thread = threading.Thread(target=self._run, args=(check,), daemon=True, name="vgw-metrics-probe")
        self.thread.start()

    def _run(self, check) -> None:
        try:
            self.up = bool(check())
        except Exception:  # noqa: BLE001 - whatever a probe raises, the dependency is down
            self.up = False


class Probes:
    """Health checks with a deadline, for the `*_up` gauges. Each check runs in its own thread
    (a greenlet under gevent), so a hanging vLLM or Redis costs /metrics PROBE_DEADLINE at most,
    not the sum of every timeout; a check still hanging from an earlier scrape is reported down
    and not started again, so probes never pile up; a finished one started less than PROBE_REUSE
    ago is reused, and a scrape arriving while one runs waits for it rather than start another."""

    def __init__(self, deadline: float = PROBE_DEADLINE, reuse: float = PROBE_REUSE):
        self.deadline = deadline
        self.reuse = reuse
        self._probes: dict = {}

    def run(self, checks: dict) -> dict:
        """{name: up} for {name: check()}; a check that raises or outlasts the deadline is down."""
        now = time.monotonic()
        waiting = {}
        for name, check in checks.items():
            probe = self._probes.get(name)
            if probe is None or (not probe.thread.is_alive() and now - probe.started >= self.reuse):
                probe = self._probes[name] = _Probe(check)
            waiting[name] = probe
        for probe in waiting.values():  # each is waited for until DEADLINE after it started, no longer
            probe.thread.join(max(probe.started + self.deadline - time.monotonic(), 0.0))
        return {name: probe.up and not probe.thread.is_alive() for name, probe in waiting.items()}


class Metrics:
    def __init__(self):
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = _cached(Counter("vgw_requests_total", "Requests answered by the gateway",
                                        ["route", "method", "status"], registry=r))
        self.latency = _cached(Histogram("vgw_request_duration_seconds", "Whole request, body included",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=r))
        self.ttfb = _cached(Histogram("vgw_time_to_first_byte_seconds", "Request start to first body byte",
                                      ["route"], buckets=_LATENCY_BUCKETS, registry=r))
        self.streams_open = Gauge("vgw_streams_open", "Responses being streamed right now",
                                  multiprocess_mode="livesum", registry=r)
        self.upstream_errors = _cached(Counter("vgw_upstream_errors_total", "Failures talking to vLLM",
                                               ["kind", "replica"], registry=r))
        self.auth_failures = _cached(Counter("vgw_auth_failures_total", "Refused credentials",
                                             ["reason"], registry=r))
        self.rate_limited = _cached(Counter("vgw_rate_limited_total", "Requests refused by a rate limit",
                                            ["limit"], registry=r))
        self.budget_rejections = Counter("vgw_budget_rejections_total", "Requests refused: budget exceeded",
                                         registry=r)
        self.tokens = _cached(Counter("vgw_tokens_total", "Tokens used, by key alias and model",
                                      ["key_alias", "model", "type"], registry=r))
        self.spend = _cached(Counter("vgw_spend_total", "Spend, by key alias and model",
                                     ["key_alias", "model"], registry=r))
        # "livemostrecent": the value of the worker that probed last wins (a stale worker's never
        # does), and a dead worker's file is dropped with the live gauges (gunicorn.conf.py child_exit).
        self.replica_up = _cached(Gauge("vgw_replica_up", "1 when the vLLM replica answers its health probe",
                                        ["replica"], multiprocess_mode="livemostrecent", registry=r))
        self.redis_up = Gauge("vgw_redis_up", "1 when Redis (the key store) answers PING",
                              multiprocess_mode="livemostrecent", registry=r)
        self.route_decisions = _cached(Counter(
            "vgw_route_decisions_total", "Requests sent to each vLLM replica, by why it was chosen",
            ["replica", "reason"], registry=r))
        self.admission_queue = Gauge("vgw_admission_queue_length", "Requests waiting for a replica with room",
                                     multiprocess_mode="livesum", registry=r)
        self.admission_shed = _cached(Counter("vgw_admission_shed_total",
                                              "Requests refused or given up while every replica was saturated",
                                              ["reason"], registry=r))
        self.admission_wait = Histogram("vgw_admission_wait_seconds", "Time requests waited in the admission queue",
                                        buckets=_WAIT_BUCKETS, registry=r)
        # Shared figures, the same in every worker: the most recent scrape's worker wins.
        self.replica_load = _cached(Gauge("vgw_replica_load", "vLLM's own load figures as routing sees them "
                                          "(age in seconds; NaN: none)", ["replica", "figure"],
                                          multiprocess_mode="livemostrecent", registry=r))
        # Reconciliation, last closed window: set by the worker polling for its instance at each
        # round (so every instance shows the fleet's last window), NaN until one closed. Not created
        # at start-up in the other workers: their initial value would hide the poller's.
        self.tokens_drift = _cached(Gauge("vgw_replica_tokens_drift_ratio", "(gateway - vLLM) / vLLM tokens over "
                                          "the last closed reconciliation window (NaN: none, void or no ratio)",
                                          ["replica", "kind"], multiprocess_mode="livemostrecent", registry=r))
        self.usage_estimated = _cached(Gauge("vgw_replica_usage_estimated_ratio", "Share of the last closed window's "
                                             "requests whose usage was estimated (NaN: none)", ["replica"],
                                             multiprocess_mode="livemostrecent", registry=r))
        self.reconcile_windows = _cached(Counter("vgw_reconcile_windows_total", "Reconciliation windows closed, "
                                                 "by outcome (counted by the one worker that closed each)",
                                                 ["replica", "outcome"], registry=r))
        self.budget_alerts = _cached(Counter("vgw_budget_alerts_total", "Budget alerts, by outcome (queued, "
                                             "delivered, retried, dropped, lost, overflow)", ["outcome"], registry=r))
        self.key_alias_label = LabelBudget(MAX_KEY_ALIAS_LABELS)
        self.model_label = LabelBudget(MAX_MODEL_LABELS)
        self.scrape_token = ScrapeToken(None)
        self.probes = Probes()
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures(reason)
        for kind in RATE_LIMIT_KINDS:
            self.rate_limited(kind)
        for reason in SHED_REASONS:
            self.admission_shed(reason)

    def prepare(self, replicas=(), token: str | None = None, reconcile: bool = False) -> None:
        """At start-up, once the worker's services exist: create the upstream-error series of every
        replica (named as Replicas names them: the base URL, which never holds credentials), the
        reconciliation outcomes when it is on, and take METRICS_TOKEN."""
        for replica in replicas:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors(kind, replica)
            for reason in ROUTE_REASONS:
                self.route_decisions(replica, reason)
            for outcome in RECONCILE_OUTCOMES if reconcile else ():
                self.reconcile_windows(replica, outcome)
        self.scrape_token = ScrapeToken(token)

    def probe(self, replicas: dict, redis_check) -> None:
        """Set vgw_replica_up ({name: check}, each check () -> bool) and vgw_redis_up
        (redis_check () -> bool) from probes bounded by PROBE_DEADLINE; never raises."""
        results = self.probes.run({**{("replica", name): check for name, check in replicas.items()},
                                   ("redis",): redis_check})
        for name in replicas:
            self.replica_up(name).set(1 if results[("replica", name)] else 0)
        self.redis_up.set(1 if results[("redis",)] else 0)

    def show_load(self, loads: dict) -> None:
        """Set vgw_replica_load from {replica: Replicas.load(...) or None} (NaN: unknown)."""
        for replica, load in loads.items():
            load = load or {}
            values = {"waiting": load.get("waiting"), "running": load.get("running"),
                      "kv": load.get("kv_cache_usage"), "preemption_rate": load.get("preemption_rate"),
                      "prefix_cache_hit_rate": load.get("prefix_cache_hit_rate"), "age": load.get("age_s")}
            for figure in LOAD_FIGURES:
                value = values[figure]
                self.replica_load(replica, figure).set(math.nan if value is None else value)

    def show_reconcile(self, replica: str, window) -> None:
        """Set the reconciliation gauges from a replica's last closed window (reconcile.Window or None)."""
        for kind in RECONCILE_KINDS:
            drift = window.drift(kind) if window is not None else None
            self.tokens_drift(replica, kind).set(math.nan if drift is None else drift)
        share = window.estimated_ratio if window is not None else None
        self.usage_estimated(replica).set(math.nan if share is None else share)

    def budget_alert(self, outcome: str, n: int = 1) -> None:
        """The budget alerts' counter hook (gateway/alerts/: gate and deliverer)."""
        self.budget_alerts(outcome).inc(n)

    def reconcile_window(self, replica: str, outcome: str) -> None:
        self.reconcile_windows(replica, outcome).inc()

    # -- hooks ------------------------------------------------------------------------------
    def route_decision(self, replica: str, reason: str) -> None:
        self.route_decisions(replica, reason).inc()

    def observe_request(self, record, duration: float) -> None:
        route = record.route or "other"
        self.requests(route, method_label(record.method), status_label(record.status)).inc()
        self.latency(route).observe(duration)
        if record.ttfb is not None:
            self.ttfb(route).observe(record.ttfb - record.start)

    def upstream_error(self, kind: str, replica: str) -> None:
        self.upstream_errors(kind, replica).inc()

    def refused(self, exc) -> None:
        """Count auth, rate-limit and budget refusals by what the error says."""
        if exc.status == 401 or exc.kind == "keystore_unavailable":
            self.auth_failures(exc.kind or exc.type).inc()
        elif exc.status == 429:
            self.rate_limited(exc.kind or "unknown").inc()
        elif exc.type == "budget_exceeded":
            self.budget_rejections.inc()

    def usage(self, key_alias: str, model: str, prompt: int, completion: int, spend: float) -> None:
        if not (prompt or completion or spend):
            return
        key_alias, model = self.key_alias_label(key_alias), self.model_label(model)
        if prompt:
            self.tokens(key_alias, model, "prompt").inc(prompt)
        if completion:
            self.tokens(key_alias, model, "completion").inc(completion)
        if spend:
            self.spend(key_alias, model).inc(spend)

    # -- exposition -------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
