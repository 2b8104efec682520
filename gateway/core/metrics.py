"""Prometheus metrics of the gateway itself (vLLM's own are at /vllm/metrics).

Under gunicorn every worker writes its values to files in PROMETHEUS_MULTIPROC_DIR (set up by
gunicorn.conf.py) and /metrics adds them up with prometheus_client's multiprocess collector, so
the figures are the same whichever worker answers. Without that variable (tests, one process)
an ordinary per-app registry is used.

Label children are cached per label tuple: `labels()` takes a lock and builds a key each time,
which is measurable at thousands of requests per second.
"""
from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

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
        self.key_alias_label = LabelBudget(MAX_KEY_ALIAS_LABELS)
        self.model_label = LabelBudget(MAX_MODEL_LABELS)

    # -- hooks ------------------------------------------------------------------------------
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
