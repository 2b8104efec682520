"""After each /vllm request: per-key and per-end-user counters, budgets, the spend log.

Entries are written after the response went out. On a gevent worker a background greenlet
writes them in batches, one pipelined round trip per batch, at most FLUSH_INTERVAL after the
request ended (budgets and token windows therefore lag by that much). Elsewhere (tests, the
Flask dev server) each entry is written at once. If Redis is down, entries stay queued (up to
PENDING_MAX) and go out with the next successful batch, so a short outage loses nothing; the
queue is also flushed when the worker exits.

Each key's charge of a batch (counters, budget-period spend) is one script call that also drops
the budget reservations of the batch's requests on that key (gateway/usage/budgets.py): queued
as EVAL, so the batch stays one pipelined round trip on a single node and on a Redis Cluster
(whose pipelines refuse EVALSHA). A batch Redis failed is retried with the same charges, which
the script applies at most once, so a lost reply never charges a request twice.

A parallel-request lease is the exception: it is released at once, in the request's own
greenlet, so a client's next request never finds its previous slot still taken; a release (or
refund) Redis refused is queued by the limiter and written with the next batch here.

Money is integer nano-dollars here (gateway/usage/money.py). The relay hands each request's
cost over in dollars, as a float `cost` made from nano-dollars (it also feeds the Prometheus
counter); `to_nanos` gives the exact amount back, so charges add up exactly.

A request on a key of a team is charged to the team too: a second charge per batch on the team's
subject (`team:<id>`), settled by the same script on the team's spend hash, with the team's budget
reservation (gateway/teams/admission.py). With budget alerts on, each settle's reply (the period's
spend after the charge) goes to the alert gate (gateway/usage/budgetalerts.py).

The spend log and end-user stats are written and read by gateway/usage/spendlog.py.
"""
from __future__ import annotations

import atexit
import collections
import logging
import time

from gateway.core.redisconn import REDIS_ERRORS, incidents
from gateway.core.timefmt import iso
from gateway.core.runtime import gevent_patched
from gateway.usage import periods
from gateway.usage.budgetalerts import fire_for_settled
from gateway.usage.budgets import BUDGET_FIELDS, Budgets, budget_read
from gateway.usage import modellimits
from gateway.usage.money import as_json, stored_nanos, to_nanos
from gateway.usage.prices import cost
from gateway.usage.spendlog import SpendLog

log = logging.getLogger("gateway")

PENDING_MAX = 10_000
FLUSH_INTERVAL = 0.05
BATCH_MAX = 500


def budget_period(key: dict, now: float) -> str:
    """Which budget period `now` falls in, for a key or team record: 'all' without
    budget_duration; otherwise as BUDGET_RESETS cuts them (gateway/usage/periods.py)."""
    return periods.calendar().bounds(key, now)[0]


def budget_reset_at(key: dict, now: float) -> str | None:
    """When the period `now` falls in ends (ISO), None without budget_duration."""
    reset = periods.calendar().bounds(key, now)[2]
    return None if reset is None else iso(reset)


def current_budget_spend(key: dict, budget: tuple, now: float) -> float:
    """Spend in the current budget period, in dollars, from what authentication read ((period,
    nano-dollars)): the JSON number /key/info shows, and what the relay's header check compares
    with the record's max_budget (both doubles nearest exact amounts, so the order holds)."""
    period, spent = budget
    if period != budget_period(key, now) or spent is None:
        return 0.0
    return as_json(spent)


class Charge:
    """What a batch adds to one key in one budget period, and the reservations it settles."""

    __slots__ = ("token", "period", "sequence", "requests", "prompt_tokens", "completion_tokens", "spend", "holds",
                 "last_used", "owner")

    def __init__(self, token: str, period: str, sequence: int, owner: dict | None = None):
        self.token, self.period, self.sequence = token, period, sequence
        self.owner = owner  # the key or team record, for budget alerts (None: no alerts)
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.spend = 0  # nano-dollars
        self.holds: list[str] = []
        self.last_used = 0.0  # when the batch's latest request ended (epoch seconds)

    def add(self, entry: dict, hold) -> None:
        self.requests += 1
        self.prompt_tokens += entry["prompt_tokens"]
        self.completion_tokens += entry["completion_tokens"]
        spend = to_nanos(entry["spend"])
        self.spend += spend
        self.last_used = max(self.last_used, entry.get("end_time") or 0.0)
        if hold is not None:
            # Its name as adjusted to the real cost too: a reply lost after the adjustment left
            # the Hold with the old name (ZREM of a name that is not there does nothing).
            self.holds.extend({hold.member, hold.adjusted_name(spend)})


class Accounting:
    def __init__(self, client, names, prices: dict, spend_log_max: int, limiter=None, background=None,
                 end_user_ttl: float = 30 * 86400, budgets: Budgets | None = None, log_limits=None):
        self.redis = client
        self.names = names
        self.prices = prices
        self.log = SpendLog(client, names, spend_log_max, end_user_ttl, limits=log_limits)
        self.limiter = limiter
        if limiter is not None:
            limiter.on_deferred = self._wake_up
        if budgets is None:
            lease, leases = (limiter.leases.lease, limiter.leases) if limiter is not None else (120.0, None)
            budgets = Budgets(client, names, prices, lease, leases=leases)
        self.budgets = budgets
        # (entry, key, budget hold, already in `unsettled`): a batch Redis refused comes back
        # here marked, so its charge is retried from `unsettled` (same sequence numbers) only.
        self.pending: collections.deque = collections.deque(maxlen=PENDING_MAX)
        self.unsettled: list[Charge] = []
        self.background = gevent_patched() if background is None else background
        self._wake = None
        self.alerts = None  # the budget-alert gate (gateway/alerts/once.py OnceGate), set by app.py when on

    def cost(self, model, prompt_tokens, completion_tokens, cached_tokens=0) -> float:
        """A request's cost in dollars, as the relay passes it on: a float that carries its exact
        nano-dollars (gateway/usage/money.py)."""
        return as_json(cost(self.prices, model, prompt_tokens, completion_tokens, cached_tokens))

    def usage_cost(self, usage) -> float:
        """`cost` of what a response used (gateway/usage/tap.py Usage), its cached prompt tokens
        at the cached price."""
        return self.cost(usage.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def record(self, entry: dict, key: dict | None, slot=None, hold=None, team=None) -> None:
        """Queue one finished request; never raises (the response is already gone). `team` is
        what the request holds of its key's team (gateway/teams/admission.py TeamShare)."""
        for held_slot, held in ((slot, hold), (team.slot, team.hold) if team is not None else (None, None)):
            if held_slot is not None:
                self.limiter.release(held_slot)  # never raises: a failed release is queued for flush()
            self.budgets.release_lease(held)
            if held is not None:
                # The next request must see this one's real cost, not its estimate, at once (else it
                # could find the room still held and get a 429 until the batch settles). Never raises.
                self.budgets.adjust_now(held, entry["spend"])
        self.pending.append((entry, key, hold, False, team))
        self._wake_up()

    def _wake_up(self) -> None:
        """Write what is queued: now (no gevent) or soon, from the background flusher."""
        if not self.background:
            self.flush()
            return
        if self._wake is None:
            self._start_flusher()
        self._wake.set()

    def _start_flusher(self) -> None:
        import gevent
        from gevent.event import Event

        self._wake = Event()
        gevent.spawn(self._flush_loop)
        atexit.register(self.flush)

    def _flush_loop(self) -> None:
        import gevent

        while True:
            if not self.pending and not self.unsettled and not self._deferred_undos():
                self._wake.wait()
                self._wake.clear()
            if len(self.pending) < BATCH_MAX:
                gevent.sleep(FLUSH_INTERVAL)  # let a batch gather
            if not self.flush():
                gevent.sleep(1.0)  # Redis is down: retry on our own, traffic or not

    def flush(self) -> bool:
        """Write everything queued in one pipeline; on a Redis outage keep it queued."""
        # Take the entries out first: another greenlet may queue more while this one waits on I/O.
        batch = []
        while self.pending:
            batch.append(self.pending.popleft())
        # Charges of a failed batch go first: a key's charges must reach Redis in sequence order.
        charges, self.unsettled = self.unsettled, []
        if not batch and not charges and not self._deferred_undos():
            return True
        undos = []
        try:
            pipe = self.redis.pipeline(transaction=False)
            if self.limiter is not None:
                undos = self.limiter.take_deferred(pipe)
            logged = []
            new_charges: dict = {}
            for entry, key, hold, charged, team in batch:
                try:
                    self._queue(pipe, entry, key, hold, None if charged else new_charges)
                    if team is not None:
                        self._queue_team(pipe, entry, team, None if charged else new_charges)
                    logged.append(entry)
                except Exception:  # one malformed entry must not cost the whole batch
                    log.exception("accounting skipped request %s", entry.get("request_id"))
            # One script call per key and budget period in a batch, not one per request.
            charges.extend(new_charges.values())
            first_settle = len(pipe)
            for charge in charges:
                self.budgets.queue_settle(pipe, charge)
            self.log.queue_batch(pipe, logged)
            replies = pipe.execute()
            self._forward_moved(charges, replies[first_settle:first_settle + len(charges)])
            if self.alerts is not None:
                fire_for_settled(self.alerts, charges, replies[first_settle:first_settle + len(charges)])
        except REDIS_ERRORS as exc:
            self.unsettled = charges
            self.pending.extendleft(reversed([(entry, key, hold, True, team)
                                              for entry, key, hold, _, team in batch]))
            if undos:
                self.limiter.put_back(undos)
            incidents.report(exc, f"Accounting is queued ({len(self.pending)} requests) and written "
                                  "once it answers.")
            return False
        except Exception:  # a bug (WRONGTYPE, a script error): retrying would fail forever
            log.exception("accounting failed for a batch of %d requests", len(batch))
        incidents.answered()
        return True

    def _forward_moved(self, charges: list, replies: list) -> None:
        """Charges that reached a key regenerated meanwhile (requests admitted under the old
        token, settled after the swap) go to its successor with the next batch."""
        for charge, reply in zip(charges, replies):
            successor = reply.decode() if isinstance(reply, bytes) else reply
            if isinstance(successor, str) and successor:
                moved = Charge(successor, charge.period, self.budgets.next_sequence())
                moved.requests, moved.spend = charge.requests, charge.spend
                moved.prompt_tokens, moved.completion_tokens = charge.prompt_tokens, charge.completion_tokens
                moved.last_used = charge.last_used
                self.unsettled.append(moved)
        if self.unsettled:
            self._wake_up()

    def _deferred_undos(self) -> bool:
        return self.limiter is not None and bool(self.limiter.deferred)

    def _queue(self, pipe, entry: dict, key: dict | None, hold, charges: dict | None) -> None:
        """Add the entry to its key's charge (None: already charged) and queue its token count."""
        token = entry.get("token")
        if not token or key is None:
            return
        if charges is not None:
            period = budget_period(key, entry["start_time"])
            charge = charges.get((token, period))
            if charge is None:
                charge = charges[(token, period)] = Charge(token, period, self.budgets.next_sequence(), key)
            charge.add(entry, hold)
        if self.limiter is not None and key.get("tpm_limit") is not None:
            tokens = entry["prompt_tokens"] + entry["completion_tokens"]
            self.limiter.charge_tokens_into(pipe, token, tokens, entry["end_time"])
        modellimits.queue_usage(pipe, self.names, entry, key)  # per-model tpm and spend (model limits)

    def _queue_team(self, pipe, entry: dict, team, charges: dict | None) -> None:
        """The team's share of the entry: its charge (settled by the same script as a key's, on
        the team's spend hash) and its token window."""
        record = team.team
        if charges is not None:
            period = budget_period(record, entry["start_time"])
            charge = charges.get((team.subject, period))
            if charge is None:
                charge = charges[(team.subject, period)] = Charge(team.subject, period, self.budgets.next_sequence(),
                                                                  record)
            charge.add(entry, team.hold)
        if self.limiter is not None and record.get("tpm_limit") is not None:
            tokens = entry["prompt_tokens"] + entry["completion_tokens"]
            self.limiter.charge_tokens_into(pipe, team.subject, tokens, entry["end_time"])

    # -- reading --------------------------------------------------------------------------
    def key_totals(self, token: str, key: dict) -> dict:
        return self._totals(key, self.redis.hgetall(self.names.key_spend(token)))

    def keys_totals(self, records: list[dict]) -> list[dict]:
        """key_totals of many keys in one round trip (a page of /key/list)."""
        pipe = self.redis.pipeline(transaction=False)  # one slot per key: fine on a cluster
        for record in records:
            pipe.hgetall(self.names.key_spend(record["token"]))
        return [self._totals(record, raw) for record, raw in zip(records, pipe.execute())]

    @staticmethod
    def _totals(key: dict, raw: dict) -> dict:
        now = time.time()
        prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
        budget = budget_read([raw.get(name) for name in BUDGET_FIELDS])
        return {
            "spend": current_budget_spend(key, budget, now),
            "total_spend": as_json(stored_nanos(raw.get("spend_nanos"), raw.get("spend"))),
            "requests": int(raw.get("requests", 0)),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "budget_reset_at": budget_reset_at(key, now),
            "last_used_at": iso(float(raw["last_used"])) if raw.get("last_used") else None,
        }

