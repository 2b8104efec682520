"""The Redis client (a blocking pool sized for gevent, or an embedded fakeredis when none is set)
and the error policy: which exceptions mean "Redis is unavailable", and what callers hear then.

Three topologies, one client interface (gateway.core.config.RedisTopology says which):
- one node (REDIS_URL);
- a master watched by Sentinel: redis-py asks the Sentinels for the master's address whenever it
  opens a connection, and drops a connection that hears READONLY (an old master demoted), so
  writes follow a promotion and never go to a returning old master, which Sentinel no longer names;
- a Redis Cluster (RedisCluster): it re-reads the slot map after a node fails or answers MOVED,
  so a promoted replica takes over its master's slots without a restart.

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
import redis.cluster
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis.retry import Retry

from gateway.core.errors import GatewayError

log = logging.getLogger("gateway")
E = redis.exceptions


class ClusterUnreachable(E.ConnectionError):
    """No cluster node answered while the client re-read the slot map (redis-py raises a bare
    RedisClusterException there, which would look like a bug and give a 500)."""


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
    E.SlotNotCoveredError,  # a cluster whose slot map has a hole (mid-failover, or a node lost for good)
)


class ConnectionBudget:
    """How many connections this gateway may open: workers × REDIS_POOL_SIZE (the pub/sub
    listener of the key cache takes one of the pool's connections, it is not extra). On a
    cluster the pool is per node, so that many to each primary; with Sentinel, short-lived
    queries to the Sentinels come on top whenever a connection to the master is opened."""

    def __init__(self, pool_size: int, workers: int, socket_timeout: float, topology: str = "single"):
        self.pool_size = pool_size
        self.workers = workers
        self.socket_timeout = socket_timeout
        self.topology = topology

    @property
    def total(self) -> int:
        return self.pool_size * self.workers

    def describe(self) -> str:
        where = {"cluster": "to each cluster node it uses (every primary)",
                 "sentinel": "to the master (plus a short query to a Sentinel each time one opens)"}
        return (f"{self.workers} workers × REDIS_POOL_SIZE {self.pool_size} = {self.total} connections "
                f"per gateway instance {where.get(self.topology, '')}".rstrip())


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
        return ("Redis refused the credentials (NOAUTH/WRONGPASS)",
                "fix the user/password in REDIS_URL (REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD with Sentinel)")
    if isinstance(exc, E.BusyLoadingError):
        return "Redis is loading its data set (LOADING)", "wait: it answers once loading ends"
    topology = budget.topology if budget else "single"
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        return ("no Sentinel names a master for the service (failover under way, or the Sentinels are down)",
                "wait for the failover; check REDIS_SENTINELS / REDIS_SENTINEL_SERVICE and the Sentinels' logs")
    if isinstance(exc, E.ReadOnlyError):
        return ("Redis is a read-only replica (READONLY)",
                "point REDIS_URL at the primary (after a failover: the new primary), or use Sentinel "
                "(REDIS_SENTINELS) so the gateway follows promotions")
    if isinstance(exc, (E.AskError, E.TryAgainError, E.ClusterError, E.SlotNotCoveredError)):
        if topology == "cluster":
            return (f"the Redis Cluster is failing over or lost slots ({type(exc).__name__})",
                    "wait for a replica's promotion; check CLUSTER INFO on the nodes")
        return (f"Redis answered as a cluster node ({type(exc).__name__})",
                "set REDIS_CLUSTER=1 (or a redis+cluster:// REDIS_URL) for a Redis Cluster")
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


def make_redis(settings):
    """One client per worker. Without REDIS_URL: an in-process store, announced loudly."""
    topology = settings.redis_topology
    if topology is None:
        import fakeredis

        log.warning("NO REDIS CONFIGURED: virtual keys, spend and limits live only in this process "
                    "and are lost when it stops. Set REDIS_URL for anything but a demo.")
        return fakeredis.FakeRedis(decode_responses=True)
    incidents.budget = ConnectionBudget(settings.redis_pool_size, worker_count(), settings.redis_socket_timeout,
                                        topology.kind)
    # WARNING: the level the gateway's (otherwise unconfigured) logger prints at.
    log.warning("Redis connection budget: %s; keep it (times the number of instances) within the Redis "
             "plan's connection limit", incidents.budget.describe())
    build = {"single": _single_node, "sentinel": _sentinel_master, "cluster": _cluster}[topology.kind]
    return build(topology, settings)


def _connection_options(settings) -> dict:
    """What every connection to a data node gets, whatever the topology."""
    return dict(
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
        # Named per worker, so an operator (and a test) can see whose connections these are.
        client_name=f"vgw-worker-{os.getpid()}",
        decode_responses=True,
    )


def _pool_options(settings) -> dict:
    return dict(
        max_connections=settings.redis_pool_size,
        # Under a burst, requests queue here for a pooled connection rather than fail.
        timeout=settings.redis_pool_timeout,
    )


def _tls_options(settings, tls: bool) -> dict:
    if tls and settings.redis_ssl_cert_reqs == "none":
        # Heroku Redis presents a self-signed certificate: opt-in, documented trade-off.
        return {"ssl_cert_reqs": ssl.CERT_NONE}
    return {}


# One quick retry, no backoff: an outage must become a fast 503, not a stalled request.
def _quick_retry() -> Retry:
    return Retry(NoBackoff(), 1)


def _single_node(topology, settings) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        topology.url, **_pool_options(settings), **_connection_options(settings), health_check_interval=30,
        retry=_quick_retry(), **_tls_options(settings, topology.url.startswith("rediss://")))
    # RESP3 is redis-py's default; REDIS_URL may ask for ?protocol=2.
    protocol = str(pool.connection_kwargs.get("protocol") or 3)
    pool.connection_kwargs["parser_class"] = _PARSERS.get(protocol, _PARSERS["3"])
    return redis.Redis(connection_pool=pool)


class SentinelBlockingConnectionPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool (master address from the Sentinels on every connect; connections
    to a demoted master are not reused) with the blocking pool's bound and wait: redis-py 8.1
    ships the Sentinel pool only as an unbounded ConnectionPool."""


def _sentinel_master(topology, settings) -> redis.Redis:
    tls = _tls_options(settings, topology.ssl)
    sentinels = redis.sentinel.Sentinel(
        list(topology.nodes),
        # Sentinel's own auth and TLS; the data nodes' credentials are the master's, below.
        sentinel_kwargs=dict(socket_timeout=settings.redis_socket_timeout,
                             socket_connect_timeout=settings.redis_socket_timeout,
                             username=topology.sentinel_username, password=topology.sentinel_password,
                             ssl=topology.ssl, **tls))
    return sentinels.master_for(
        topology.service, connection_pool_class=SentinelBlockingConnectionPool,
        **_pool_options(settings), **_connection_options(settings), health_check_interval=30,
        retry=_quick_retry(), db=topology.db, username=topology.username, password=topology.password,
        ssl=topology.ssl, parser_class=_PARSERS["3"], **tls)


def _outage_aware_connection(base):
    """A connection class whose parser is outage-aware: RedisCluster accepts no parser_class
    among the options it hands each node, but it does accept a connection class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", _PARSERS.get(str(kwargs.get("protocol") or 3), _PARSERS["3"]))
        base.__init__(self, *args, **kwargs)

    return type(f"OutageAware{base.__name__}", (base,), {"__init__": __init__})


_CLUSTER_CONNECTIONS = {False: _outage_aware_connection(redis.Connection),
                        True: _outage_aware_connection(redis.SSLConnection)}


class _OutageAwareNodesManager(redis.cluster.NodesManager):
    """redis-py's slot-map reader, with "no node answered" and "slots not covered" raised as an
    outage (ClusterUnreachable) instead of a bare RedisClusterException."""

    def initialize(self, *args, **kwargs):
        try:
            return super().initialize(*args, **kwargs)
        except E.RedisClusterException as exc:
            if isinstance(exc, E.SlotNotCoveredError) or "cannot be connected" in str(exc) \
                    or "not covered" in str(exc):
                raise ClusterUnreachable(str(exc)[:200]) from exc
            raise


class _ClusterWhenReachable:
    """Stands in for the cluster client while no node has answered yet (a worker booting during
    an outage): every use tries to build it, else raises ClusterUnreachable (a 503, not a worker
    that fails to boot)."""

    def __init__(self, build):
        self._build = build
        self._client = None

    def __getattr__(self, name):
        if self._client is None:
            try:
                self._client = self._build()
            except E.RedisClusterException as exc:
                raise ClusterUnreachable(str(exc)[:200]) from exc
        return getattr(self._client, name)


def _cluster(topology, settings):
    def build():
        client = _build_cluster(topology, settings)
        client.nodes_manager.__class__ = _OutageAwareNodesManager
        return client
    try:
        return build()
    except (E.RedisClusterException, *REDIS_ERRORS) as exc:
        incidents.report(exc, "The worker starts anyway and connects when a node answers.")
        return _ClusterWhenReachable(build)


def _build_cluster(topology, settings) -> redis.cluster.RedisCluster:
    (host, port), *more = topology.nodes
    scheme = "rediss" if topology.ssl else "redis"
    # url=: redis-py then builds each node's pool with connection_pool_class (a bounded, waiting one);
    # the credentials go as arguments, so they need no URL quoting.
    return redis.cluster.RedisCluster(
        url=f"{scheme}://{host}:{port}/0", startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in more],
        connection_pool_class=redis.BlockingConnectionPool, connection_class=_CLUSTER_CONNECTIONS[topology.ssl],
        **_pool_options(settings), **_connection_options(settings), username=topology.username,
        password=topology.password, **_tls_options(settings, topology.ssl),
        # A command that fails on a dead node re-reads the slot map and is tried again: once the
        # replica is promoted, the retry lands on it. Two short tries: an outage is still a fast 503.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2))


def is_cluster(client) -> bool:
    """True when the client speaks to a Redis Cluster (callers that must keep to one slot ask)."""
    return isinstance(client, (redis.cluster.RedisCluster, _ClusterWhenReachable))


def check_health(client) -> tuple[bool, str]:
    """(up, detail) for readiness: PING; on a cluster also CLUSTER INFO's cluster_state; with
    Sentinel the master's address. The detail is for the master key only (it names addresses)."""
    try:
        client.ping()
        if is_cluster(client):
            return _cluster_health(client)
        master = _sentinel_master_address(client)
    except REDIS_ERRORS as exc:
        return False, type(exc).__name__
    return True, f"PONG from master {master[0]}:{master[1]}" if master else "PONG"


def _cluster_health(client) -> tuple[bool, str]:
    info = client.cluster_info()
    state = info.get("cluster_state")
    primaries = len(client.get_primaries())
    detail = (f"cluster_state:{state}, {primaries} primaries, slots ok {info.get('cluster_slots_ok')} of "
              f"{info.get('cluster_slots_assigned')} assigned")
    return state == "ok", detail


def _sentinel_master_address(client):
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return None
    return pool.master_address or pool.get_master_address()
