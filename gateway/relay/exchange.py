"""One /vllm request: authenticate, apply the key's policy and limits, relay, account.

`Passthrough.relay` is called by the pass-through blueprint's view with the WSGI environ (the
raw target and body bytes come from there, so nothing is re-encoded) and the request's record;
it returns a `Relayed` answer the view turns into a Flask response. Errors are raised as
GatewayError, after the request has been accounted for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Iterable

from gateway.core.accesslog import upstream_request_id
from gateway.core.errors import GatewayError
from gateway.core.metrics import route_group
from gateway.keys import policy
from gateway.keys.fields import encodable
from gateway.teams import admission as teams
from gateway.relay.bodyfields import body_fields, prompt_head, rewrite_model
from gateway.relay.choice import session_key
from gateway.relay.disconnect import interrupt_wait_on_hang_up
from gateway.relay.replicas import creates_response, response_id_in, sticky_id
from gateway.relay.response import RelayedBody, read_small_body, response_headers
from gateway.relay.target import PREFIX, forward_headers, read_body, vllm_target
from gateway.usage.accounting import budget_period, current_budget_spend
from gateway.usage.budgets import budget_exceeded
from gateway.usage.modellimits import ModelLimits, applies as model_limited
from gateway.usage.tap import Usage, UsageTap, clean_label

log = logging.getLogger("gateway")
MAX_END_USER = 256


def status_text(status: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return f"{status} {reason}"


@dataclass
class Relayed:
    """vLLM's answer as the caller gets it; `close` runs when the server closes the body."""

    status_line: str
    headers: list
    body: Iterable[bytes]
    close: Callable[[], None]


def end_user_of(environ, fields: dict | None) -> str | None:
    """`x-end-user-id`, else the body's `user` (OpenAI convention)."""
    value = environ.get("HTTP_X_END_USER_ID")
    if not value and fields is not None:
        value = fields.get("user")
    if isinstance(value, str) and 0 < len(value) <= MAX_END_USER and encodable(value):
        return value
    return None


def affinity_key(environ, fields: dict | None, end_user: str | None, body: bytes, prefix_bytes: int) -> str | None:
    """The request's session key for prefix affinity (gateway/relay/choice.py session_key)."""
    header = environ.get("HTTP_X_SESSION_ID") or environ.get("HTTP_X_CONVERSATION_ID")
    previous = fields.get("previous_response_id") if fields else None
    if header or (isinstance(previous, str) and previous) or end_user:
        return session_key(header, previous, end_user, None)
    return session_key(None, None, None, prompt_head(body, fields, prefix_bytes))


def request_fields(body: bytes, content_type: str | None, forms: bool) -> dict | None:
    """The body's top-level fields when it is JSON (or, if `forms`, a multipart form)."""
    if not body:
        return None
    ctype = (content_type or "").lower()
    if "json" in ctype or body[:1] == b"{" or (forms and ctype.startswith("multipart/form-data")):
        return body_fields(body, content_type)
    return None


class Exchange:
    """One /vllm request from admission to accounting."""

    __slots__ = ("passthrough", "record", "identity", "path", "fields", "end_user", "slot", "hold", "tap",
                 "replica", "route", "queued", "capture_id", "finished", "_used", "team")

    def __init__(self, passthrough, record, identity, path):
        self.passthrough = passthrough
        self.finished = False
        self._used = None  # (usage, cost), once the answer is complete
        self.record = record
        self.identity = identity
        self.path = path
        self.fields = None
        self.end_user = None
        self.slot = None
        self.hold = None  # the request's budget reservation, settled by accounting
        self.team = None  # what it holds of its key's team (gateway/teams/admission.py TeamShare)
        self.tap = None
        self.replica = None
        self.route = None   # why that replica (choice.ROUTE_REASONS)
        self.queued = 0.0   # seconds waited in the admission queue
        self.capture_id = False

    def on_chunk(self, chunk: bytes) -> None:
        if self.tap is not None:
            self.tap.feed(chunk)
        if self.capture_id:
            response_id = response_id_in(chunk)
            if response_id is not None:
                self.capture_id = False
                self.passthrough.replicas.remember(response_id, self.replica)

    def hold_real_cost(self) -> None:
        """A whole answer is in hand: its budget reservation becomes its real cost before the
        caller has it, so the caller's next request never finds this one's estimate still held."""
        if self.tap is None:
            return
        for hold in (self.hold, self.team.hold if self.team is not None else None):
            if hold is not None:
                self.passthrough.budgets.adjust_now(hold, self.used()[1])

    def used(self) -> tuple:
        """(usage, cost) of the request, worked out once, when its answer is complete."""
        if self._used is None:
            if self.tap is not None:
                usage = self.tap.result(self.fields)
            else:
                usage = Usage(self.fields.get("model") if self.fields else None)
            # The model name comes from the caller or vLLM: make it safe once for logs, Redis and labels.
            usage.model = clean_label(usage.model)
            cost = self.passthrough.accounting.usage_cost(usage)  # cached prompt tokens at their price
            self._used = (usage, cost)
        return self._used

    def close(self) -> None:
        """The caller's response closed (finished, or the caller left): account for it."""
        if self.record.stream:
            self.passthrough.metrics.streams_open.dec()
        self.finish()

    def finish(self, status: int | None = None) -> None:
        """Account for the request, once: after the response closed, or when it failed."""
        if self.finished:
            return
        self.finished = True
        record = self.record
        if self.replica is not None:
            self.passthrough.replicas.release(self.replica)
        usage, spend = self.used()
        if self.replica is not None:  # reconciliation's tally: memory only, flushed by the poller
            self.passthrough.replicas.tally(self.replica, usage)
        accounting = self.passthrough.accounting
        key = self.identity.key
        entry = {
            "request_id": record.request_id,
            "token": self.identity.token,
            "key_alias": key.get("key_alias") if key else None,
            "team_id": self.team.team_id if self.team is not None else None,
            "caller": record.caller,
            "end_user": self.end_user,
            "model": usage.model,
            "route": self.path,
            "method": record.method,
            "status": status if status is not None else record.status,
            "upstream_status": record.upstream_status,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens or None,  # logged only when vLLM reported some
            "total_tokens": usage.total_tokens,
            "spend": spend,
            "start_time": record.wall,
            "end_time": time.time(),
            "ttfb_ms": round((record.ttfb - record.start) * 1000, 2) if record.ttfb is not None else None,
            "duration_ms": round((time.monotonic() - record.start) * 1000, 2),
            "stream": record.stream,
            "estimated": usage.estimated,
            "error": record.error,
        }
        record.extra = {"model": usage.model, "total_tokens": usage.total_tokens}
        if self.replica is not None:
            record.extra.update(replica=self.replica.name, route=self.route)
        if self.queued:
            record.extra["queued_ms"] = round(self.queued * 1000, 2)
        accounting.record(entry, key, self.slot, self.hold, team=self.team)
        metrics = self.passthrough.metrics
        alias = entry["key_alias"] or ("master" if self.identity.is_master else "(no alias)")
        metrics.usage(alias, usage.model or "unknown", usage.prompt_tokens, usage.completion_tokens, spend)
        if self.replica is not None and (record.error or "").startswith("upstream stream broke"):
            metrics.upstream_error("stream_broken", self.replica.name)


class Passthrough:
    """Forwards `/vllm/<path>` to vLLM untranslated; one instance per worker."""

    def __init__(self, replicas, upstream_auth: str | None, authenticator, max_body_bytes: int,
                 accounting, limiter, metrics, body_timeout: float = 30.0, budgets=None, admission=None):
        self.metrics = metrics
        self.admission = admission  # the queue in front of saturated replicas (None: off)
        self.replicas = replicas
        self.upstream_auth = upstream_auth
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.accounting = accounting
        self.limiter = limiter
        self.model_limits = ModelLimits(limiter.redis, limiter.names) if limiter is not None else None
        self.budgets = budgets if budgets is not None else accounting.budgets

    def relay(self, environ, record) -> Relayed:
        """Admit and relay one request; raises GatewayError (already accounted for) when refused."""
        record.route = route_group(environ.get("PATH_INFO", "")[len(PREFIX):])
        identity = self.authenticator.authenticate(environ)
        record.caller = identity.label
        path, query = vllm_target(environ)
        exchange = Exchange(self, record, identity, path)
        method = environ["REQUEST_METHOD"]
        resp = None
        try:
            body = self._admit(environ, exchange)
            headers = forward_headers(environ, self._upstream_id(environ, record), self.upstream_auth)
            replicas = self.replicas
            response_id = None if replicas.single else sticky_id(method, path, exchange.fields)
            session = None
            if response_id is None and replicas.wants_affinity:
                session = affinity_key(environ, exchange.fields, exchange.end_user, body,
                                       replicas.policy.affinity_prefix_bytes)
            decided = replicas.decide(response_id, session)
            if self._must_queue(method, decided[1]):
                # Only inference (a POST) waits for a replica with room; the key's slot and budget
                # hold stay taken meanwhile and are given back by the error path if it never goes.
                exchange.queued = self.admission.enter(identity.token or "master", environ.get("gunicorn.socket"))
                decided = replicas.decide(response_id, session)  # the figures moved while it waited
            stop_watching = interrupt_wait_on_hang_up(environ.get("gunicorn.socket"))
            try:
                exchange.replica, resp = replicas.send(method, path, query, headers, body, decided=decided)
            finally:
                if stop_watching is not None:
                    stop_watching()
            exchange.route = decided[1] if exchange.replica is decided[0][0] else "failover"
            exchange.capture_id = not replicas.single and creates_response(method, path)
            return self._answer(resp, method, exchange, environ.get("gunicorn.socket"))
        except Exception as exc:
            # Every way out before a response exists still frees the slot, the replica's
            # in-flight count and the upstream connection, and is accounted for.
            if resp is not None:
                resp.close()
            status = exc.status if isinstance(exc, GatewayError) else 500
            if record.error is None:
                record.error = exc.message if isinstance(exc, GatewayError) else f"internal error: {type(exc).__name__}"
            if isinstance(exc, GatewayError) and exchange.slot is not None:
                exc.headers = {**exchange.slot.headers, **exc.headers}
            exchange.finish(status=status)
            raise

    def _must_queue(self, method: str, reason: str) -> bool:
        """Whether the request goes through the admission queue: the choice already says when
        every replica is saturated ("saturated"), so the common case costs no second look at the
        figures; a queue that holds others is never overtaken; a sticky call (its replica fixed)
        asks the queue itself."""
        if self.admission is None or method != "POST":
            return False
        return bool(self.admission.length) or reason in ("saturated", "sticky")

    @staticmethod
    def _upstream_id(environ, record) -> str:
        upstream_id = upstream_request_id(record.request_id,
                                          environ.get("HTTP_X_REQUEST_ID") == record.request_id)
        if upstream_id != record.request_id:
            record.upstream_id = upstream_id
        return upstream_id

    def _admit(self, environ, exchange) -> bytes:
        """Admission in order of cost: what needs only the headers (route policy, budget, rate
        limits) before the body is read; then the body's model, then the budget reservation of
        the request's estimated cost (gateway/usage/budgets.py). A request either refuses gives
        its rate-limit count back (LiteLLM #39309). Returns the body when admitted."""
        identity, record = exchange.identity, exchange.record
        key = identity.key
        if key is not None:
            policy.check_route(policy.policy_path(exchange.path), key)
            self._check_budget(key, identity.budget)
            if self.limiter.applies(key):
                exchange.slot = self.limiter.acquire(identity.token, key, record.request_id)
            exchange.team = teams.admit_headers(self.limiter, self.accounting.names, identity, record.request_id,
                                                exchange.slot)
        body = read_body(environ, self.max_body_bytes, self.body_timeout)
        record.bytes_in = len(body)
        # A form's model is read too when something checks it: the key's or its team's models, or
        # per-model limits.
        team_models = exchange.team is not None and exchange.team.team.get("models")
        forms = bool(key and (key.get("models") or team_models or model_limited(key)))
        exchange.fields = request_fields(body, environ.get("CONTENT_TYPE"), forms=forms)
        if key is not None and key.get("aliases"):
            body = self._apply_alias(exchange, key, body)
        exchange.end_user = end_user_of(environ, exchange.fields)
        model_slot = None
        if key is not None:
            try:
                policy.check_model(exchange.fields, key, bool(body))
                if self.model_limits is not None:  # per-model limits (gateway/usage/modellimits.py)
                    model_slot = self.model_limits.admit(identity.token, key, (exchange.fields or {}).get("model"),
                                                         bool(body))
                exchange.hold = self._reserve_budget(exchange)
                teams.admit_body(exchange.team, self.budgets, exchange.fields, bool(body), record.wall,
                                 record.request_id)
            except GatewayError:
                if exchange.slot is not None:
                    self.limiter.refund(exchange.slot)
                if model_slot is not None:
                    self.model_limits.refund(model_slot)
                if exchange.team is not None:
                    exchange.team.refund(self.limiter)
                raise
        return body

    @staticmethod
    def _apply_alias(exchange, key: dict, body: bytes) -> bytes:
        """The one sanctioned body rewrite: a key's `aliases` entry for the body's `model` puts the
        real model name in its place (gateway/relay/bodyfields.py rewrite_model; every other byte
        kept). The checks after it and accounting see the real model."""
        real = policy.aliased_model(exchange.fields, key)
        if real is None:
            return body
        rewritten = rewrite_model(body, real)
        if rewritten is None:  # not a JSON object with a string model (e.g. a form): sent as it is
            return body
        exchange.fields["model"] = real
        return rewritten

    @staticmethod
    def _check_budget(key: dict, budget: tuple) -> None:
        """Header-only: refuse a key already spent (as authentication read it, up to ~1 s old)
        before its body is read. The exact check is the reservation after the body."""
        max_budget = key.get("max_budget")
        if max_budget is None:
            return
        spent = current_budget_spend(key, budget, time.time())
        if spent >= max_budget:
            raise budget_exceeded(spent, max_budget)

    def _reserve_budget(self, exchange):
        """Reserve the request's estimated cost against the key's budget, atomically with the check."""
        identity = exchange.identity
        period = budget_period(identity.key, exchange.record.wall)
        return self.budgets.reserve(identity.token, identity.key, period, exchange.fields,
                                    exchange.record.request_id)

    def _answer(self, resp, method: str, exchange, client_socket=None) -> Relayed:
        """vLLM's status and headers, and its body: bytes when short, else a RelayedBody."""
        record = exchange.record
        record.upstream_status = resp.status_code
        headers = response_headers(resp, exchange.replica.upstream)
        if exchange.slot is not None:
            headers.extend(exchange.slot.headers.items())
        status_line = status_text(resp.status_code, resp.raw.reason)
        raw_headers = resp.raw.headers
        exchange.tap = UsageTap(raw_headers.get("content-type", ""), raw_headers.get("content-encoding", ""))
        small = read_small_body(resp, method)
        if small is not None:
            record.ttfb = time.monotonic()
            record.bytes_out = len(small)
            exchange.on_chunk(small)
            resp.close()
            exchange.hold_real_cost()
            if exchange.slot is not None:
                # vLLM's work is done: free the parallel slot before the caller has the answer, so
                # its next request (often sent the moment this one arrives) never finds it taken.
                self.limiter.release(exchange.slot)
            if exchange.team is not None and exchange.team.slot is not None:
                self.limiter.release(exchange.team.slot)  # likewise the team's
            return Relayed(status_line, headers, [small], exchange.close)
        record.stream = True
        self.metrics.streams_open.inc()
        body = RelayedBody(resp, record, exchange, client_socket, on_close=exchange.close)
        return Relayed(status_line, headers, body, body.close)
