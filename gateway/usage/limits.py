"""Per-key rate limits enforced atomically in Redis, across workers and gateway instances.

- rpm_limit: requests per fixed one-minute window (INCR only when admitted, so the count is exact).
- tpm_limit: tokens per one-minute window, charged after the response from recorded usage.
- max_parallel_requests: a sorted set of leases (request id -> lease expiry). A lease is
  renewed while a stream runs and removed on every exit path; a crashed worker's lease
  simply expires, so no slot is held forever.
"""
from __future__ import annotations

import math
import secrets
import time

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, unavailable

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


class Slot:
    """An admitted request on a limited key: headers to send and a lease to release."""

    __slots__ = ("limiter", "token", "request_id", "holds_parallel", "headers", "renew_at")

    def __init__(self, limiter, token, request_id, holds_parallel, headers):
        self.limiter = limiter
        self.token = token
        self.request_id = request_id
        self.holds_parallel = holds_parallel
        self.headers = headers
        self.renew_at = time.monotonic() + limiter.lease / 4

    def renew(self) -> None:
        """Extend the lease of a long stream (called as chunks flow)."""
        if self.holds_parallel and time.monotonic() >= self.renew_at:
            self.renew_at = time.monotonic() + self.limiter.lease / 4
            self.limiter.renew(self)


def _limit(value) -> int:
    return -1 if value is None else int(value)


class RateLimiter:
    def __init__(self, client, names, lease_seconds: float):
        self.redis = client
        self.names = names
        self.lease = lease_seconds
        self._acquire = client.register_script(_ACQUIRE)

    @staticmethod
    def applies(key: dict) -> bool:
        return any(key.get(f) is not None for f in ("rpm_limit", "tpm_limit", "max_parallel_requests"))

    def acquire(self, token: str, key: dict, request_id: str) -> Slot:
        """Admit the request or raise 429 with Retry-After; the Slot carries the headers."""
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
            raise GatewayError(429, f"Rate limit reached for this key: {what}; retry in {retry}s",
                               "rate_limit_error", headers={**headers, "Retry-After": str(retry)}, kind=verdict)
        return Slot(self, token, request_id, par_limit is not None, headers)

    def renew(self, slot: Slot) -> None:
        try:
            self.redis.zadd(self.names.parallel(slot.token), {slot.request_id: time.time() + self.lease}, xx=True)
        except REDIS_ERRORS:
            pass  # the lease runs out by itself; the stream is not interrupted for this

    def release(self, slot: Slot) -> None:
        """Give the parallel lease back; if Redis is unreachable the lease expires by itself."""
        try:
            self.redis.zrem(self.names.parallel(slot.token), slot.request_id)
        except REDIS_ERRORS:
            pass

    def charge_tokens_into(self, pipe, token: str, tokens: int, at: float) -> None:
        """Charge tokens to the window the request ended in (queued on an accounting pipeline)."""
        if tokens > 0:
            name = self.names.tpm(token, int(at // 60))
            pipe.incrby(name, tokens)
            pipe.expire(name, 120)
