"""The Redis client (a blocking pool sized for gevent, or an embedded fakeredis when none is set)
and the error policy: which exceptions mean "Redis is unavailable", and what callers hear then.

Outage or bug? Anything that retrying later (or an operator fixing a setting) cures is an
outage: the connection failing (refused, reset, TLS, timeout, max clients, auth, LOADING) and
the replies a healthy-but-wrong server gives (READONLY replica after a failover, MOVED/ASK/
CLUSTERDOWN from a cluster, OOM at maxmemory, NOPERM from an ACL, MISCONF, BUSY). Virtual keys
then get a 503, the master key is still served and accounting waits in its queue. Replies that
only a bug in the gateway can cause (WRONGTYPE, a Lua script error, wrong arguments, CROSSSLOT)
are not caught: they stay a 500 with a traceback, and an accounting batch hitting one is
logged and dropped rather than retried forever.

Each worker logs one line per incident (not per request): the cause and the setting to fix.
"""
from __future__ import annotations

import logging
import os
import ssl
import sys
import threading

import redis
from redis.backoff import NoBackoff
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis.retry import Retry

from gateway.core.errors import GatewayError

log = logging.getLogger("gateway")
E = redis.exceptions


class RedisRefused(E.ConnectionError):
    """A server reply that means "not now" (MISCONF, BUSY, NOREPLICAS): an outage, not a bug.
    A ConnectionError, so redis-py drops the connection and retries once, like a reset."""


def _outage_aware(parser):
    """The redis-py parser, with three more replies mapped to RedisRefused: redis-py already
    maps READONLY, LOADING, OOM, NOAUTH, MOVED ... to classes of their own, but leaves these as a
    plain ResponseError, which looks like a bug. (A subclass, so redis-py still sees a RESP2/3
    parser where it checks for one.)"""
    mapping = {**parser.EXCEPTION_CLASSES, "MISCONF": RedisRefused, "BUSY": RedisRefused,
               "NOREPLICAS": RedisRefused}
    return type(f"OutageAware{parser.__name__}", (parser,), {"EXCEPTION_CLASSES": mapping})


_PARSERS = {"2": _outage_aware(_RESP2Parser), "3": _outage_aware(_RESP3Parser)}


# What an unreachable, overloaded or misconfigured Redis raises; anything else is a bug.
REDIS_ERRORS = (
    E.ConnectionError,      # refused, reset, TLS, max clients, NOAUTH/WRONGPASS, LOADING, pool wait
    E.TimeoutError,
    OSError,
    E.ReadOnlyError,        # a replica (after a failover REDIS_URL may point at the old primary)
    E.AskError,             # MOVED and ASK: a cluster node
    E.TryAgainError,
    E.ClusterError,         # CLUSTERDOWN, MASTERDOWN
    E.OutOfMemoryError,     # maxmemory reached
    E.NoPermissionError,    # an ACL user without a command the gateway needs
)


class ConnectionBudget:
    """How many connections this gateway may open: workers × REDIS_POOL_SIZE (the pub/sub
    listener of the key cache takes one of the pool's connections, it is not extra)."""

    def __init__(self, pool_size: int, workers: int, socket_timeout: float):
        self.pool_size = pool_size
        self.workers = workers
        self.socket_timeout = socket_timeout

    @property
    def total(self) -> int:
        return self.pool_size * self.workers

    def describe(self) -> str:
        return (f"{self.workers} workers × REDIS_POOL_SIZE {self.pool_size} = {self.total} connections "
                f"per gateway instance")


def worker_count(environ=None) -> int:
    """WEB_CONCURRENCY as gunicorn.conf.py reads it (2 with Redis), for the budget line only."""
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("WEB_CONCURRENCY") or 2), 1)
    except ValueError:
        return 2


def classify(exc: BaseException, budget: ConnectionBudget | None) -> tuple[str, str]:
    """(cause, what to do) for an outage exception, in words an operator can act on."""
    text = str(exc)
    opens = f"{budget.describe()} (with every other client)" if budget else "this gateway's connections"
    if "max number of clients" in text:
        return ("Redis refused: max number of clients reached",
                f"{opens} exceed what the Redis plan allows; lower REDIS_POOL_SIZE (or WEB_CONCURRENCY)")
    if isinstance(exc, E.AuthenticationError):
        return "Redis refused the credentials (NOAUTH/WRONGPASS)", "fix the user/password in REDIS_URL"
    if isinstance(exc, E.BusyLoadingError):
        return "Redis is loading its data set (LOADING)", "wait: it answers once loading ends"
    if isinstance(exc, E.ReadOnlyError):
        return ("Redis is a read-only replica (READONLY)",
                "point REDIS_URL at the primary (after a failover: the new primary)")
    if isinstance(exc, (E.AskError, E.TryAgainError, E.ClusterError)):
        return (f"Redis answered as a cluster node ({type(exc).__name__})",
                "the gateway needs one Redis (or a cluster proxy endpoint) in REDIS_URL")
    if isinstance(exc, E.OutOfMemoryError):
        return ("Redis is out of memory (OOM, maxmemory reached)",
                "raise the plan's memory or lower SPEND_LOG_MAX_ENTRIES / END_USER_STATS_TTL")
    if isinstance(exc, E.NoPermissionError):
        return "Redis refused a command (NOPERM)", "grant the REDIS_URL user the commands the gateway runs (ACL)"
    if isinstance(exc, RedisRefused):
        return f"Redis refused ({getattr(exc, 'status_code', None) or text[:40]})", "see the Redis server's log"
    if isinstance(exc, ssl.SSLError) or "SSL" in text or "certificate" in text:
        return "TLS to Redis failed", "check rediss:// in REDIS_URL and REDIS_SSL_CERT_REQS"
    if "No connection available" in text:
        return ("every pooled Redis connection stayed busy for REDIS_POOL_TIMEOUT",
                "raise REDIS_POOL_SIZE if the Redis plan allows, or REDIS_POOL_TIMEOUT")
    if isinstance(exc, (E.TimeoutError, TimeoutError)):
        wait = f"{budget.socket_timeout}s" if budget else "REDIS_SOCKET_TIMEOUT"
        return f"Redis did not answer within {wait}", "check the server's load, or raise REDIS_SOCKET_TIMEOUT"
    return f"Redis is unreachable ({type(exc).__name__})", "check REDIS_URL and that the server runs"


class Incidents:
    """One warning when an outage starts (or its cause changes), one when Redis answers again."""

    def __init__(self):
        self.budget: ConnectionBudget | None = None
        self.cause: str | None = None
        self._lock = threading.Lock()

    def report(self, exc: BaseException, consequence: str = "") -> None:
        cause, fix = classify(exc, self.budget)
        with self._lock:
            if cause == self.cause:
                return
            self.cause = cause
        # str(exc) names the server's reply or the socket error; it carries no password.
        log.warning("%s — %s. (%s: %s)%s", cause, fix, type(exc).__name__, str(exc)[:200],
                    f" {consequence}" if consequence else "")

    def answered(self) -> None:
        """Redis just answered a write: close the open incident, if any."""
        if self.cause is None:
            return
        with self._lock:
            cause, self.cause = self.cause, None
        if cause is not None:
            log.warning("Redis answers again (after: %s)", cause)


incidents = Incidents()


def unavailable() -> GatewayError:
    """The 503 for a request that needs Redis while it is unreachable (fail closed).

    Called inside `except REDIS_ERRORS:`, so the active exception says why: it is logged once
    per incident."""
    exc = sys.exc_info()[1]
    if exc is not None:
        incidents.report(exc, "Virtual keys answer 503 until then; the master key is still served.")
    return GatewayError(503, "the key store (Redis) is unavailable, so virtual keys cannot be "
                             "checked right now; retry shortly", "service_unavailable", kind="keystore_unavailable")


def make_redis(settings) -> redis.Redis:
    """One client per worker. Without REDIS_URL: an in-process store, announced loudly."""
    if not settings.redis_url:
        import fakeredis

        log.warning("NO REDIS CONFIGURED: virtual keys, spend and limits live only in this process "
                    "and are lost when it stops. Set REDIS_URL for anything but a demo.")
        return fakeredis.FakeRedis(decode_responses=True)
    incidents.budget = ConnectionBudget(settings.redis_pool_size, worker_count(), settings.redis_socket_timeout)
    # WARNING: the level the gateway's (otherwise unconfigured) logger prints at.
    log.warning("Redis connection budget: %s; keep it (times the number of instances) within the Redis "
             "plan's connection limit", incidents.budget.describe())
    extra = {}
    if settings.redis_url.startswith("rediss://") and settings.redis_ssl_cert_reqs == "none":
        # Heroku Redis presents a self-signed certificate: opt-in, documented trade-off.
        extra["ssl_cert_reqs"] = ssl.CERT_NONE
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        # Under a burst, requests queue here for a pooled connection rather than fail.
        timeout=settings.redis_pool_timeout,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
        health_check_interval=30,
        # Named per worker, so an operator (and a test) can see whose connections these are.
        client_name=f"vgw-worker-{os.getpid()}",
        decode_responses=True,
        # One quick retry, no backoff: an outage must become a fast 503, not a stalled request.
        retry=Retry(NoBackoff(), 1),
        **extra,
    )
    # RESP3 is redis-py's default; REDIS_URL may ask for ?protocol=2.
    protocol = str(pool.connection_kwargs.get("protocol") or 3)
    pool.connection_kwargs["parser_class"] = _PARSERS.get(protocol, _PARSERS["3"])
    return redis.Redis(connection_pool=pool)
