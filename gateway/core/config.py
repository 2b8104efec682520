"""Configuration: read once from the environment, validated at start-up.

Nothing here imports `requests`, `ssl` or `redis`: `gunicorn.conf.py` calls
`load_settings()` in the master before gevent patches the workers.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from urllib.parse import parse_qs, quote, unquote, urlsplit

from gateway.alerts.thresholds import DEFAULT_THRESHOLDS as DEFAULT_ALERT_THRESHOLDS, parse_thresholds
from gateway.usage import periods

# Values published in docs and tutorials; anyone could guess them.
KNOWN_WEAK_KEYS = frozenset({
    "sk-1234", "sk-12345", "sk-123456", "sk-1234567890", "sk-master", "sk-admin",
    "sk-test", "sk-secret", "changeme", "password", "secret", "master-key",
})
MIN_MASTER_KEY_LENGTH = 16
MIN_METRICS_TOKEN_LENGTH = 16
MAKE_KEY_HINT = (
    "generate one with: python -c \"import secrets; print('sk-' + secrets.token_urlsafe(32))\""
)


class ConfigError(ValueError):
    """The environment does not describe a gateway that may start."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its environment."""

    upstream_bases: tuple
    master_key: str
    upstream_key: str | None = None
    allow_weak_master_key: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    head_timeout: float | None = None  # None: the read timeout
    upstream_trust_env: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    body_read_timeout: float = 30.0  # whole request body must arrive within this (408 after)
    upstream_pool_size: int = 1000
    redis_url: str | None = None
    allow_ephemeral_keystore: bool = False  # no REDIS_URL: keys in one process, lost at restart
    redis_ssl_cert_reqs: str = "required"
    redis_pool_size: int = 8  # per worker, pub/sub included: 2 workers x 8 fit a 20-connection plan
    redis_pool_timeout: float = 5.0  # wait for a free pooled connection under a burst
    redis_socket_timeout: float = 2.0
    redis_prefix: str = "vgw:"
    redis_cluster: bool = False  # REDIS_CLUSTER=1: REDIS_URL names any node of a Redis Cluster
    redis_sentinel_username: str | None = None  # Sentinel's own ACL user (the data nodes' is in REDIS_URL)
    redis_sentinel_password: str | None = None
    redis_sentinel_ssl: bool = False  # TLS to the Sentinels and the data nodes (as rediss+sentinel://)
    access_log: bool = True
    upstream_cooloff: float = 10.0
    upstream_max_idle: float = 4.0
    metrics_public: bool = False
    # METRICS_TOKEN: a read-only credential for GET /metrics (a Prometheus scraper's bearer token);
    # it opens nothing else. At least 16 characters, not the master key; never echoed or logged.
    metrics_token: str | None = dataclasses.field(default=None, repr=False)
    upstream_ca_bundle: str | None = None
    key_cache_ttl: float = 0.9
    prices: dict = dataclasses.field(default_factory=dict)
    spend_log_max: int = 100_000
    parallel_lease_seconds: float = 120.0
    end_user_stats_ttl: float = 30 * 86400.0  # per (key, end user) stats live this long after their last request
    spend_log_key_max: int = 10_000  # spend-log entries kept per key (its index), 0: none
    spend_log_end_user_max: int = 1_000  # per end user
    budget_default_max_tokens: int = 1024  # output tokens reserved for a budgeted request with no max_tokens
    # BUDGET_RESETS: "creation" (periods counted from the key's creation) or "calendar" (midnight,
    # Monday, the 1st, in BUDGET_TIMEZONE); gateway/usage/periods.py.
    budget_resets: str = "creation"
    budget_timezone: str = "UTC"
    # Budget alerts (gateway/alerts/): off without ALERT_WEBHOOK_URL. The URL may carry a token
    # and the secret signs every call: neither is ever shown (repr=False) or logged.
    alert_webhook_url: str | None = dataclasses.field(default=None, repr=False)
    alert_webhook_secret: str | None = dataclasses.field(default=None, repr=False)
    budget_alert_thresholds: tuple = DEFAULT_ALERT_THRESHOLDS  # Fractions of max_budget
    alert_webhook_max_attempts: int = 10
    alert_webhook_max_age: float = 86400.0
    alert_webhook_backoff_base: float = 2.0
    alert_webhook_backoff_cap: float = 600.0
    alert_webhook_connect_timeout: float = 2.0
    alert_webhook_read_timeout: float = 5.0
    alert_webhook_lease: float = 60.0
    alert_webhook_poll_interval: float = 1.0
    alert_outbox_max: int = 10_000
    alert_webhook_trust_env: bool = False
    # Load-aware routing (README "Routing by vLLM's own load"; gateway/relay/choice.py).
    # ROUTING_STRATEGY: "load" (vLLM's figures), "least_busy" (fewest in flight in the worker; what
    # ROUTING_LOAD_AWARE=0 means) or "round_robin" (each worker takes the replicas in turn, healthy first).
    routing_strategy: str = "load"
    routing_load_aware: bool = True      # read vLLM's /metrics and route on them (strategy "load")
    routing_poll_interval: float = 0.25  # seconds between two reads of every replica's /metrics
    routing_poll_timeout: float = 0.5    # one read's connect/read timeout (its body: 3x)
    routing_stale_after: float = 2.0     # figures older than this are not used
    routing_max_waiting: int = 8         # saturated at this many requests waiting in vLLM
    routing_max_kv: float = 0.95         # saturated at this KV-cache use (0..1)
    routing_max_inflight: int = 0        # saturated at running + waiting >= this (0: no cap)
    routing_weight_queue: float = 1.0
    routing_weight_running: float = 1.0
    routing_weight_kv: float = 2.0
    routing_affinity: bool = True        # a session's requests go to one replica (prefix cache)
    routing_affinity_slack: float = 4.0  # ... unless its score exceeds the best by more than this
    routing_affinity_prefix_bytes: int = 1024
    routing_admission: bool | None = None  # queue when every replica is saturated; None: with several replicas
    routing_queue_max: int = 256         # requests queued per worker (0: refuse at once when saturated)
    routing_queue_timeout: float = 30.0  # longest wait in the queue, then 503
    instance_id: str | None = None       # GATEWAY_INSTANCE_ID; None: host name and gunicorn master pid
    # Token reconciliation (gateway/relay/reconcile.py): the gateway's token totals per replica
    # against vLLM's own counters, over windows shared by every worker and instance.
    # On by default: a tally per worker, and with one replica a /metrics read per instance every
    # RECONCILE_POLL_INTERVAL (RECONCILE=0: off).
    reconcile: bool = True
    reconcile_window: float = 60.0       # seconds per window
    reconcile_drift_threshold: float = 0.05  # |gateway - vLLM| / vLLM above this is logged (once per window)
    reconcile_min_tokens: int = 1000     # kinds with fewer tokens in a window are shown but never logged
    reconcile_poll_interval: float = 5.0  # /metrics read pace when routing does not poll (else ROUTING_POLL_INTERVAL)

    def __post_init__(self):
        _validate(self)

    @property
    def routing_admission_on(self) -> bool:
        """Admission control applies: load-aware routing is on, and ROUTING_ADMISSION says so
        (unset: with several replicas; one replica then needs no polling at all)."""
        if not self.routing_load_aware:
            return False
        return self.routing_admission if self.routing_admission is not None else len(self.upstream_bases) > 1

    @property
    def routing_polls(self) -> bool:
        """Whether routing reads vLLM's /metrics: there is a choice to make or a queue to keep
        (reconciliation reads them too: `poll_interval`)."""
        return self.routing_load_aware and (len(self.upstream_bases) > 1 or self.routing_admission_on)

    @property
    def poll_interval(self) -> float:
        """How often the instance's poller reads /metrics: routing's pace when routing polls,
        else reconciliation's slower one."""
        return self.routing_poll_interval if self.routing_polls else self.reconcile_poll_interval

    @property
    def redis_topology(self) -> "RedisTopology | None":
        """Where Redis is (one node, a Sentinel-watched master, or a cluster); None without Redis."""
        return redis_topology(self)

    @property
    def upstream_base(self) -> str:
        """The first (or only) vLLM base."""
        return self.upstream_bases[0]


def _validate(s: Settings) -> None:
    if not s.master_key:
        raise ConfigError(
            f"LITELLM_MASTER_KEY is not set; the gateway never runs without an admin key — {MAKE_KEY_HINT}"
        )
    weak = s.master_key in KNOWN_WEAK_KEYS or len(s.master_key) < MIN_MASTER_KEY_LENGTH
    if weak and not s.allow_weak_master_key:
        raise ConfigError(
            "LITELLM_MASTER_KEY is publicly known or shorter than "
            f"{MIN_MASTER_KEY_LENGTH} characters; {MAKE_KEY_HINT} "
            "(for local development only, ALLOW_WEAK_MASTER_KEY=1 accepts it)"
        )
    if s.metrics_token is not None:
        check_metrics_token(s.metrics_token, s.master_key)
    if not s.upstream_bases:
        raise ConfigError("HOSTED_VLLM_API_BASE lists no vLLM server")
    if len(set(s.upstream_bases)) != len(s.upstream_bases):
        raise ConfigError("HOSTED_VLLM_API_BASE lists the same server twice")
    if s.upstream_max_idle < 0:
        raise ConfigError("UPSTREAM_KEEPALIVE_SECONDS must not be negative")
    if s.upstream_cooloff < 0:
        raise ConfigError("UPSTREAM_COOLOFF_SECONDS must not be negative")
    if s.connect_timeout <= 0 or s.read_timeout <= 0:
        raise ConfigError("UPSTREAM_CONNECT_TIMEOUT and UPSTREAM_READ_TIMEOUT must be positive")
    if s.head_timeout is not None and s.head_timeout <= 0:
        raise ConfigError("UPSTREAM_HEAD_TIMEOUT must be positive")
    if s.body_read_timeout <= 0:
        raise ConfigError("REQUEST_BODY_TIMEOUT must be positive")
    if s.max_body_bytes <= 0:
        raise ConfigError("MAX_REQUEST_BODY_BYTES must be positive")
    if s.upstream_pool_size <= 0 or s.redis_pool_size <= 0:
        raise ConfigError("UPSTREAM_POOL_SIZE and REDIS_POOL_SIZE must be positive")
    if s.upstream_ca_bundle and not os.path.isfile(s.upstream_ca_bundle):
        raise ConfigError(f"UPSTREAM_CA_BUNDLE: no such file {s.upstream_ca_bundle!r}")
    if not 0 <= s.key_cache_ttl <= 60:
        raise ConfigError("KEY_CACHE_TTL must be between 0 (no cache) and 60 seconds")
    if s.spend_log_max <= 0 or s.parallel_lease_seconds <= 0:
        raise ConfigError("SPEND_LOG_MAX_ENTRIES and PARALLEL_SLOT_LEASE_SECONDS must be positive")
    if min(s.spend_log_key_max, s.spend_log_end_user_max, s.budget_default_max_tokens) < 0:
        raise ConfigError("SPEND_LOG_KEY_MAX_ENTRIES, SPEND_LOG_END_USER_MAX_ENTRIES and BUDGET_DEFAULT_MAX_TOKENS "
                          "must be 0 or more")
    try:
        periods.BudgetCalendar(s.budget_resets, s.budget_timezone)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if s.redis_pool_timeout <= 0 or s.end_user_stats_ttl <= 0:
        raise ConfigError("REDIS_POOL_TIMEOUT and END_USER_STATS_TTL must be positive")
    if s.redis_ssl_cert_reqs not in ("required", "none"):
        raise ConfigError("REDIS_SSL_CERT_REQS must be 'required' or 'none'")
    if s.redis_url is not None:
        check_redis_url(s.redis_url)
    check_redis_topology(s)
    check_routing(s)
    check_alerts(s)
    check_reconcile(s)


ROUTING_STRATEGIES = ("load", "least_busy", "round_robin")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,100}")


def check_routing(s: Settings) -> None:
    """The ROUTING_* settings and GATEWAY_INSTANCE_ID, each refused in one line when out of range."""
    def finite(name, value):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")

    for name, value in (("ROUTING_POLL_INTERVAL", s.routing_poll_interval), ("ROUTING_POLL_TIMEOUT", s.routing_poll_timeout),
                        ("ROUTING_STALE_AFTER", s.routing_stale_after), ("ROUTING_MAX_KV", s.routing_max_kv),
                        ("ROUTING_WEIGHT_QUEUE", s.routing_weight_queue),
                        ("ROUTING_WEIGHT_RUNNING", s.routing_weight_running), ("ROUTING_WEIGHT_KV", s.routing_weight_kv),
                        ("ROUTING_AFFINITY_SLACK", s.routing_affinity_slack),
                        ("ROUTING_QUEUE_TIMEOUT", s.routing_queue_timeout)):
        finite(name, value)
    if s.routing_strategy not in ROUTING_STRATEGIES:
        raise ConfigError(f"ROUTING_STRATEGY must be load, least_busy or round_robin, got {s.routing_strategy!r}")
    if not 0.05 <= s.routing_poll_interval <= 10:
        raise ConfigError("ROUTING_POLL_INTERVAL must be between 0.05 and 10 seconds")
    if not 0 < s.routing_poll_timeout <= 10:
        raise ConfigError("ROUTING_POLL_TIMEOUT must be more than 0 and at most 10 seconds")
    if not 2 * s.routing_poll_interval <= s.routing_stale_after <= 300:
        raise ConfigError("ROUTING_STALE_AFTER must be at least twice ROUTING_POLL_INTERVAL and at most 300 seconds")
    if s.routing_max_waiting < 1:
        raise ConfigError("ROUTING_MAX_WAITING must be 1 or more")
    if not 0 < s.routing_max_kv <= 1:
        raise ConfigError("ROUTING_MAX_KV must be more than 0 and at most 1 (vLLM's KV-cache use is 0..1)")
    if s.routing_max_inflight < 0:
        raise ConfigError("ROUTING_MAX_INFLIGHT_PER_REPLICA must be 0 (no cap) or more")
    if min(s.routing_weight_queue, s.routing_weight_running, s.routing_weight_kv, s.routing_affinity_slack) < 0:
        raise ConfigError("ROUTING_WEIGHT_QUEUE, ROUTING_WEIGHT_RUNNING, ROUTING_WEIGHT_KV and ROUTING_AFFINITY_SLACK "
                          "must be 0 or more")
    if not 16 <= s.routing_affinity_prefix_bytes <= 1024 * 1024:
        raise ConfigError("ROUTING_AFFINITY_PREFIX_BYTES must be between 16 and 1048576")
    if s.routing_queue_max < 0:
        raise ConfigError("ROUTING_QUEUE_MAX must be 0 (refuse at once when every replica is saturated) or more")
    if not 0 < s.routing_queue_timeout <= 3600:
        raise ConfigError("ROUTING_QUEUE_TIMEOUT must be more than 0 and at most 3600 seconds")
    if s.instance_id is not None and not _INSTANCE_ID.fullmatch(s.instance_id):
        raise ConfigError("GATEWAY_INSTANCE_ID must be 1 to 100 letters, digits or . _ : -")


def check_alerts(s: Settings) -> None:
    """ALERT_WEBHOOK_* and BUDGET_ALERT_THRESHOLDS; messages name the setting, never its value.
    The delivery limits repeat gateway/alerts/webhook.DeliveryPolicy's checks (which imports
    `requests`: not here, see the module docstring); app.py builds the policy from these."""
    if s.alert_webhook_url is None:
        return
    parts = urlsplit(s.alert_webhook_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("ALERT_WEBHOOK_URL must be an http:// or https:// URL with a host")
    if not s.alert_webhook_secret or len(s.alert_webhook_secret) < 16:
        raise ConfigError("ALERT_WEBHOOK_SECRET must be set, at least 16 characters, when ALERT_WEBHOOK_URL is "
                          "(e.g. openssl rand -hex 32)")
    if not 1 <= s.alert_webhook_max_attempts <= 100:
        raise ConfigError("ALERT_WEBHOOK_MAX_ATTEMPTS must be 1 to 100")
    if not 0 < s.alert_webhook_max_age <= 7 * 86400:
        raise ConfigError("ALERT_WEBHOOK_MAX_AGE must be above 0 and at most 7 days")
    if not 0 < s.alert_webhook_backoff_base <= s.alert_webhook_backoff_cap:
        raise ConfigError("ALERT_WEBHOOK_BACKOFF_BASE must be above 0 and at most ALERT_WEBHOOK_BACKOFF_CAP")
    if min(s.alert_webhook_connect_timeout, s.alert_webhook_read_timeout, s.alert_webhook_poll_interval) <= 0:
        raise ConfigError("ALERT_WEBHOOK_CONNECT_TIMEOUT, _READ_TIMEOUT and _POLL_INTERVAL must be above 0")
    if s.alert_webhook_lease <= 2 * (s.alert_webhook_connect_timeout + s.alert_webhook_read_timeout):
        raise ConfigError("ALERT_WEBHOOK_LEASE must exceed twice the connect + read timeouts")
    if s.alert_outbox_max < 1:
        raise ConfigError("ALERT_OUTBOX_MAX must be 1 or more")


def _seconds(environ, name: str, default: float) -> float:
    """A duration setting: `24h`, `30m`, … (gateway/core/durations.py) or plain seconds."""
    from gateway.core.durations import parse_duration

    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value) if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value) else float(parse_duration(value))
    except ValueError:
        raise ConfigError(f"{name} must be a duration such as 24h or 30m, or seconds") from None


def _alert_thresholds(environ) -> tuple:
    """BUDGET_ALERT_THRESHOLDS ("0.5,0.8,1.0" or "50%,80%,100%"; set but empty: soft_budget only)."""
    value = environ.get("BUDGET_ALERT_THRESHOLDS")
    if value is None:
        return DEFAULT_ALERT_THRESHOLDS
    try:
        return parse_thresholds(value)
    except ValueError as exc:
        raise ConfigError(f"BUDGET_ALERT_THRESHOLDS: {exc}") from None


def check_reconcile(s: Settings) -> None:
    """The RECONCILE_* settings, each refused in one line when out of range."""
    for name, value in (("RECONCILE_WINDOW", s.reconcile_window),
                        ("RECONCILE_DRIFT_THRESHOLD", s.reconcile_drift_threshold),
                        ("RECONCILE_POLL_INTERVAL", s.reconcile_poll_interval)):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not 1 <= s.reconcile_window <= 86400:
        raise ConfigError("RECONCILE_WINDOW must be between 1 and 86400 seconds")
    if not 0 < s.reconcile_drift_threshold <= 10:
        raise ConfigError("RECONCILE_DRIFT_THRESHOLD must be more than 0 and at most 10 (a ratio: 0.05 is 5%)")
    if s.reconcile_min_tokens < 0:
        raise ConfigError("RECONCILE_MIN_TOKENS must be 0 or more")
    if not 0.05 <= s.reconcile_poll_interval <= 60:
        raise ConfigError("RECONCILE_POLL_INTERVAL must be between 0.05 and 60 seconds")
    if s.reconcile and 4 * s.poll_interval > s.reconcile_window:
        raise ConfigError("RECONCILE_WINDOW must be at least 4 poll intervals (RECONCILE_POLL_INTERVAL, or "
                          "ROUTING_POLL_INTERVAL when load-aware routing polls), so each window has several readings")


def check_metrics_token(token: str, master_key: str) -> None:
    """METRICS_TOKEN opens /metrics only: it must be hard to guess and must not be the master
    key (which opens everything). The token is never echoed."""
    if len(token) < MIN_METRICS_TOKEN_LENGTH:
        raise ConfigError(f"METRICS_TOKEN is shorter than {MIN_METRICS_TOKEN_LENGTH} characters; generate one "
                          "with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if token == master_key:
        raise ConfigError("METRICS_TOKEN must differ from LITELLM_MASTER_KEY: it is a read-only credential for "
                          "/metrics, and Prometheus' configuration would then hold the master key")


REDIS_URL_EXAMPLE = "redis://:password@host:6379/0"


def check_redis_url(url: str) -> None:
    """What redis-py would take silently or fail on in every worker, refused in one line.

    redis-py reads `/abc`, `/db1` or `/1.5` as database 0, `/0/1` as database 1, and a URL
    without a scheme fails only when a worker first connects. The URL itself is never echoed
    (it may hold the password).
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        _parse_multi_host_url(url)  # raises ConfigError when malformed
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
                          f"redis+cluster://, e.g. {REDIS_URL_EXAMPLE}")
    try:
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        raise ConfigError(f"REDIS_URL has an invalid port; expected e.g. {REDIS_URL_EXAMPLE}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"REDIS_URL names no host; expected e.g. {REDIS_URL_EXAMPLE}")
    dbs = parse_qs(parts.query).get("db", [])
    if parts.scheme != "unix" and parts.path not in ("", "/"):
        dbs.append(parts.path[1:])
    for db in dbs:
        if not re.fullmatch(r"[0-9]{1,5}", db):
            raise ConfigError(f"REDIS_URL: the database number must be a whole number such as 0 "
                              f"(the path after host:port, e.g. {REDIS_URL_EXAMPLE}), got {db!r}")
    if len(set(map(int, dbs))) > 1:
        raise ConfigError("REDIS_URL names two different database numbers (path and ?db=)")


# -- Redis beyond one node: Sentinel and Cluster ------------------------------------------------
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_URL_EXAMPLE = "redis+sentinel://:password@sentinel-1:26379,sentinel-2:26379/mymaster/0"
CLUSTER_URL_EXAMPLE = "redis+cluster://:password@node-1:6379,node-2:6379"
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


@dataclasses.dataclass(frozen=True)
class RedisTopology:
    """Where the gateway's Redis is, read from the settings in one place (gateway.core.redisconn
    builds the client from it). It holds passwords: never log it (repr hides them)."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str | None = dataclasses.field(default=None, repr=False)  # single node: REDIS_URL as given (redis-py reads its ?options)
    nodes: tuple = ()  # sentinel: the Sentinels; cluster: seed nodes; each (host, port)
    service: str | None = None  # sentinel: the master's name
    db: int = 0
    username: str | None = dataclasses.field(default=None, repr=False)  # the data nodes' credentials
    password: str | None = dataclasses.field(default=None, repr=False)
    ssl: bool = False
    sentinel_username: str | None = dataclasses.field(default=None, repr=False)
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)


def _parse_multi_host_url(url: str) -> dict:
    """`redis+sentinel://[user:pass@]h:p[,h:p]/service[/db]` or `redis+cluster://[user:pass@]h:p[,h:p]`
    (urlsplit cannot read several hosts). The URL is never echoed: it may hold the password."""
    scheme, rest = url.split("://", 1)
    sentinel = scheme in SENTINEL_SCHEMES
    example = SENTINEL_URL_EXAMPLE if sentinel else CLUSTER_URL_EXAMPLE
    rest = rest.split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(part, 26379 if sentinel else 6379, "REDIS_URL", example)
                  for part in hosts.split(","))
    segments = [p for p in path.split("/") if p] if path else []
    service, db = None, "0"
    if sentinel:
        if not segments or not _SERVICE_NAME.fullmatch(unquote(segments[0])):
            raise ConfigError(f"REDIS_URL names no Sentinel service (the master's name after the hosts), "
                              f"e.g. {example}")
        service, segments = unquote(segments[0]), segments[1:]
    if segments:
        db = segments[0]
    if len(segments) > 1 or not re.fullmatch(r"[0-9]{1,5}", db):
        raise ConfigError(f"REDIS_URL: the database number must be a whole number such as 0, e.g. {example}")
    return dict(scheme=scheme, nodes=nodes, service=service, db=int(db),
                username=unquote(username) or None, password=unquote(password) or None)


def _host_port(text: str, default_port: int, setting: str, example: str) -> tuple:
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", str(default_port))
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+", host) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError(f"{setting} must list host:port pairs separated by commas, e.g. {example}")
    return host.strip("[]"), int(port)


def redis_topology(s: Settings) -> RedisTopology | None:
    """The Redis the settings describe; None without Redis (the in-process store)."""
    if s.redis_url is None:
        return None
    scheme = s.redis_url.split("://", 1)[0]
    auth = dict(sentinel_username=s.redis_sentinel_username, sentinel_password=s.redis_sentinel_password)
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        parsed = _parse_multi_host_url(s.redis_url)
        kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
        return RedisTopology(kind, None, parsed["nodes"], parsed["service"], parsed["db"], parsed["username"],
                             parsed["password"], scheme.startswith("rediss") or s.redis_sentinel_ssl,
                             **(auth if kind == "sentinel" else {}))
    if s.redis_cluster:
        parts = urlsplit(s.redis_url)
        return RedisTopology("cluster", s.redis_url, ((parts.hostname, parts.port or 6379),),
                             username=unquote(parts.username or "") or None,
                             password=unquote(parts.password or "") or None, ssl=parts.scheme == "rediss")
    return RedisTopology("single", s.redis_url)


def check_redis_topology(s: Settings) -> None:
    """Combinations that cannot all be meant, refused in one line each."""
    scheme = s.redis_url.split("://", 1)[0] if s.redis_url else None
    if s.redis_cluster and s.redis_url is None:
        raise ConfigError("REDIS_CLUSTER=1 needs REDIS_URL naming any node of the cluster, e.g. redis://node-1:6379")
    if s.redis_cluster and scheme in SENTINEL_SCHEMES:
        raise ConfigError("REDIS_CLUSTER=1 and a Sentinel setup contradict each other: Sentinel watches one "
                          "master, a cluster fails over by itself; set one of them")
    if s.redis_cluster and scheme == "unix":
        raise ConfigError("REDIS_CLUSTER=1 needs a redis:// or rediss:// REDIS_URL: a cluster is reached over TCP")
    topology = redis_topology(s)
    kind = topology.kind if topology else None
    if kind == "cluster" and (topology.db != 0 or topology.url and _url_db(topology.url) != 0):
        raise ConfigError("REDIS_URL names a database other than 0; a Redis Cluster has only database 0")
    if (s.redis_sentinel_username or s.redis_sentinel_password or s.redis_sentinel_ssl) and kind != "sentinel":
        raise ConfigError("REDIS_SENTINEL_USERNAME/PASSWORD/SSL apply only to a Sentinel setup (REDIS_SENTINELS "
                          f"or a redis+sentinel:// REDIS_URL such as {SENTINEL_URL_EXAMPLE})")


def _url_db(url: str) -> int:
    parts = urlsplit(url)
    dbs = parse_qs(parts.query).get("db", []) + ([parts.path[1:]] if parts.path not in ("", "/") else [])
    return int(dbs[0]) if dbs else 0


def sentinel_url_from(environ) -> str | None:
    """REDIS_SENTINELS + REDIS_SENTINEL_SERVICE (+ REDIS_USERNAME/REDIS_PASSWORD for the data nodes),
    as the equivalent redis+sentinel:// URL, so the rest of the gateway reads one form."""
    sentinels = environ.get("REDIS_SENTINELS", "").strip()
    if not sentinels:
        return None
    service = environ.get("REDIS_SENTINEL_SERVICE", "").strip()
    user = quote(environ.get("REDIS_USERNAME", "").strip(), safe="")
    password = quote(environ.get("REDIS_PASSWORD", "").strip(), safe="")
    userinfo = f"{user}:{password}@" if user or password else ""
    return f"redis+sentinel://{userinfo}{sentinels.replace(' ', '')}/{quote(service, safe='')}"


def check_redis_environ(environ) -> None:
    """The two ways to name a Sentinel setup, and the settings that belong to only one of them."""
    sentinels = environ.get("REDIS_SENTINELS", "").strip()
    url = environ.get("REDIS_URL", "").strip()
    if sentinels and url:
        raise ConfigError("set REDIS_SENTINELS (with REDIS_SENTINEL_SERVICE) or REDIS_URL, not both "
                          f"(a Sentinel URL works too: {SENTINEL_URL_EXAMPLE})")
    if sentinels and not environ.get("REDIS_SENTINEL_SERVICE", "").strip():
        raise ConfigError("REDIS_SENTINELS needs REDIS_SENTINEL_SERVICE: the name of the master the Sentinels "
                          "watch (sentinel monitor <name> ...), e.g. mymaster")
    if not sentinels and environ.get("REDIS_SENTINEL_SERVICE", "").strip():
        raise ConfigError("REDIS_SENTINEL_SERVICE is set but REDIS_SENTINELS is not: list the Sentinels as "
                          "host:port,host:port")
    if not sentinels and (environ.get("REDIS_PASSWORD") or environ.get("REDIS_USERNAME")):
        raise ConfigError("REDIS_USERNAME/REDIS_PASSWORD are read only with REDIS_SENTINELS; otherwise put them "
                          f"in REDIS_URL, e.g. {REDIS_URL_EXAMPLE}")
    if sentinels:
        for part in sentinels.split(","):
            _host_port(part, 26379, "REDIS_SENTINELS", "sentinel-1:26379,sentinel-2:26379")


def require_keystore(settings: Settings) -> None:
    """Without REDIS_URL every key lives in one process and is lost at each restart (and a
    second worker would not see it): refuse unless the operator said that is what they want."""
    if settings.redis_url is None and not settings.allow_ephemeral_keystore:
        raise ConfigError(
            "REDIS_URL is not set: virtual keys, spend and limits would live in one worker's memory and be "
            "lost at every restart; set REDIS_URL (e.g. the Heroku Redis add-on), or ALLOW_EPHEMERAL_KEYSTORE=1 "
            "for a local demo (scripts/start does)")


def parse_bases(raw: str) -> tuple:
    """One base, or several separated by commas (replicas of the same model server)."""
    return tuple(normalise_base(part) for part in raw.split(",") if part.strip())


def normalise_base(raw: str) -> str:
    """Validate a vLLM base URL and drop trailing slashes; its path prefix is kept."""
    raw = raw.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"HOSTED_VLLM_API_BASE must be an http(s) URL such as http://vllm:8000, got {raw!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError("HOSTED_VLLM_API_BASE must not carry a query, fragment or credentials")
    try:
        parts.port  # noqa: B018 - reading it validates it (ValueError when out of range)
    except ValueError as exc:
        raise ConfigError(f"HOSTED_VLLM_API_BASE has an invalid port: {exc}") from None
    return raw.rstrip("/")


def _number(environ, name, default, kind=float):
    value = environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _flag(environ, name):
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _switch(environ, name, default):
    """An on/off setting whose default may be on (or None: decided elsewhere); anything but a
    clear yes or no is refused rather than guessed."""
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {environ.get(name)!r}")


def _routing_strategy(environ) -> str:
    """ROUTING_STRATEGY, else ROUTING_LOAD_AWARE's (0: least_busy); when both are set they must agree."""
    load_aware = _switch(environ, "ROUTING_LOAD_AWARE", None)
    strategy = environ.get("ROUTING_STRATEGY", "").strip().lower() or ("least_busy" if load_aware is False else "load")
    if load_aware is not None and load_aware != (strategy == "load"):
        raise ConfigError(f"ROUTING_LOAD_AWARE={environ.get('ROUTING_LOAD_AWARE')} contradicts ROUTING_STRATEGY={strategy}")
    return strategy


def redis_url_from(environ) -> str | None:
    """REDIS_URL, else the Sentinel URL REDIS_SENTINELS describes, else DATABASE_URL when it points
    at Redis (Heroku add-ons set either)."""
    url = environ.get("REDIS_URL", "").strip() or sentinel_url_from(environ)
    if url:
        return url
    url = environ.get("DATABASE_URL", "").strip()
    if url.startswith(("redis://", "rediss://")):
        return url
    return None


def load_settings(environ=None, **overrides) -> Settings:
    from gateway.usage.prices import load_prices  # prices imports ConfigError from here

    """Build Settings from the environment (os.environ by default), then apply overrides."""
    env = os.environ if environ is None else environ
    base = overrides.pop("upstream_base", None)
    if base is None:
        base = env.get("HOSTED_VLLM_API_BASE") or env.get("VLLM_API_BASE") or ""
        if not base.strip():
            raise ConfigError(
                "HOSTED_VLLM_API_BASE is not set; point it at your vLLM server, e.g. http://vllm:8000 "
                "(python -m fakevllm starts a fake one for demos)"
            )
    check_redis_environ(env)
    values = dict(
        upstream_bases=parse_bases(base),
        master_key=env.get("LITELLM_MASTER_KEY", "").strip(),
        upstream_key=(env.get("HOSTED_VLLM_API_KEY") or env.get("VLLM_API_KEY") or "").strip() or None,
        allow_weak_master_key=_flag(env, "ALLOW_WEAK_MASTER_KEY"),
        connect_timeout=_number(env, "UPSTREAM_CONNECT_TIMEOUT", 5.0),
        read_timeout=_number(env, "UPSTREAM_READ_TIMEOUT", 600.0),
        head_timeout=_number(env, "UPSTREAM_HEAD_TIMEOUT", None),
        upstream_trust_env=_flag(env, "UPSTREAM_TRUST_ENV"),
        max_body_bytes=_number(env, "MAX_REQUEST_BODY_BYTES", 64 * 1024 * 1024, int),
        body_read_timeout=_number(env, "REQUEST_BODY_TIMEOUT", 30.0),
        upstream_pool_size=_number(env, "UPSTREAM_POOL_SIZE", 1000, int),
        redis_url=redis_url_from(env),
        allow_ephemeral_keystore=_flag(env, "ALLOW_EPHEMERAL_KEYSTORE"),
        redis_ssl_cert_reqs=env.get("REDIS_SSL_CERT_REQS", "required").strip().lower(),
        redis_pool_size=_number(env, "REDIS_POOL_SIZE", 8, int),
        redis_pool_timeout=_number(env, "REDIS_POOL_TIMEOUT", 5.0),
        redis_socket_timeout=_number(env, "REDIS_SOCKET_TIMEOUT", 2.0),
        redis_prefix=env.get("REDIS_KEY_PREFIX", "vgw:"),
        redis_cluster=_flag(env, "REDIS_CLUSTER"),
        redis_sentinel_username=env.get("REDIS_SENTINEL_USERNAME", "").strip() or None,
        redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", "").strip() or None,
        redis_sentinel_ssl=_flag(env, "REDIS_SENTINEL_SSL"),
        access_log=not _flag(env, "DISABLE_ACCESS_LOG"),
        upstream_cooloff=_number(env, "UPSTREAM_COOLOFF_SECONDS", 10.0),
        upstream_max_idle=_number(env, "UPSTREAM_KEEPALIVE_SECONDS", 4.0),
        metrics_public=_flag(env, "METRICS_PUBLIC"),
        metrics_token=env.get("METRICS_TOKEN", "").strip() or None,
        upstream_ca_bundle=env.get("UPSTREAM_CA_BUNDLE", "").strip() or None,
        key_cache_ttl=_number(env, "KEY_CACHE_TTL", 0.9),
        prices=load_prices(env),
        spend_log_max=_number(env, "SPEND_LOG_MAX_ENTRIES", 100_000, int),
        parallel_lease_seconds=_number(env, "PARALLEL_SLOT_LEASE_SECONDS", 120.0),
        end_user_stats_ttl=_number(env, "END_USER_STATS_TTL", 30 * 86400.0),
        spend_log_key_max=_number(env, "SPEND_LOG_KEY_MAX_ENTRIES", 10_000, int),
        spend_log_end_user_max=_number(env, "SPEND_LOG_END_USER_MAX_ENTRIES", 1_000, int),
        budget_default_max_tokens=_number(env, "BUDGET_DEFAULT_MAX_TOKENS", 1024, int),
        budget_resets=env.get("BUDGET_RESETS", "").strip().lower() or "creation",
        budget_timezone=env.get("BUDGET_TIMEZONE", "").strip() or "UTC",
        routing_strategy=(strategy := _routing_strategy(env)),
        routing_load_aware=strategy == "load",
        routing_poll_interval=_number(env, "ROUTING_POLL_INTERVAL", 0.25),
        routing_poll_timeout=_number(env, "ROUTING_POLL_TIMEOUT", 0.5),
        routing_stale_after=_number(env, "ROUTING_STALE_AFTER", 2.0),
        routing_max_waiting=_number(env, "ROUTING_MAX_WAITING", 8, int),
        routing_max_kv=_number(env, "ROUTING_MAX_KV", 0.95),
        routing_max_inflight=_number(env, "ROUTING_MAX_INFLIGHT_PER_REPLICA", 0, int),
        routing_weight_queue=_number(env, "ROUTING_WEIGHT_QUEUE", 1.0),
        routing_weight_running=_number(env, "ROUTING_WEIGHT_RUNNING", 1.0),
        routing_weight_kv=_number(env, "ROUTING_WEIGHT_KV", 2.0),
        routing_affinity=_switch(env, "ROUTING_AFFINITY", True),
        routing_affinity_slack=_number(env, "ROUTING_AFFINITY_SLACK", 4.0),
        routing_affinity_prefix_bytes=_number(env, "ROUTING_AFFINITY_PREFIX_BYTES", 1024, int),
        routing_admission=_switch(env, "ROUTING_ADMISSION", None),
        routing_queue_max=_number(env, "ROUTING_QUEUE_MAX", 256, int),
        routing_queue_timeout=_number(env, "ROUTING_QUEUE_TIMEOUT", 30.0),
        instance_id=env.get("GATEWAY_INSTANCE_ID", "").strip() or None,
        alert_webhook_url=env.get("ALERT_WEBHOOK_URL", "").strip() or None,
        alert_webhook_secret=env.get("ALERT_WEBHOOK_SECRET") or None,
        budget_alert_thresholds=_alert_thresholds(env),
        alert_webhook_max_attempts=_number(env, "ALERT_WEBHOOK_MAX_ATTEMPTS", 10, int),
        alert_webhook_max_age=_seconds(env, "ALERT_WEBHOOK_MAX_AGE", 86400.0),
        alert_webhook_backoff_base=_number(env, "ALERT_WEBHOOK_BACKOFF_BASE", 2.0),
        alert_webhook_backoff_cap=_number(env, "ALERT_WEBHOOK_BACKOFF_CAP", 600.0),
        alert_webhook_connect_timeout=_number(env, "ALERT_WEBHOOK_CONNECT_TIMEOUT", 2.0),
        alert_webhook_read_timeout=_number(env, "ALERT_WEBHOOK_READ_TIMEOUT", 5.0),
        alert_webhook_lease=_number(env, "ALERT_WEBHOOK_LEASE", 60.0),
        alert_webhook_poll_interval=_number(env, "ALERT_WEBHOOK_POLL_INTERVAL", 1.0),
        alert_outbox_max=_number(env, "ALERT_OUTBOX_MAX", 10_000, int),
        alert_webhook_trust_env=_flag(env, "ALERT_WEBHOOK_TRUST_ENV"),
        reconcile=_switch(env, "RECONCILE", True),
        reconcile_window=_number(env, "RECONCILE_WINDOW", 60.0),
        reconcile_drift_threshold=_number(env, "RECONCILE_DRIFT_THRESHOLD", 0.05),
        reconcile_min_tokens=_number(env, "RECONCILE_MIN_TOKENS", 1000, int),
        reconcile_poll_interval=_number(env, "RECONCILE_POLL_INTERVAL", 5.0),
    )
    values.update(overrides)
    return Settings(**values)
