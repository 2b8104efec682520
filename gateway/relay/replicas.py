"""Several vLLM replicas behind one /vllm: least-in-flight choice, connect failover, stickiness.

Choice: the healthy replica with the fewest requests in flight in this worker (streams count
until they end), ties taken in turn. A replica that refuses the connection or does not accept
it in time is skipped for a cool-off period and the request goes to the next one; that is safe
because nothing of the request reached it. Any later failure is not retried.

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

import hashlib
import logging
import re
import time

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS

log = logging.getLogger("gateway")

STICKY_TTL = 24 * 3600
_RESPONSE_PATH = re.compile(r"/v1/responses/([^/?]+)")
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_\-.:]{1,200})"')


class Replica:
    __slots__ = ("upstream", "name", "inflight", "down_until", "last_error")

    def __init__(self, upstream):
        self.upstream = upstream
        self.name = upstream.base
        self.inflight = 0
        self.down_until = 0.0
        self.last_error = None

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


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

    def __init__(self, upstreams, *, cooloff: float, redis=None, names=None, on_error=None):
        self.replicas = [Replica(u) for u in upstreams]
        self.by_name = {r.name: r for r in self.replicas}
        self.cooloff = cooloff
        self.redis = redis
        self.names = names
        self.on_error = on_error  # metrics hook: (kind, replica name)
        self._turn = 0

    @property
    def single(self) -> bool:
        return len(self.replicas) == 1

    def rendezvous(self, key: str) -> Replica:
        def weight(replica):
            return hashlib.blake2b(f"{key}|{replica.name}".encode(), digest_size=8).digest()
        return max(self.replicas, key=weight)

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

    def candidates(self, response_id: str | None) -> list[Replica]:
        if self.single:
            return self.replicas
        if response_id is not None:
            return [self._sticky(response_id)]
        now = time.monotonic()
        count = len(self.replicas)
        start, self._turn = self._turn, (self._turn + 1) % count
        rotated = self.replicas[start:] + self.replicas[:start]
        healthy = sorted((r for r in rotated if r.healthy(now)), key=lambda r: r.inflight)
        cooling = sorted((r for r in rotated if not r.healthy(now)), key=lambda r: r.down_until)
        return healthy + cooling  # all cooling off: still try, soonest back first

    def send(self, method: str, path: str, query: str, headers: dict, body: bytes | None,
             response_id: str | None = None):
        """(replica, response); the replica's in-flight count stays raised until `release`."""
        failure = None
        for replica in self.candidates(response_id):
            replica.inflight += 1
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
            return replica, resp
        raise failure

    @staticmethod
    def release(replica: Replica) -> None:
        replica.inflight -= 1

    def status(self) -> list[dict]:
        """Each replica's state for /health/readiness (probes vLLM's /health)."""
        now = time.monotonic()
        out = []
        for replica in self.replicas:
            ok, detail = replica.upstream.probe()
            out.append({
                "base": replica.name,
                "status": "up" if ok else "down",
                "detail": detail,
                "inflight": replica.inflight,
                "cooling_off_s": round(max(replica.down_until - now, 0.0), 1),
                "last_error": replica.last_error,
            })
        return out
