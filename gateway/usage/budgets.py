"""Exact budgets across a fleet: reserve a request's cost at admission, settle it afterwards.

Checking `max_budget` against the spend authentication read (cached up to ~1 s per worker) and
charging after the response let 3 instances × 2 workers racing one key overshoot by 9–14%. Now,
once the body's fields are read, one Lua script on the key's slot checks the budget-period
spend and the live reservations of requests in flight, and reserves this request's estimate:

- a request that states its output bound (`max_tokens`, `max_completion_tokens` or
  `max_output_tokens`) is admitted only if its whole estimate fits: 400 budget_exceeded when it
  cannot fit even once the requests in flight settle, 429 (Retry-After: 1) while they hold the
  room it needs;
- a request without a bound reserves BUDGET_DEFAULT_MAX_TOKENS output tokens, or what remains of
  the budget when less does (so a key may spend to its last cent, as without reservations): it
  is refused (400) only when the budget is spent, 429 when every remaining cent is held.

So the spend never passes max_budget by more than what unbounded requests produce beyond their
reservation. The accounting flush settles each request: the real cost is added and the
reservation dropped in one script on the same slot (`SETTLE`), so spend + reservations never
counts a request twice or not at all.

The estimate (`request_estimate`): the prompt's estimated tokens × the model's input price, plus
the output bound (the largest given, times `n`; else BUDGET_DEFAULT_MAX_TOKENS) × its output
price. A model without a price costs nothing and reserves nothing.

Reservations are leases: members `n<nano-dollars>|<request>` of `hold:{token}` scored by their
expiry, renewed by this worker while the request runs (the limiter's LeaseRenewer), so a crashed
worker's reservation frees itself after the lease (PARALLEL_SLOT_LEASE_SECONDS, 120 s). Their sum
is kept in the spend hash (`reserved_nanos`) so admission reads one number, not every lease.

Every amount is integer nano-dollars (gateway/usage/money.py), so the checks are exact: no
tolerance for float noise, no room found in 5.6e-17 USD. The scripts fold spend the previous
version wrote as float dollars into the integer fields the first time they touch a key.

Settling is idempotent: each charge carries (worker, sequence number) and the script skips one at
or below the highest it applied for that worker on that key (`settled:{token}`), so a batch
retried after a Redis error whose reply was lost is not charged twice.
"""
from __future__ import annotations

import logging
import secrets
import time

from gateway.core.errors import GatewayError
from gateway.core.redisconn import REDIS_ERRORS, incidents, unavailable
from gateway.usage.limits import ClusterScript, LeaseRenewer
from gateway.usage.money import stored_nanos, to_nanos, usd_text
from gateway.usage.prices import cost
from gateway.usage.tap import estimate_prompt_tokens

log = logging.getLogger("gateway")

OUTPUT_BOUNDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# While the room is held by requests in flight, admission asks again after these pauses (0.35 s
# in all) before it answers 429: a request that just finished frees what it did not use.
HELD_PAUSES = (0.05, 0.1, 0.2, None)
MAX_CHOICES = 128  # `n` beyond this is vLLM's to refuse; the estimate does not grow past it
# How long a worker's settle high-water marks outlive its last charge on a key: a batch is
# retried within this (Redis back, or PENDING_MAX entries queued long before it runs out).
SETTLED_TTL = 86400


# Money in these scripts is integer nano-dollars (gateway/usage/money.py): `spend_nanos` (all
# time), `budget_spend_nanos` (the period's) and `reserved_nanos` in the spend hash, changed with
# HINCRBY or written whole (`int`). Lua numbers are doubles: every sum and comparison here is exact
# below 2^53 nano-dollars (9,007,199 USD), which bounds a key's budget-period spend, not its
# all-time spend (HINCRBY adds in int64 in Redis).
#
# The previous version kept float dollars under `spend`, `budget_spend` and `reserved` (with
# HINCRBYFLOAT, which HINCRBY refuses to add to), and named leases `<dollars>|<request>`. Every
# script folds those into the integer fields before it writes (`fold`): the float rounded to the
# nearest nano-dollar, the old field deleted; `reserved` is recounted from the leases themselves.
# New leases are named `n<nanos>|<request>`.
#
# Budget periods are "all", the number of whole budget_durations since the key was created, or
# "c<start>" for calendar-aligned resets (gateway/usage/periods.py); a stored period is replaced
# only by a newer one of its kind (or one of a different kind: the setting changed), so a late
# charge from a period already over never resets the current one.
_LUA_HELPERS = """
local function newer(period, stored)
  if not stored then return true end
  local calendar, was_calendar = period:sub(1, 1) == 'c', stored:sub(1, 1) == 'c'
  if calendar ~= was_calendar then return true end
  if calendar then period, stored = period:sub(2), stored:sub(2) end
  local a, b = tonumber(period), tonumber(stored)
  if a == nil or b == nil then return period ~= stored end
  return a > b
end
local function int(x) return string.format('%.0f', x) end
local function legacy(text) return math.floor((tonumber(text) or 0) * 1e9 + 0.5) end
local function amount(member)
  local nanos = string.match(member, '^n(%d+)|')
  if nanos then return tonumber(nanos) end
  return legacy(string.match(member, '^([^|]+)|'))
end
local function fold(spend, holds)
  local old = redis.call('HMGET', spend, 'spend', 'budget_spend', 'reserved')
  for i, name in ipairs({'spend_nanos', 'budget_spend_nanos'}) do
    if old[i] then redis.call('HINCRBY', spend, name, int(legacy(old[i]))) end
  end
  if old[3] then
    local held = 0
    for _, member in ipairs(redis.call('ZRANGE', holds, 0, -1)) do held = held + amount(member) end
    redis.call('HSET', spend, 'reserved_nanos', int(held))
  end
  if old[1] or old[2] or old[3] then redis.call('HDEL', spend, 'spend', 'budget_spend', 'reserved') end
end
local function nanos(spend, field) return tonumber(redis.call('HGET', spend, field) or '0') end
"""

# KEYS: spend, holds. ARGV: period, max_budget, estimate (nano-dollars), request, now, lease
# expiry, holds ttl, bounded ("1": the estimate is the request's own bound). Returns {verdict,
# period spend, reserved before this request, the lease member}; verdict 1 admitted, 0 over
# budget (400), 2 what remains is held by requests in flight (429: retry when they settle).
_RESERVE = _LUA_HELPERS + """
local spend, holds = KEYS[1], KEYS[2]
fold(spend, holds)
local stored = redis.call('HGET', spend, 'budget_period')
local spent = 0
if stored == ARGV[1] then
  spent = nanos(spend, 'budget_spend_nanos')
elseif newer(ARGV[1], stored) then
  redis.call('HSET', spend, 'budget_period', ARGV[1], 'budget_spend_nanos', 0)
else
  spent = nanos(spend, 'budget_spend_nanos')  -- our clock is behind
end
local reserved = nanos(spend, 'reserved_nanos')
local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', ARGV[5])
if #expired > 0 then  -- leases of crashed workers: their reservations end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', ARGV[5])
  for _, member in ipairs(expired) do reserved = reserved - amount(member) end
end
if reserved < 0 or redis.call('ZCARD', holds) == 0 then reserved = 0 end  -- a carried-over sum, no lease
redis.call('HSET', spend, 'reserved_nanos', int(reserved))
local max_budget, estimate = tonumber(ARGV[2]), tonumber(ARGV[3])
local bounded = ARGV[8] == '1'
if spent >= max_budget or (bounded and spent + estimate > max_budget) then
  return {0, int(spent), int(reserved), ''}
end
local room = max_budget - spent - reserved
if room <= 0 or (bounded and estimate > room) then
  return {2, int(spent), int(reserved), ''}
end
local take = math.min(estimate, room)  -- no bound given: what remains, up to the default
local member = 'n' .. int(take) .. '|' .. ARGV[4]
redis.call('ZADD', holds, ARGV[6], member)
redis.call('EXPIRE', holds, ARGV[7])
redis.call('HSET', spend, 'reserved_nanos', int(reserved + take))
return {1, int(spent), int(reserved), member}
"""

# KEYS: spend, holds. ARGV: the reservation's member, the same renamed to carry the real cost.
# A request that ended holds its real cost instead of its estimate until it is settled.
_ADJUST = _LUA_HELPERS + """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score then return 0 end
fold(KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[2], score, ARGV[2])
local reserved = nanos(KEYS[1], 'reserved_nanos') - amount(ARGV[1]) + amount(ARGV[2])
if reserved < 0 then reserved = 0 end
redis.call('HSET', KEYS[1], 'reserved_nanos', int(reserved))
return 1
"""

# KEYS: spend, holds, settled. ARGV: worker, sequence, period, requests, prompt tokens,
# completion tokens, cost (nano-dollars), settled ttl, last use (epoch), then the reservations
# to drop. `last_used` only moves forward: batches from several workers arrive in any order.
# Returns {1, the period's spend after this charge} when the charge counted in the current period
# (budget alerts: before = after - cost, exact whatever other workers settle), 1 when its period
# is over, 0 for a retry, or the successor's token.
_SETTLE = _LUA_HELPERS + """
local spend, holds, settled = KEYS[1], KEYS[2], KEYS[3]
local seq = tonumber(ARGV[2])
if tonumber(redis.call('HGET', settled, ARGV[1]) or '0') >= seq then return 0 end  -- a retry
redis.call('HSET', settled, ARGV[1], seq)
redis.call('EXPIRE', settled, ARGV[8])
local moved = redis.call('HGET', spend, 'moved_to')
if moved then  -- the key was regenerated: its reservations end here, its charge goes to the new key
  if #ARGV > 9 then redis.call('ZREM', holds, unpack(ARGV, 10)) end
  return moved
end
fold(spend, holds)
redis.call('HINCRBY', spend, 'requests', ARGV[4])
redis.call('HINCRBY', spend, 'prompt_tokens', ARGV[5])
redis.call('HINCRBY', spend, 'completion_tokens', ARGV[6])
redis.call('HINCRBY', spend, 'spend_nanos', ARGV[7])
local stored = redis.call('HGET', spend, 'budget_period')
if stored == ARGV[3] then
  redis.call('HINCRBY', spend, 'budget_spend_nanos', ARGV[7])
elseif newer(ARGV[3], stored) then
  redis.call('HSET', spend, 'budget_period', ARGV[3], 'budget_spend_nanos', ARGV[7])
  stored = ARGV[3]
end  -- else the request's period is over: all-time spend only
if tonumber(ARGV[9]) > tonumber(redis.call('HGET', spend, 'last_used') or '0') then
  redis.call('HSET', spend, 'last_used', ARGV[9])
end
if #ARGV > 9 then
  local freed = 0
  for i = 10, #ARGV do
    if redis.call('ZREM', holds, ARGV[i]) == 1 then freed = freed + amount(ARGV[i]) end
  end
  local reserved = nanos(spend, 'reserved_nanos') - freed
  if reserved < 0 or redis.call('ZCARD', holds) == 0 then reserved = 0 end
  redis.call('HSET', spend, 'reserved_nanos', int(reserved))
end
if stored == ARGV[3] then return {1, int(nanos(spend, 'budget_spend_nanos'))} end
return 1
"""


def _count(value) -> int | None:
    """A positive JSON integer, else None (a bool, a float, a string: not a bound vLLM takes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def output_bound(fields, default_max_tokens: int) -> int:
    """The most output tokens the request may produce: its bound × `n`, or the default."""
    bounds = [b for b in (_count(fields.get(name)) for name in OUTPUT_BOUNDS) if b is not None]
    choices = min(_count(fields.get("n")) or 1, MAX_CHOICES)
    return (max(bounds) if bounds else default_max_tokens) * choices


def request_estimate(prices: dict, fields, default_max_tokens: int = 0) -> int:
    """What the request is reserved at admission, in nano-dollars (see the module docstring)."""
    if not fields:
        return 0
    model = fields.get("model")
    if not isinstance(model, str) or model not in prices:
        return 0  # unpriced: it costs nothing, so it reserves nothing
    return cost(prices, model, estimate_prompt_tokens(fields), output_bound(fields, default_max_tokens))


def has_output_bound(fields) -> bool:
    return any(_count(fields.get(name)) is not None for name in OUTPUT_BOUNDS)


BUDGET_FIELDS = ("budget_period", "budget_spend_nanos", "budget_spend")  # what authentication reads


def budget_read(values) -> tuple:
    """(budget period, its spend in nano-dollars or None) from the BUDGET_FIELDS of a spend hash;
    the previous version's float `budget_spend` counts until a script folds it in."""
    period, spent, legacy = values
    return period, None if spent is None and legacy is None else stored_nanos(spent, legacy)


def budget_held(spent: int, max_budget: int, reserved: int) -> GatewayError:
    """What remains of the budget is reserved by requests still running: they may settle for
    less, so this is a retry-later, not an exceeded budget. Amounts in nano-dollars."""
    return GatewayError(429, f"Budget is held by requests in flight: spend {usd_text(spent)} + reserved "
                             f"{usd_text(reserved)} leaves no room under max_budget {usd_text(max_budget)}; "
                             "retry when they finish",
                        "rate_limit_error", headers={"Retry-After": "1"}, kind="budget_held")


class Hold:
    """One admitted request's reservation: which key, which lease member, how many nano-dollars."""

    __slots__ = ("token", "member", "amount")

    def __init__(self, token: str, member: str, amount: int):
        self.token = token
        self.member = member
        self.amount = amount

    def adjusted_name(self, actual: int) -> str:
        """The lease member once it holds the request's real cost (nano-dollars) instead of its estimate."""
        return f"n{actual}|{self.member.split('|', 1)[1]}"


def budget_exceeded(spent, max_budget, reserved=0, estimate=None) -> GatewayError:
    """The 400 every budget refusal answers. Amounts in dollars: the relay's header check passes
    the spend authentication read and the key record's max_budget."""
    return _exceeded(to_nanos(spent), to_nanos(max_budget), to_nanos(reserved),
                     None if estimate is None else to_nanos(estimate))


def _exceeded(spent: int, max_budget: int, reserved: int, estimate: int | None) -> GatewayError:
    """budget_exceeded in nano-dollars; the reservation's version names what did not fit."""
    if estimate is None:
        message = f"Budget has been exceeded: spend {usd_text(spent)} >= max_budget {usd_text(max_budget)}"
    else:
        message = (f"Budget has been exceeded: spend {usd_text(spent)} + reserved {usd_text(reserved)} + this "
                   f"request's estimate {usd_text(estimate)} > max_budget {usd_text(max_budget)}")
    return GatewayError(400, message, "budget_exceeded")


class Budgets:
    """Reservations at admission and the settle script the accounting flush runs; one per worker."""

    def __init__(self, client, names, prices: dict, lease_seconds: float, default_max_tokens: int = 0,
                 leases: LeaseRenewer | None = None):
        self.redis = client
        self.names = names
        self.prices = prices
        self.lease = lease_seconds
        self.default_max_tokens = default_max_tokens
        # The worker's lease renewer (the rate limiter's, when given): one greenlet and one round
        # trip renew a request's parallel slot and its budget hold together.
        self.leases = leases or LeaseRenewer(client, lease_seconds)
        self._reserve = ClusterScript(client, _RESERVE)
        self._settle = ClusterScript(client, _SETTLE)
        self._adjust = ClusterScript(client, _ADJUST)
        # Identifies this worker's charges for the idempotent settle (see the module docstring).
        self.worker = secrets.token_hex(6)
        self._sequence = 0

    def estimate(self, fields) -> int:
        return request_estimate(self.prices, fields, self.default_max_tokens)

    def reserve(self, token: str, key: dict, period: str, fields, request_id: str) -> Hold | None:
        """Reserve the request's estimate; raise 400 budget_exceeded when it cannot fit, 429
        when what remains is held by requests in flight (503 when Redis fails). None when there
        is nothing to hold: no max_budget, or a request that costs nothing."""
        if key.get("max_budget") is None:
            return None
        max_budget, estimate = to_nanos(key["max_budget"]), self.estimate(fields)
        if estimate <= 0:
            return None
        # The caller chooses X-Request-Id: the random part makes the member unique.
        request = f"{request_id}:{secrets.token_hex(4)}"
        now = time.time()
        keys = [self.names.key_spend(token), self.names.budget_holds(token)]
        bounded = "1" if has_output_bound(fields) else "0"
        for pause in HELD_PAUSES:
            try:
                verdict, spent, reserved, member = self._reserve(
                    keys, [period, max_budget, estimate, request, now, now + self.lease, int(self.lease) + 60,
                           bounded])
            except REDIS_ERRORS:
                # The reply may be what was lost, after the hold was taken: it runs out after the lease.
                raise unavailable() from None
            verdict = int(verdict)
            if verdict != 2 or pause is None:
                break
            # Held by requests in flight: one that just answered frees its room within moments.
            time.sleep(pause)
            now = time.time()
        if verdict == 0:
            raise _exceeded(int(spent), max_budget, int(reserved), estimate)
        if verdict == 2:
            raise budget_held(int(spent), max_budget, int(reserved))
        member = member.decode() if isinstance(member, bytes) else member
        self.leases.hold(keys[1], member)
        return Hold(token, member, int(member.split("|", 1)[0][1:]))

    def release_lease(self, hold: Hold | None) -> None:
        """The request ended: stop renewing its reservation (the settle drops it)."""
        if hold is not None:
            self.leases.drop(hold.member)

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def adjust_now(self, hold: Hold, actual: float) -> None:
        """The request ended: its reservation becomes its real cost (in dollars, as the relay
        passes it on) until the batch settles it (one round trip, in the request's own
        greenlet). Never raises: on a Redis error the estimate stays reserved until the settle
        (or the lease's end)."""
        actual = to_nanos(actual)
        member = hold.adjusted_name(actual)
        if member == hold.member:
            return  # already holds this cost (adjusted as the answer arrived)
        try:
            done = self._adjust([self.names.key_spend(hold.token), self.names.budget_holds(hold.token)],
                                [hold.member, member])
        except REDIS_ERRORS as exc:
            incidents.report(exc, "Budget reservations are settled with the next accounting batch.")
            return
        if int(done):  # a reply lost after the change leaves the old name: the settle drops either
            hold.member, hold.amount = member, actual

    def _settle_call(self, charge) -> tuple[list, list]:
        token = charge.token
        keys = [self.names.key_spend(token), self.names.budget_holds(token), self.names.budget_settled(token)]
        args = [self.worker, charge.sequence, charge.period, charge.requests, charge.prompt_tokens,
                charge.completion_tokens, charge.spend, SETTLED_TTL, repr(charge.last_used), *charge.holds]
        return keys, args

    def queue_settle(self, pipe, charge) -> None:
        """Queue on an accounting pipeline: add a key's charge and drop its reservations. The
        reply is [1, period spend after it] (applied in the current period), 1 (applied, its
        period over), 0 (a retry, applied before) or the token of the key's successor when the
        key was regenerated meanwhile: the caller charges that one instead."""
        self._settle.queue(pipe, *self._settle_call(charge))
