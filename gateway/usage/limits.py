"""Per-key rate limits enforced atomically in Redis, across workers and gateway instances.

- rpm_limit: requests per fixed one-minute window (INCR only when admitted, so the count is exact;
  `refund` takes an admission back, e.g. when the model check refuses the request after it).
- tpm_limit: tokens per one-minute window, charged after the response from recorded usage.
- max_parallel_requests: a sorted set of leases (request id -> lease expiry). Each worker runs
  one renewer (a greenlet on gevent workers) that extends every lease it holds every lease/4 in
  one pipelined round trip, so a request keeps its slot for as long as it runs, chunks or not
  (a silent prefill longer than the lease used to lose it). A crashed worker renews nothing, so
  its leases run out after PARALLEL_SLOT_LEASE_SECONDS: no slot is held forever.

A lease is given back in the request's own greenlet. If Redis fails then, the release (or a
refund) is queued and written with the next accounting batch, so a Redis error never leaks a slot.

`LeaseRenewer` is the renewer itself, shared with the budget holds (gateway/usage/budgets.py),
which are leases of the same kind. `ClusterScript` runs a Lua script directly or queues it on a
pipeline as EVAL: redis-py's Redis Cluster pipeline refuses EVALSHA (reference.md §8).
"""
from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, incidents, unavailable
from gateway.core.timefmt import iso

log = logging.getLogger("gateway")

# A slot is renewed at most this long: a request that never ends (a bug) must not hold one forever.
MAX_HOLD_SECONDS = 24 * 3600
DEFERRED_MAX = 10_000

# One atomic check-and-take for all three limits; nothing is taken unless everything passes.
_ACQUIRE = """
local rpm_limit, tpm_limit, par_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local tpm_used = 0
if tpm_limit >= 0 then
  tpm_used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tpm_used >= tpm_limit then return {'tpm', 0, tpm_used, 0} end
end
local par = 0
if par_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  par = redis.call('ZCARD', KEYS[3])
  if par >= par_limit then return {'parallel', 0, tpm_used, par} end
end
local rpm = 0
if rpm_limit >= 0 then
  rpm = tonumber(redis.call('GET', KEYS[1]) or '0')
  if rpm >= rpm_limit then return {'rpm', rpm, tpm_used, par} end
  rpm = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], 120)
end
if par_limit >= 0 then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  par = par + 1
end
return {'ok', rpm, tpm_used, par}
"""

# Undo one admission: the rpm count (only while its window still exists, so a late refund never
# creates a key or goes below zero) and the parallel lease. ARGV: member, undo rpm?, undo lease?
_REFUND = """
if ARGV[2] == '1' and tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  redis.call('DECR', KEYS[1])
end
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""


class ClusterScript:
    """A Lua script callable directly (EVALSHA, loaded on NOSCRIPT) or queued on any pipeline.

    On a pipeline it is sent as EVAL with its text: a Redis Cluster pipeline refuses EVALSHA, and
    a plain pipeline's EVALSHA needs a SCRIPT EXISTS round trip first. Redis caches EVAL scripts
    by their digest, so the cost is the text's bytes (a flush of 500 entries over 50 keys:
    see README "Budgets"). Every caller passes KEYS of one hash slot ({token})."""

    def __init__(self, client, text: str):
        self.text = text
        self._script = client.register_script(text)

    def __call__(self, keys: list, args: list):
        return self._script(keys=keys, args=args)

    def queue(self, pipe, keys: list, args: list) -> None:
        pipe.execute_command("EVAL", self.text, len(keys), *keys, *args)


class LeaseRenewer:
    """This worker's leases (members of sorted sets scored by their expiry) and the one thread
    (a greenlet on gevent workers) that extends them all every lease/4 in one pipelined round
    trip while their requests run. A crashed worker renews nothing, so its leases run out after
    `lease` seconds; a request never ending (a bug) stops being renewed after MAX_HOLD_SECONDS."""

    def __init__(self, client, lease_seconds: float, what: str = "lease"):
        self.redis = client
        self.lease = lease_seconds
        self.what = what
        self.held: dict[str, tuple[str, float]] = {}  # member -> (sorted set, monotonic start)
        self._lock = threading.Lock()
        self._renewing = False

    def hold(self, name: str, member: str) -> None:
        with self._lock:
            self.held[member] = (name, time.monotonic())
            start, self._renewing = not self._renewing, True
        if start:
            # Under gevent's monkey-patching this thread is a greenlet.
            threading.Thread(target=self._renew_loop, name=f"{self.what}-renewer", daemon=True).start()

    def drop(self, member: str) -> None:
        with self._lock:
            self.held.pop(member, None)

    def _renew_loop(self) -> None:
        while True:
            time.sleep(self.lease / 4)
            with self._lock:
                members = list(self.held)
                if not members:
                    self._renewing = False  # started again by the next hold
                    return
            self.renew(members)

    def renew(self, members: list) -> None:
        """Extend the given leases (and their sets' lifetimes) in one round trip; never raises."""
        now, mono = time.time(), time.monotonic()
        by_set: dict[str, dict] = {}
        for member in members:
            name, since = self.held.get(member, (None, mono))
            if name is None:
                continue  # given back meanwhile
            if mono - since > MAX_HOLD_SECONDS:
                log.warning("%s %s held over %ds: no longer renewed", self.what, member, MAX_HOLD_SECONDS)
                self.drop(member)
                continue
            by_set.setdefault(name, {})[member] = now + self.lease
        if not by_set:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name, leases in by_set.items():
                pipe.zadd(name, leases, xx=True)  # a lease already given back is not revived
                pipe.expire(name, int(self.lease) + 60)
            pipe.execute()
        except REDIS_ERRORS as exc:
            incidents.report(exc, f"{self.what.capitalize()} leases are not renewed meanwhile.")
        except Exception:  # a closed or broken client: the loop must live on, or no lease is renewed again
            log.exception("%s leases not renewed", self.what)


class Slot:
    """An admitted request on a limited key: headers to send and what to give back."""

    __slots__ = ("limiter", "token", "request_id", "holds_parallel", "headers", "rpm_name")

    def __init__(self, limiter, token, request_id, holds_parallel, headers, rpm_name=None):
        self.limiter = limiter
        self.token = token
        self.request_id = request_id  # the lease's member: unique per request
        self.holds_parallel = holds_parallel
        self.headers = headers
        self.rpm_name = rpm_name  # the rpm window counter this request was counted in, if any


def _limit(value) -> int:
    return -1 if value is None else int(value)


class RateLimiter:
    def __init__(self, client, names, lease_seconds: float):
        self.redis = client
        self.names = names
        self.lease = lease_seconds
        self._acquire = ClusterScript(client, _ACQUIRE)
        self._refund = ClusterScript(client, _REFUND)
        # This worker's one lease renewer: the budget holds (gateway/usage/budgets.py) share it.
        self.leases = LeaseRenewer(client, lease_seconds)
        # Releases and refunds Redis refused: written with the next accounting batch.
        self.deferred: collections.deque = collections.deque(maxlen=DEFERRED_MAX)
        self.on_deferred = None  # set by Accounting: wakes its flusher

    @staticmethod
    def applies(key: dict) -> bool:
        return any(key.get(f) is not None for f in ("rpm_limit", "tpm_limit", "max_parallel_requests"))

    def acquire(self, token: str, key: dict, request_id: str, subject: str = "key") -> Slot:
        """Admit the request or raise 429 with Retry-After; the Slot carries the headers.
        `token` may be a team's subject (`team:<id>`) with the team's record: `subject` says
        which in the message."""
        rpm_limit, tpm_limit = key.get("rpm_limit"), key.get("tpm_limit")
        par_limit = key.get("max_parallel_requests")
        now = time.time()
        window = int(now // 60)
        # The caller chooses X-Request-Id, so make the lease member unique per request.
        request_id = f"{request_id}:{secrets.token_hex(4)}"
        keys = [self.names.rpm(token, window), self.names.tpm(token, window), self.names.parallel(token)]
        args = [_limit(rpm_limit), _limit(tpm_limit), _limit(par_limit), now, request_id,
                now + self.lease, int(self.lease) + 60]
        try:
            verdict, rpm, tpm_used, par = self._acquire(keys=keys, args=args)
        except REDIS_ERRORS:
            if par_limit is not None:
                # The reply may be what was lost, after the lease was taken: give it back later.
                self._defer(Slot(self, token, request_id, True, {}))
            raise unavailable() from None
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        headers = {}
        if rpm_limit is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm_limit)
            headers["x-ratelimit-remaining-requests"] = str(max(rpm_limit - int(rpm), 0))
        if tpm_limit is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm_limit)
            headers["x-ratelimit-remaining-tokens"] = str(max(tpm_limit - int(tpm_used), 0))
        if verdict != "ok":
            retry = 1 if verdict == "parallel" else max(1, math.ceil(60 - now % 60))
            what = {"rpm": f"rpm_limit of {rpm_limit} requests per minute",
                    "tpm": f"tpm_limit of {tpm_limit} tokens per minute",
                    "parallel": f"max_parallel_requests of {par_limit}"}[verdict]
            raise GatewayError(429, f"Rate limit reached for this {subject}: {what}; retry in {retry}s",
                               "rate_limit_error", headers={**headers, "Retry-After": str(retry)}, kind=verdict)
        slot = Slot(self, token, request_id, par_limit is not None, headers,
                    keys[0] if rpm_limit is not None else None)
        if slot.holds_parallel:
            self.leases.hold(self.names.parallel(token), slot.request_id)
        return slot

    def remaining(self, token: str, key: dict, now: float | None = None) -> dict:
        """What the key's limits leave this minute, for the key's holder (GET /key/info): per
        limit the key has, its size, what is used and what remains; None for a limit it lacks."""
        now = time.time() if now is None else now
        window = int(now // 60)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.names.rpm(token, window))
        pipe.get(self.names.tpm(token, window))
        pipe.zcount(self.names.parallel(token), f"({now}", "+inf")  # unexpired leases
        rpm, tpm, parallel = pipe.execute()
        resets_at = iso((window + 1) * 60)

        def minute(limit, used):
            if limit is None:
                return None
            used = int(used or 0)
            return {"limit": limit, "used": used, "remaining": max(limit - used, 0), "resets_at": resets_at}

        par_limit = key.get("max_parallel_requests")
        return {
            "rpm": minute(key.get("rpm_limit"), rpm),
            "tpm": minute(key.get("tpm_limit"), tpm),
            "parallel": None if par_limit is None else {
                "limit": par_limit, "in_use": int(parallel), "remaining": max(par_limit - int(parallel), 0)},
        }

    # -- giving back ------------------------------------------------------------------------
    def release(self, slot: Slot) -> None:
        """Give the parallel lease back (the request ended); never raises."""
        self._give_back(slot, rpm=False)

    def refund(self, slot: Slot) -> None:
        """Undo the admission of a request refused after it (e.g. by the model check): its rpm
        count goes back (if its window still exists) and its lease is dropped, atomically.
        Never raises."""
        self._give_back(slot, rpm=True)

    def _give_back(self, slot: Slot, rpm: bool) -> None:
        """Return the slot's lease (and, for a refund, its rpm count) once: the slot forgets what
        it gave back, so a second call does nothing. A Redis error queues it with accounting."""
        undo = Slot(self, slot.token, slot.request_id, slot.holds_parallel, {}, slot.rpm_name if rpm else None)
        if slot.holds_parallel:
            self.leases.drop(slot.request_id)
        slot.holds_parallel = False
        if rpm:
            slot.rpm_name = None
        if not undo.holds_parallel and undo.rpm_name is None:
            return
        try:
            self._queue_undo(self.redis, undo)
        except REDIS_ERRORS as exc:
            self._defer(undo, exc)

    def _queue_undo(self, client, undo: Slot) -> None:
        """A release (lease only) or a refund (rpm and lease) on `client`: Redis or a pipeline."""
        if undo.rpm_name is None:
            client.zrem(self.names.parallel(undo.token), undo.request_id)
            return
        keys = [undo.rpm_name, self.names.parallel(undo.token)]
        args = [undo.request_id, "1", "1" if undo.holds_parallel else "0"]
        if client is self.redis:
            self._refund(keys, args)
        else:
            self._refund.queue(client, keys, args)  # an accounting pipeline: EVAL, cluster-safe

    def _defer(self, undo: Slot, exc: BaseException | None = None) -> None:
        if exc is not None:
            incidents.report(exc, "Slot releases are queued and written when it answers.")
        self.deferred.append(undo)
        if self.on_deferred is not None:
            self.on_deferred()

    def take_deferred(self, pipe) -> list:
        """Queue every deferred release/refund on `pipe`; the caller puts them back on failure."""
        taken = []
        while self.deferred:
            taken.append(self.deferred.popleft())
        for undo in taken:
            self._queue_undo(pipe, undo)
        return taken

    def put_back(self, taken: list) -> None:
        self.deferred.extendleft(reversed(taken))

    def charge_tokens_into(self, pipe, token: str, tokens: int, at: float) -> None:
        """Charge tokens to the window the request ended in (queued on an accounting pipeline)."""
        if tokens > 0:
            name = self.names.tpm(token, int(at // 60))
            pipe.incrby(name, tokens)
            pipe.expire(name, 120)
