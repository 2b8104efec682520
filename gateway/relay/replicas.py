"""Several vLLM replicas behind one /vllm: load-aware choice, connect failover, stickiness.

Choice (gateway/relay/choice.py): with load-aware routing on, by vLLM's own figures (requests
waiting and running, KV-cache use; read by gateway/relay/loadpoller.py and shared through Redis),
saturated replicas left out, a session's replica preferred (prefix affinity) unless it is much
busier; without fresh figures, the healthy replica with the fewest requests in flight in this
worker (streams count until they end), ties taken in turn (ROUTING_STRATEGY=least_busy: always
so); ROUTING_STRATEGY=round_robin: each worker takes the healthy replicas in turn. A replica that
refuses the connection or does not accept it in time is skipped for a cool-off period and the
request goes to the next one; that is safe because nothing of the request reached it. Any later
failure is not retried.

Stateful routes stick to one replica. The Responses API keeps a stored response on the replica
that created it, so:
  - when a `POST /v1/responses` answer shows its id, the gateway records id -> replica in Redis
    (`<prefix>resp:<id>`, 24 h; shared by every worker and gateway instance);
  - `/v1/responses/{id}` and `/v1/responses/{id}/...` and a `POST /v1/responses` with
    `previous_response_id` go to the recorded replica; for an id never recorded, to the replica
    chosen by rendezvous hashing of the id (stable while the replica list is unchanged).
  Sticky requests never fail over: another replica would not hold the state.
"""
from __future__ import annotations

import collections
import logging
import re
import time

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS
from gateway.relay import choice

log = logging.getLogger("gateway")

STICKY_TTL = 24 * 3600
_RESPONSE_PATH = re.compile(r"/v1/responses/([^/?]+)")
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_\-.:]{1,200})"')


_NO_POLICY = choice.Policy()
# Send and end times kept per replica to count what happened since its figures were read.
SINCE_MAX = 4096


class Replica:
    __slots__ = ("upstream", "name", "inflight", "down_until", "last_error", "sent", "done")

    def __init__(self, upstream):
        self.upstream = upstream
        self.name = upstream.base
        self.inflight = 0
        self.down_until = 0.0
        self.last_error = None
        # This worker's sends and ends (monotonic times) since the replica's figures were read.
        self.sent: collections.deque = collections.deque(maxlen=SINCE_MAX)
        self.done: collections.deque = collections.deque(maxlen=SINCE_MAX)

    def healthy(self, now: float) -> bool:
        return self.down_until <= now

    def since(self, read_mono: float) -> tuple[int, int]:
        """(sent, ended) by this worker after `read_mono`; older entries are dropped."""
        for times in (self.sent, self.done):
            while times and times[0] <= read_mono:
                times.popleft()
        return len(self.sent), len(self.done)


def sticky_id(method: str, path: str, fields: dict | None) -> str | None:
    """The response id a request is bound to, if it is a stateful Responses API call."""
    match = _RESPONSE_PATH.match(path)
    if match:
        return match.group(1)
    if method == "POST" and path == "/v1/responses" and fields:
        previous = fields.get("previous_response_id")
        if isinstance(previous, str) and previous:
            return previous
    return None


def creates_response(method: str, path: str) -> bool:
    return method == "POST" and path == "/v1/responses"


def response_id_in(data: bytes) -> str | None:
    match = _RESPONSE_ID.search(data)
    return match.group(1).decode() if match else None


class Replicas:
    """The replica set of one worker."""

    def __init__(self, upstreams, *, cooloff: float, redis=None, names=None, on_error=None,
                 policy: choice.Policy | None = None, board=None, poller=None, on_decision=None,
                 round_robin: bool = False):
        self.replicas = [Replica(u) for u in upstreams]
        self.by_name = {r.name: r for r in self.replicas}
        self.cooloff = cooloff
        self.redis = redis
        self.names = names
        self.on_error = on_error  # metrics hook: (kind, replica name)
        # Load-aware routing: the policy, this worker's copy of the shared figures, the poller
        # that refreshes it (None, None, None: least in flight only, as without figures).
        self.policy = policy
        self.board = board
        self.poller = poller
        self.on_decision = on_decision  # metrics hook: (replica name, reason)
        # Token reconciliation (gateway/relay/reconcile.py; None: off). Its poller is `poller`
        # when routing polls too, else one of its own (`reconcile_poller`, at its slower pace).
        self.reconciler = None
        self.reconcile_poller = None
        self.on_change = None  # called after each send and end (the admission queue's pump)
        self.round_robin = round_robin  # ROUTING_STRATEGY=round_robin: in turn, whatever the load
        self._turn = 0

    @property
    def single(self) -> bool:
        return len(self.replicas) == 1

    @property
    def load_aware(self) -> bool:
        return self.board is not None and self.policy is not None

    @property
    def wants_affinity(self) -> bool:
        """Whether a session key can change the choice (so the request should derive one)."""
        return self.load_aware and self.policy.affinity and not self.single

    def start_polling(self) -> None:
        """Start this worker's poller on first use (a no-op once started, and without gevent)."""
        if self.poller is not None:
            self.poller.start()
        if self.reconcile_poller is not None:
            self.reconcile_poller.start()

    def tally(self, replica: Replica, usage) -> None:
        """A request to `replica` ended with `usage`: count it for reconciliation (memory only)."""
        if self.reconciler is not None:
            self.reconciler.add(replica.name, usage)

    def rendezvous(self, key: str) -> Replica:
        return self.by_name[choice.rendezvous(key, [r.name for r in self.replicas])]

    def views(self, now: float | None = None) -> list:
        """Each replica as the choice sees it: state, fresh figures, what happened since."""
        now = time.monotonic() if now is None else now
        count = len(self.replicas)
        views = []
        for index, replica in enumerate(self.replicas):
            figures = self.board.fresh(replica.name, now) if self.board is not None else None
            sent = done = 0
            if figures is not None:
                sent, done = replica.since(figures.read_mono)
            views.append(choice.View(index, replica.name, replica.healthy(now), replica.down_until,
                                     replica.inflight, figures, sent, done,
                                     rotation=(index - self._turn) % count))
        return views

    def has_room(self) -> bool:
        """False when every healthy replica is saturated by its fresh figures (admission waits)."""
        if not self.load_aware:
            return True
        self.start_polling()
        return choice.has_room(self.views(), self.policy)

    def _sticky(self, response_id: str) -> Replica:
        if self.redis is not None:
            try:
                name = self.redis.get(self.names.sticky(response_id))
            except REDIS_ERRORS:
                name = None
            if name in self.by_name:
                return self.by_name[name]
        return self.rendezvous(response_id)

    def remember(self, response_id: str, replica: Replica) -> None:
        """Record which replica holds a new stored response (best effort)."""
        if self.single or self.redis is None:
            return
        try:
            self.redis.set(self.names.sticky(response_id), replica.name, ex=STICKY_TTL)
        except REDIS_ERRORS:
            log.warning("could not record the replica of a new response; follow-ups fall back to hashing")

    def decide(self, response_id: str | None = None, session: str | None = None) -> tuple[list, str]:
        """(the replicas to try, in order; why the first is first)."""
        self.start_polling()
        if self.single:
            return self.replicas, "single"
        if response_id is not None:
            return [self._sticky(response_id)], "sticky"
        views = self.views()  # without load-aware routing: no figures, so least in flight
        self._turn = (self._turn + 1) % len(self.replicas)
        if self.round_robin:
            return [self.replicas[view.index] for view in choice.in_turn(views)], "round_robin"
        decision = choice.choose(views, self.policy or _NO_POLICY, session if self.load_aware else None)
        return [self.replicas[view.index] for view in decision.order], decision.reason

    def candidates(self, response_id: str | None = None, session: str | None = None) -> list[Replica]:
        return self.decide(response_id, session)[0]

    def send(self, method: str, path: str, query: str, headers: dict, body: bytes | None,
             response_id: str | None = None, session: str | None = None, decided: tuple | None = None):
        """(replica, response); the replica's in-flight count stays raised until `release`.
        `decided`: what `decide` gave, when the caller decided first (to log why)."""
        failure = None
        order, reason = decided if decided is not None else self.decide(response_id, session)
        for attempt, replica in enumerate(order):
            replica.inflight += 1
            if self.load_aware:
                replica.sent.append(time.monotonic())
            if attempt == 0 and self.on_change is not None:
                self.on_change()  # counted: the admission queue may let the next request out
            upstream = replica.upstream
            try:
                resp = upstream.send(method, (upstream.base_path + path or "/") + query, headers, body)
            except GatewayError as exc:
                replica.inflight -= 1
                if exc.kind == "client_gone":  # the caller's doing, not the replica's
                    raise
                replica.last_error = exc.message
                if self.on_error is not None:
                    self.on_error(exc.kind or "error", replica.name)
                if not exc.retryable:
                    raise
                replica.down_until = time.monotonic() + self.cooloff
                failure = exc
                continue
            replica.down_until = 0.0
            if self.on_decision is not None:
                self.on_decision(replica.name, reason if attempt == 0 else "failover")
            return replica, resp
        raise failure

    def release(self, replica: Replica) -> None:
        replica.inflight -= 1
        if self.load_aware:
            replica.done.append(time.monotonic())
        if self.on_change is not None:
            self.on_change()  # a place may have freed: the admission queue may let one out

    def load(self, replica: Replica, now: float | None = None) -> dict | None:
        """The replica's shared figures as shown by readiness and /replicas (None: load-aware
        routing is off); `fresh` says whether routing uses them."""
        if not self.load_aware:
            return None
        now = time.monotonic() if now is None else now
        figures = self.board.figures.get(replica.name)
        if figures is None:
            return {"waiting": None, "running": None, "kv_cache_usage": None, "preemption_rate": None,
                    "decode_rate": None, "prefix_cache_hit_rate": None, "age_s": None, "fresh": False,
                    "saturated": None, "read_by": None}
        fresh = self.board.fresh(replica.name, now) is not None
        view = next(v for v in self.views(now) if v.name == replica.name)
        rate = figures.prefix_cache_hit_rate
        return {"waiting": figures.waiting, "running": figures.running, "kv_cache_usage": figures.kv,
                "preemption_rate": None if figures.preemption_rate is None else round(figures.preemption_rate, 3),
                "decode_rate": None if figures.decode_rate is None else round(figures.decode_rate, 2),
                "prefix_cache_hit_rate": None if rate is None else round(rate, 4),
                "age_s": round(figures.age(now), 3), "fresh": fresh,
                "saturated": choice.saturation(view, self.policy) if fresh else None,
                "read_by": figures.by}

    def status(self) -> list[dict]:
        """Each replica's state for /health/readiness (probes vLLM's /health), and its shared
        load figures when load-aware routing is on."""
        self.start_polling()
        now = time.monotonic()
        out = []
        for replica in self.replicas:
            ok, detail = replica.upstream.probe()
            state = {
                "base": replica.name,
                "status": "up" if ok else "down",
                "detail": detail,
                "inflight": replica.inflight,
                "cooling_off_s": round(max(replica.down_until - now, 0.0), 1),
                "last_error": replica.last_error,
            }
            load = self.load(replica)
            if load is not None:
                state["load"] = load
            out.append(state)
        return out

