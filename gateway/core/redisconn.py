"""The Redis client (a blocking pool sized for gevent, or an embedded fakeredis when none is set)
and the error policy: which exceptions mean "Redis is unavailable", and what callers hear then."""
from __future__ import annotations

import logging
import os
import ssl

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.core.errors import GatewayError

log = logging.getLogger("gateway")

# What an unreachable or overloaded Redis raises; anything else is a bug, not an outage.
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def unavailable() -> GatewayError:
    """The 503 for a request that needs Redis while it is unreachable (fail closed)."""
    return GatewayError(503, "the key store (Redis) is unavailable, so virtual keys cannot be "
                             "checked right now; retry shortly", "service_unavailable", kind="keystore_unavailable")


def make_redis(settings) -> redis.Redis:
    """One client per worker. Without REDIS_URL: an in-process store, announced loudly."""
    if not settings.redis_url:
        import fakeredis

        log.warning("NO REDIS CONFIGURED: virtual keys, spend and limits live only in this process "
                    "and are lost when it stops. Set REDIS_URL for anything but a demo.")
        return fakeredis.FakeRedis(decode_responses=True)
    extra = {}
    if settings.redis_url.startswith("rediss://") and settings.redis_ssl_cert_reqs == "none":
        # Heroku Redis presents a self-signed certificate: opt-in, documented trade-off.
        extra["ssl_cert_reqs"] = ssl.CERT_NONE
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=settings.redis_socket_timeout,  # wait this long for a free connection, then fail
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
    return redis.Redis(connection_pool=pool)
