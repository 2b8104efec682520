"""Application factory: settings, clients and blueprints, built once per worker."""
from __future__ import annotations

import logging

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from gateway.core import accesslog
from gateway.core.accesslog import RequestRecord, request_id_for
from gateway.core.config import Settings, load_settings, require_keystore
from gateway.core.errors import GatewayError, error_body
from gateway.core.metrics import Metrics
from gateway.core.redisconn import make_redis
from gateway.core.redisnames import RedisNames
from gateway.keys.audit import AuditLog
from gateway.keys.auth import Authenticator
from gateway.keys.store import KeyStore
from gateway.relay.admission import Admission
from gateway.relay.choice import Policy
from gateway.relay.exchange import Passthrough
from gateway.relay.loadpoller import LoadBoard, LoadPoller
from gateway.relay.reconcile import Reconciler
from gateway.relay.replicas import Replicas
from gateway.relay.transport import build_session
from gateway.relay.upstream import Upstream
from gateway.services import Services
from gateway.teams.store import TeamStore
from gateway.usage import periods
from gateway.usage.accounting import Accounting
from gateway.usage.budgets import Budgets
from gateway.usage.limits import RateLimiter
from gateway.usage.spendlog import LogLimits

log = logging.getLogger("gateway")


def create_app(config=None) -> Flask:
    """Build the gateway.

    `config` may hold a ready `settings` (Settings), an `environ` mapping to read instead of
    os.environ, a ready `redis` client, a ready `session` (requests.Session to vLLM), and
    Settings field overrides; tests use it to inject clients and values.
    """
    config = dict(config or {})
    redis_client = config.pop("redis", None)
    session = config.pop("session", None)
    settings = config.pop("settings", None)
    if settings is None:
        settings = load_settings(config.pop("environ", None), **config)
    if not isinstance(settings, Settings):
        raise TypeError("config['settings'] must be a gateway.config.Settings")

    app = Flask(__name__, static_folder=None)
    # Admin and other Flask routes take small JSON bodies; /vllm has its own limit.
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    accesslog.configure(settings.access_log)
    periods.configure(settings.budget_resets, settings.budget_timezone)  # how budget periods are cut
    if redis_client is None:  # an injected client (tests) is a key store; only "none at all" needs the opt-in
        require_keystore(settings)
        redis_client = make_redis(settings)
    app.extensions["gateway"] = build_services(settings, redis_client, session)
    keystore = app.extensions["gateway"].keystore
    if keystore.has_earlier_layout():
        log.warning("Redis holds virtual keys in the layout of an earlier version, which this one cannot "
                    "see: run `python -m gateway.keys.migrate` (see README, Upgrading)")
    else:
        keystore.build_alias_search()  # keys made before the search index existed: once per deployment
    _register_blueprints(app)
    _install_request_record(app)
    _install_error_handlers(app)
    if app.extensions["gateway"].deliverer is not None:
        app.extensions["gateway"].deliverer.start()  # a no-op off gevent (tests call deliver_once)
    return app


def build_services(settings: Settings, redis_client, session=None) -> Services:
    """The per-worker clients and services (built after fork: gunicorn never preloads)."""
    if session is None:
        session = build_session(pool_size=settings.upstream_pool_size, max_idle=settings.upstream_max_idle,
                                replicas=len(settings.upstream_bases), trust_env=settings.upstream_trust_env,
                                ca_bundle=settings.upstream_ca_bundle)
    names = RedisNames(settings.redis_prefix)
    metrics = Metrics()
    upstreams = [Upstream(base, session, api_key=settings.upstream_key, connect_timeout=settings.connect_timeout,
                          read_timeout=settings.read_timeout, head_timeout=settings.head_timeout)
                 for base in settings.upstream_bases]
    replicas = Replicas(upstreams, cooloff=settings.upstream_cooloff, redis=redis_client, names=names,
                        on_error=metrics.upstream_error, on_decision=metrics.route_decision,
                        round_robin=settings.routing_strategy == "round_robin")
    admission = _load_aware_routing(settings, replicas, redis_client, names, metrics)
    _reconciliation(settings, replicas, redis_client, names, metrics)
    metrics.prepare(replicas=[replica.name for replica in replicas.replicas], token=settings.metrics_token,
                    reconcile=settings.reconcile)
    audit = AuditLog(redis_client, names)
    keystore = KeyStore(redis_client, names, settings.key_cache_ttl, audit=audit)
    teams = TeamStore(redis_client, names, audit, keystore)
    authenticator = Authenticator(settings.master_key, keystore, teams)
    limiter = RateLimiter(redis_client, names, settings.parallel_lease_seconds)
    budgets = Budgets(redis_client, names, settings.prices, settings.parallel_lease_seconds,
                      settings.budget_default_max_tokens, leases=limiter.leases)
    log_limits = LogLimits(key_entries=settings.spend_log_key_max, end_user_entries=settings.spend_log_end_user_max)
    accounting = Accounting(redis_client, names, settings.prices, settings.spend_log_max, limiter,
                            end_user_ttl=settings.end_user_stats_ttl, budgets=budgets, log_limits=log_limits)
    accounting.alerts, deliverer = _budget_alerts(settings, redis_client, metrics)
    passthrough = Passthrough(replicas, upstreams[0].auth_header, authenticator, settings.max_body_bytes,
                              accounting, limiter, metrics, settings.body_read_timeout, budgets, admission=admission)
    return Services(settings=settings, redis=redis_client, session=session, metrics=metrics,
                    replicas=replicas, keystore=keystore, audit=audit, auth=authenticator, limiter=limiter,
                    budgets=budgets, accounting=accounting, passthrough=passthrough, admission=admission,
                    teams=teams, alerts=accounting.alerts, deliverer=deliverer)


def _budget_alerts(settings: Settings, redis_client, metrics):
    """(gate, deliverer) of budget alerts (gateway/alerts/), or (None, None) without
    ALERT_WEBHOOK_URL. The gate is called by the accounting flusher after each settle; the
    deliverer is started by create_app (one loop per worker: the app is built after fork)."""
    if not settings.alert_webhook_url:
        return None, None
    from gateway.alerts import OUTCOMES, AlertNames, DeliveryPolicy, Deliverer, OnceGate, Outbox
    from gateway.alerts.webhook import build_session as webhook_session

    names = AlertNames(settings.redis_prefix)
    outbox = Outbox(redis_client, names, settings.alert_outbox_max)
    policy = DeliveryPolicy(
        max_attempts=settings.alert_webhook_max_attempts, max_age=settings.alert_webhook_max_age,
        backoff_base=settings.alert_webhook_backoff_base, backoff_cap=settings.alert_webhook_backoff_cap,
        connect_timeout=settings.alert_webhook_connect_timeout, read_timeout=settings.alert_webhook_read_timeout,
        lease=settings.alert_webhook_lease, poll_interval=settings.alert_webhook_poll_interval)
    gate = OnceGate(outbox, names, settings.budget_alert_thresholds, count=metrics.budget_alert)
    deliverer = Deliverer(outbox, settings.alert_webhook_url, settings.alert_webhook_secret, policy,
                          session=webhook_session(settings.alert_webhook_trust_env), count=metrics.budget_alert)
    for outcome in OUTCOMES:  # every outcome's series exists from start-up
        metrics.budget_alerts(outcome)
    return gate, deliverer


def _load_aware_routing(settings: Settings, replicas: Replicas, redis_client, names, metrics):
    """Routing by vLLM's own figures (README "Routing by vLLM's own load"): the policy, this
    worker's copy of the shared figures and its poller, on the replica set; returns the
    admission queue (None when admission control is off)."""
    if not settings.routing_polls:
        return None
    replicas.policy = Policy(
        w_queue=settings.routing_weight_queue, w_running=settings.routing_weight_running,
        w_kv=settings.routing_weight_kv, max_waiting=settings.routing_max_waiting, max_kv=settings.routing_max_kv,
        max_inflight=settings.routing_max_inflight, affinity=settings.routing_affinity,
        affinity_slack=settings.routing_affinity_slack, affinity_prefix_bytes=settings.routing_affinity_prefix_bytes)
    replicas.board = LoadBoard(names, [r.name for r in replicas.replicas], settings.routing_stale_after)
    replicas.poller = LoadPoller(replicas.board, replicas.replicas, redis_client, names,
                                 interval=settings.routing_poll_interval, timeout=settings.routing_poll_timeout,
                                 instance_id=settings.instance_id)
    if not settings.routing_admission_on:
        return None
    admission = Admission(replicas.has_room, max_waiting=settings.routing_queue_max,
                          timeout=settings.routing_queue_timeout, metrics=metrics)
    replicas.on_change = admission.pump
    replicas.poller.on_refresh = admission.pump
    return admission


def _reconciliation(settings: Settings, replicas: Replicas, redis_client, names, metrics) -> None:
    """Token reconciliation (README "Token reconciliation"; gateway/relay/reconcile.py): this
    worker's tally on the replica set, flushed and windowed by routing's poller when routing
    polls, else by a poller of its own that reads /metrics at RECONCILE_POLL_INTERVAL and
    publishes no load figures (one replica, the common deploy, or routing off)."""
    if not settings.reconcile:
        return
    reconciler = Reconciler(names, [r.name for r in replicas.replicas], window=settings.reconcile_window,
                            threshold=settings.reconcile_drift_threshold, min_tokens=settings.reconcile_min_tokens,
                            interval=settings.poll_interval, timeout=settings.routing_poll_timeout, metrics=metrics)
    poller = replicas.poller
    if poller is None:
        poller = replicas.reconcile_poller = LoadPoller(
            None, replicas.replicas, redis_client, names, interval=settings.reconcile_poll_interval,
            timeout=settings.routing_poll_timeout, instance_id=settings.instance_id)
    poller.reconciler = reconciler
    reconciler.instance_id = poller.instance_id
    replicas.reconciler = reconciler


def _register_blueprints(app: Flask) -> None:
    from blueprints import audit, console, health, keys, metrics, passthrough, replicas, spend, teams

    for blueprint in (passthrough.bp, health.bp, keys.bp, teams.bp, spend.bp, audit.bp, metrics.bp, replicas.bp,
                      console.bp):
        app.register_blueprint(blueprint)


def _install_request_record(app: Flask) -> None:
    """Every request gets a record and an id; the log line is written when the body closes."""

    metrics = app.extensions["gateway"].metrics

    @app.before_request
    def start_record():
        record = RequestRecord(request.method, request.path, "gateway_" + (request.blueprint or "other"), metrics)
        record.request_id = request_id_for(request.environ)
        g.record = record

    @app.after_request
    def finish_record(response: Response):
        record = g.get("record")
        if record is None:
            return response
        response.headers["X-Request-Id"] = record.request_id
        record.status = response.status_code
        if not record.stream and response.content_length is not None and not record.bytes_out:
            record.bytes_out = response.content_length
        response.call_on_close(record.emit)
        return response


def _json_error(status: int, message: str, type_=None, param=None, headers=None) -> Response:
    resp = Response(error_body(status, message, type_, param), status=status,
                    content_type="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def _install_error_handlers(app: Flask) -> None:
    """One envelope for every error the gateway produces itself."""

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError):
        app.extensions["gateway"].metrics.refused(exc)
        record = g.get("record")
        if record is not None and record.error is None:
            record.error = exc.message
        return _json_error(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 404:
            message = f"No route {request.path}; vLLM's routes are under /vllm/"
        return _json_error(exc.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Never a bare 500 page; the traceback goes to stderr, the caller gets the envelope.
        log.exception("unhandled error")
        record = g.get("record")
        if record is not None:
            record.error = f"internal error: {type(exc).__name__}"
        return _json_error(500, "internal gateway error; see the gateway log for the request id")
