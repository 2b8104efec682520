"""Budget alerts to a webhook: a durable outbox in Redis, a signed POST, retries with backoff.

Why an outbox: the settle path must never wait on (or fail with) a receiver, and a worker that
restarts must lose nothing. So a fired alert is only written to Redis (gateway/alerts/once.py,
in the same script that marks it fired), and each worker's deliverer sends it later.

The outbox is two keys in one hash slot (names: once.AlertNames):
- `events`, a hash: event id -> the exact JSON body; `<id>:n` -> claims so far; `<id>:at` ->
  when it was queued (Redis' clock);
- `due`, a sorted set: event id -> when a deliverer may take it next (Redis' clock).

Claim (why a sorted set, not BLMOVE or a stream): one script takes the first event whose time
has come and moves its time to now + lease. That single score is at once the retry schedule
(a failed attempt sets it to now + backoff) and the lease (a deliverer that dies mid-delivery
leaves it at now + lease, so another takes it after the lease). A list with BLMOVE needs a
second structure for leases and a reaper; a stream (XAUTOCLAIM) reclaims after one fixed idle
time, so per-event backoff would need re-adding entries, and MAXLEN trimming can drop entries
still pending. The claim counter `<id>:n` is the attempt number and a fencing token: a
deliverer whose lease ran out cannot acknowledge or reschedule the next holder's claim.
Times are Redis' (TIME), so the hosts' clocks do not matter.

Delivery is at-least-once: a deliverer that dies after the receiver answered, or a delivery
slower than the lease, means a second POST with the same `event_id` (receivers de-duplicate on
it). Two deliverers never take one event while its lease runs.

Retries: any non-2xx answer (redirects are not followed), a connection error or a timeout is
retried after backoff(n) = min(base × 2^(n-1), cap), jittered to between half and all of it,
until `max_attempts` claims or `max_age` since queued; then the event is dropped with one log
line (and the `count("dropped")` hook). A claim whose deliverer died counts as an attempt, so
an event that kills its deliverer cannot circulate forever.

Signature (as Stripe's and GitHub's; verify with `verify_signature`):
    X-Gateway-Timestamp: <unix seconds when this attempt was signed>
    X-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body bytes)>
The receiver recomputes it over the raw body exactly as received (before any JSON parsing),
compares in constant time, and refuses a timestamp more than 5 minutes from its clock (replay).
Each attempt is signed anew (new timestamp); the body is the same bytes on every attempt.

The URL (it may hold a token) and the secret never appear in a log line, an exception message or
Redis: failures are logged by HTTP status or exception class only, and urllib3's DEBUG line
naming each request's target names it "<webhook>".
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from gateway.alerts.thresholds import SOFT_BUDGET, Budget, Crossing
from gateway.core.redisconn import REDIS_ERRORS, incidents
from gateway.core.runtime import gevent_patched
from gateway.core.timefmt import iso
from gateway.usage.money import as_json
from gateway.usage.limits import ClusterScript

log = logging.getLogger("gateway")

SIGNATURE_HEADER = "X-Gateway-Signature"
TIMESTAMP_HEADER = "X-Gateway-Timestamp"
EVENT_ID_HEADER = "X-Gateway-Event-Id"
SIGNATURE_TOLERANCE = 300   # seconds a receiver should accept between the timestamp and its clock
MAX_ALIAS_CHARS = 256       # an alias is caller-chosen text: bounded in the body
DEFAULT_MAX_PENDING = 10_000  # events waiting in the outbox (~1 KB each: ~10 MB at most)

# Queue unless the marker exists; refuse when the outbox is full. KEYS: marker, events, due.
# ARGV: marker ttl (s), event id, body, max pending. -> "queued" | "sent" | "full"
_ENQUEUE_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'sent' end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return 'full' end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
local t = redis.call('TIME')
local now = string.format('%d.%06d', t[1], t[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3], ARGV[2] .. ':at', now, ARGV[2] .. ':n', 0)
redis.call('ZADD', KEYS[3], now, ARGV[2])
return 'queued'
"""

# Take the first due event for a lease. KEYS: events, due. ARGV: lease (s).
# -> {} or {id, body, attempt, queued at, now}
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.6f', now), 'LIMIT', 0, 1)
if #ids == 0 then return {} end
local id = ids[1]
local body = redis.call('HGET', KEYS[1], id)
if not body then redis.call('ZREM', KEYS[2], id) return {} end
redis.call('ZADD', KEYS[2], string.format('%.6f', now + tonumber(ARGV[1])), id)
local n = redis.call('HINCRBY', KEYS[1], id .. ':n', 1)
return {id, body, tostring(n), redis.call('HGET', KEYS[1], id .. ':at') or '0', string.format('%.6f', now)}
"""

# Remove an event (delivered or dropped) if the claim is still ours. KEYS: events, due. ARGV: id, attempt.
_FINISH = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':n') ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. ':n', ARGV[1] .. ':at')
return 1
"""

# Schedule the next attempt if the claim is still ours. KEYS: events, due. ARGV: id, attempt, delay (s).
_RETRY = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':n') ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], string.format('%.6f', due), ARGV[1])
return 1
"""


# -- the event ----------------------------------------------------------------------------------
def usd(amount: int | None) -> float | None:
    """Nano-dollars as a JSON number of dollars (money.as_json: 51_000_000 -> 0.051), None kept."""
    return None if amount is None else as_json(amount)


def event_id(budget: Budget, period: str, crossing: Crossing) -> str:
    """The same crossing always has the same id: a receiver's de-duplication key."""
    material = "\0".join((budget.scope, budget.id, period, crossing.threshold, str(crossing.amount)))
    return "evt_" + hashlib.sha256(material.encode()).hexdigest()[:32]


def event_body(budget: Budget, crossing: Crossing, spend: int, period: str, *, now: float,
               period_start: float | None = None, reset_at: float | None = None) -> dict:
    """LiteLLM's WebhookEvent fields (event, event_group, event_message, spend, max_budget,
    soft_budget, token, key_alias, team_id, team_alias), plus what it lacks: event_id,
    threshold, the budget period and a timestamp. Money in USD."""
    alias = budget.alias[:MAX_ALIAS_CHARS] if budget.alias else None
    is_key = budget.scope == "key"
    level = "soft_budget" if crossing.threshold == SOFT_BUDGET else f"{crossing.threshold} of max_budget"
    return {
        "event": crossing.event,
        "event_group": budget.scope,
        "event_message": f"{budget.scope.capitalize()} budget: {level} crossed",
        "event_id": event_id(budget, period, crossing),
        "threshold": crossing.threshold,
        "threshold_spend": usd(crossing.amount),
        "token": budget.id if is_key else None,
        "key_alias": alias if is_key else None,
        "team_id": budget.team_id if is_key else budget.id,
        "team_alias": None if is_key else alias,
        "spend": usd(spend),
        "max_budget": usd(budget.max_budget),
        "soft_budget": usd(budget.soft_budget),
        "budget_period": period,
        "budget_period_start": iso(period_start),
        "budget_reset_at": iso(reset_at),
        "timestamp": iso(now, "milliseconds"),
    }


def encode(body: dict) -> str:
    """The exact text stored, signed and sent (ASCII, so its bytes never depend on an encoder)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


# -- the signature ------------------------------------------------------------------------------
def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, str(int(timestamp)).encode() + b"." + body, hashlib.sha256).hexdigest()
    return "sha256=" + digest


def verify_signature(secret: bytes, body: bytes, timestamp: str | None, signature: str | None, *,
                     tolerance: float = SIGNATURE_TOLERANCE, now: float | None = None) -> bool:
    """What a receiver runs on the raw body and the two headers."""
    if not timestamp or not signature or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


# -- the outbox ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    event_id: str
    body: str
    attempt: int      # 1 for the first claim
    queued_at: float  # Redis' clock
    now: float        # Redis' clock at the claim

    @property
    def age(self) -> float:
        return max(self.now - self.queued_at, 0.0)


class Outbox:
    """The Redis side: queue once, claim for a lease, finish, reschedule."""

    def __init__(self, redis, names, max_pending: int = DEFAULT_MAX_PENDING):
        if max_pending < 1:
            raise ValueError("the outbox must hold at least one event")
        self.redis = redis
        self.names = names
        self.max_pending = max_pending
        self._enqueue = ClusterScript(redis, _ENQUEUE_ONCE)
        self._claim = ClusterScript(redis, _CLAIM)
        self._finish = ClusterScript(redis, _FINISH)
        self._retry = ClusterScript(redis, _RETRY)

    def enqueue_once(self, items: list[tuple[str, int, str, str]]) -> list[str]:
        """(marker, marker ttl, event id, body) each -> "queued", "sent" (marked before) or "full";
        one pipelined round trip. Raises REDIS_ERRORS."""
        pipe = self.redis.pipeline(transaction=False)
        for marker, ttl, event, body in items:
            self._enqueue.queue(pipe, [marker, self.names.events, self.names.due],
                                [int(ttl), event, body, self.max_pending])
        return [_text(reply) for reply in pipe.execute()]

    def claim(self, lease: float) -> Claim | None:
        reply = self._claim([self.names.events, self.names.due], [repr(float(lease))])
        if not reply:
            return None
        event, body, attempt, queued_at, now = (_text(part) for part in reply)
        return Claim(event, body, int(attempt), float(queued_at), float(now))

    def finish(self, claim: Claim) -> bool:
        """Remove the event; False when another deliverer claimed it since (our lease ran out)."""
        return bool(int(self._finish([self.names.events, self.names.due], [claim.event_id, str(claim.attempt)])))

    def retry(self, claim: Claim, delay: float) -> bool:
        keys = [self.names.events, self.names.due]
        return bool(int(self._retry(keys, [claim.event_id, str(claim.attempt), repr(float(delay))])))

    def pending(self) -> int:
        return int(self.redis.zcard(self.names.due))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the deliverer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 10        # claims per event (the first POST included)
    max_age: float = 86400.0      # seconds since queued after which an event is dropped
    backoff_base: float = 2.0     # seconds before the 2nd attempt; doubles each time
    backoff_cap: float = 600.0
    connect_timeout: float = 2.0
    read_timeout: float = 5.0     # per socket read, as requests applies it
    lease: float = 60.0           # a claim's lease: longer than one delivery can normally take
    poll_interval: float = 1.0    # how often an idle deliverer looks for due events

    def __post_init__(self):
        if not 1 <= self.max_attempts <= 100:
            raise ValueError("ALERT_WEBHOOK_MAX_ATTEMPTS must be 1 to 100")
        if not 0 < self.max_age <= 7 * 86400:
            raise ValueError("ALERT_WEBHOOK_MAX_AGE must be above 0 and at most 7 days")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("ALERT_WEBHOOK_BACKOFF_BASE must be above 0 and at most ALERT_WEBHOOK_BACKOFF_CAP")
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.poll_interval <= 0:
            raise ValueError("ALERT_WEBHOOK timeouts and the poll interval must be above 0")
        if self.lease <= 2 * (self.connect_timeout + self.read_timeout):
            # A live delivery must end well within its lease, or a second deliverer takes it too.
            raise ValueError("ALERT_WEBHOOK_LEASE must exceed twice the connect + read timeouts")

    def backoff(self, attempt: int, rand=random.random) -> float:
        """Seconds before the attempt after `attempt`: exponential, capped, jittered (half to full),
        so receivers coming back are not hit by every gateway at the same instant."""
        delay = min(self.backoff_base * 2 ** min(attempt - 1, 60), self.backoff_cap)
        return delay / 2 + rand() * delay / 2


def check_url(url: str) -> str:
    """An http(s) URL with a host, as requests will send it; the request target (path and query)
    is returned. The message never repeats the URL (it may hold a token)."""
    refused = ValueError("ALERT_WEBHOOK_URL must be an http:// or https:// URL with a host")
    try:
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise refused
        return requests.Request("POST", url).prepare().path_url
    except ValueError:  # urlsplit's and requests' own messages quote the URL
        raise refused from None


def build_session(trust_env: bool = False) -> requests.Session:
    """One per worker. trust_env off by default: a ~/.netrc must not add credentials to the POST,
    nor an environment proxy see it, unless the operator asks (ALERT_WEBHOOK_TRUST_ENV)."""
    session = requests.Session()
    session.trust_env = trust_env
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _HideWebhookTarget(logging.Filter):
    """urllib3 logs each request's target ("POST /services/T0/B0/XXXX?token=… HTTP/1.1") at DEBUG,
    and a webhook URL's secret part is often right there (Slack's are): those records name it
    "<webhook>" instead, should anyone turn DEBUG on for urllib3."""

    def __init__(self):
        super().__init__()
        self.targets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.targets and isinstance(record.args, tuple):
            record.args = tuple("<webhook>" if isinstance(arg, str) and arg in self.targets else arg
                                for arg in record.args)
        return True


_HIDE_TARGET = _HideWebhookTarget()


def _hide_from_urllib3_log(target: str) -> None:
    _HIDE_TARGET.targets.add(target)
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    if _HIDE_TARGET not in urllib3_log.filters:
        urllib3_log.addFilter(_HIDE_TARGET)


class Deliverer:
    """One per worker: takes due events from the outbox and POSTs them, signed."""

    def __init__(self, outbox: Outbox, url: str, secret: str | bytes, policy: DeliveryPolicy | None = None, *,
                 session: requests.Session | None = None, background: bool | None = None, count=None):
        self.outbox = outbox
        _hide_from_urllib3_log(check_url(url))
        self._url = url
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not self._secret:
            raise ValueError("ALERT_WEBHOOK_SECRET must be set when ALERT_WEBHOOK_URL is")
        self.policy = policy or DeliveryPolicy()
        self.session = session or build_session()
        self.background = gevent_patched() if background is None else background
        self.count = count or (lambda outcome, n=1: None)   # "delivered", "retried", "dropped"
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the URL or the secret
        return f"<Deliverer lease={self.policy.lease}s attempts={self.policy.max_attempts}>"

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop once (gevent workers, or background=True); else a no-op."""
        if self._started or not self.background:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
        # Under gevent's monkey-patching this thread is a greenlet.
        self._thread = threading.Thread(target=self._loop, name="budget-alert-deliverer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current delivery (tests; a worker exiting needs nothing: an
        interrupted claim is taken over by another deliverer after its lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.deliver_once() is not None
            except REDIS_ERRORS as exc:
                incidents.report(exc, "Budget alerts wait in Redis and are sent once it answers.")
                busy = False
            except Exception:  # the loop must live on; nothing here formats the URL or the secret
                log.exception("budget alert deliverer round failed")
                busy = False
            if not busy:
                self._stop.wait(self.policy.poll_interval)

    def deliver_once(self) -> str | None:
        """Take one due event and try it: "delivered", "retried", "dropped", or None when none is
        due. Raises REDIS_ERRORS."""
        claim = self.outbox.claim(self.policy.lease)
        if claim is None:
            return None
        if claim.attempt > self.policy.max_attempts or claim.age > self.policy.max_age:
            # Its deliverers died (each claim is an attempt), or it waited too long to matter.
            return self._drop(claim, "not attempted: attempts or age used up")
        failure = self._post(claim)
        if failure is None:
            self.outbox.finish(claim)
            self.count("delivered")
            return "delivered"
        delay = self.policy.backoff(claim.attempt)
        if claim.attempt >= self.policy.max_attempts or claim.age + delay > self.policy.max_age:
            return self._drop(claim, failure)
        self.outbox.retry(claim, delay)
        self.count("retried")
        return "retried"

    def _drop(self, claim: Claim, why: str) -> str:
        if self.outbox.finish(claim):
            log.warning("budget alert %s dropped after %d attempt(s) over %.0fs: %s", claim.event_id,
                        claim.attempt, claim.age, why)
            self.count("dropped")
        return "dropped"

    def _post(self, claim: Claim) -> str | None:
        """None on a 2xx answer, else why not: an HTTP status or an exception's class name only
        (requests' messages carry the URL)."""
        body = claim.body.encode()
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "vllm-gateway-budget-alerts/1",
                   TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(self._secret, timestamp, body),
                   EVENT_ID_HEADER: claim.event_id}
        try:
            with self.session.post(self._url, data=body, headers=headers, allow_redirects=False, stream=True,
                                   timeout=(self.policy.connect_timeout, self.policy.read_timeout)) as response:
                status = response.status_code  # the body is never read: a receiver cannot make us buffer it
        except Exception as exc:  # noqa: BLE001 - any failure to POST is a failed attempt, named by class
            return type(exc).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"
