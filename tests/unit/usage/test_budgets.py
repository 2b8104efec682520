"""gateway.usage.budgets: the estimate rule, the reserve and settle scripts (on fakeredis and the
real Redis), leases that free a crashed worker's reservation, and settling exactly once. Amounts
in Redis are integer nano-dollars (`reserved_nanos`, `budget_spend_nanos`, `spend_nanos`)."""
import time

import pytest
import redis
from redis.cluster import key_slot

from gateway.core.errors import GatewayError
from gateway.core.redisnames import RedisNames
from gateway.usage import periods
from gateway.usage.accounting import Accounting, budget_period
from gateway.usage.budgets import Budgets, output_bound, request_estimate
from gateway.usage.limits import RateLimiter
from gateway.usage.prices import parse_prices

TOKEN = "b" * 64
PRICES = parse_prices('{"m": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}}', "test")
MILLI = 1_000_000  # nano-dollars in 0.001 USD
KEY = {"max_budget": 0.1, "created_epoch": 0}
# "abcdefgh" is 2 prompt tokens (4 characters a token): 0.002, plus max_tokens × 0.002.
BOUNDED = {"model": "m", "prompt": "abcdefgh", "max_tokens": 10}  # estimate 0.022


# -- the estimate -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, milli", [
    (BOUNDED, 2 + 10 * 2),
    ({**BOUNDED, "max_completion_tokens": 20}, 2 + 20 * 2),   # the largest bound
    ({**BOUNDED, "n": 3}, 2 + 30 * 2),                         # every choice
    ({"model": "m", "prompt": "abcdefgh", "max_output_tokens": 5}, 2 + 5 * 2),  # Responses API
    ({"model": "m", "prompt": "abcdefgh"}, 2 + 7 * 2),         # no bound: the default (7)
    ({"model": "m", "prompt": "abcdefgh", "max_tokens": True}, 2 + 7 * 2),  # not a bound
    ({"model": "m", "prompt": "abcdefgh", "max_tokens": -5}, 2 + 7 * 2),
    ({"model": "unpriced", "prompt": "abcdefgh", "max_tokens": 10}, 0),  # costs nothing
    ({"model": ["m"], "max_tokens": 10}, 0),
    (None, 0),
    ({}, 0),
])
def test_the_estimate_is_the_prompt_plus_the_output_bound_at_the_models_prices(fields, milli):
    assert request_estimate(PRICES, fields, default_max_tokens=7) == milli * MILLI


def test_chat_messages_count_their_template_overhead():
    fields = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 1}
    assert request_estimate(PRICES, fields) == (8 + 2) * MILLI  # (13 + 16) / 4 -> 8 prompt tokens
    assert output_bound({"n": 10**9, "max_tokens": 2}, 0) == 2 * 128


# -- reserve and settle -----------------------------------------------------------------------
@pytest.fixture
def budgets(redis_client):
    return Budgets(redis_client, RedisNames(redis_client.test_prefix), PRICES, lease_seconds=120)


@pytest.fixture
def accounting(redis_client, budgets):
    return Accounting(redis_client, budgets.names, PRICES, 1000, background=False, budgets=budgets)


def spend_hash(budgets):
    return budgets.redis.hgetall(budgets.names.key_spend(TOKEN))


def nanos(budgets, field: str) -> int:
    """An integer field of the key's spend hash (0 when absent); a float there fails the test."""
    return int(spend_hash(budgets).get(field, "0"))


def finished(spend, prompt=2, completion=10, request_id="r"):
    now = time.time()
    return {"request_id": request_id, "token": TOKEN, "key_alias": None, "caller": "k", "end_user": None,
            "model": "m", "route": "/v1/completions", "method": "POST", "status": 200, "upstream_status": 200,
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "spend": spend, "start_time": now, "end_time": now, "ttfb_ms": 1.0, "duration_ms": 2.0,
            "stream": False, "estimated": False, "error": None}


def test_reservations_count_until_the_budget_cannot_hold_another(budgets):
    holds = [budgets.reserve(TOKEN, KEY, "all", BOUNDED, f"r{i}") for i in range(4)]  # 4 × 0.022 = 0.088
    assert nanos(budgets, "reserved_nanos") == 88 * MILLI
    with pytest.raises(GatewayError) as held:  # the room it needs is held by requests in flight
        budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r5")
    assert held.value.status == 429 and held.value.headers["Retry-After"] == "1"
    assert "reserved 0.088000" in held.value.message
    with pytest.raises(GatewayError) as refused:  # could not fit even once they settle
        budgets.reserve(TOKEN, KEY, "all", {**BOUNDED, "max_tokens": 60}, "r6")
    assert refused.value.status == 400 and refused.value.type == "budget_exceeded"
    assert "estimate 0.122000" in refused.value.message
    assert budgets.redis.zcard(budgets.names.budget_holds(TOKEN)) == 4
    assert all(h is not None for h in holds)


def test_a_request_without_a_bound_gets_what_remains_up_to_the_default(redis_client):
    budgets = Budgets(redis_client, RedisNames(redis_client.test_prefix), PRICES, lease_seconds=120,
                      default_max_tokens=20)  # estimate 0.002 + 20 × 0.002 = 0.042
    unbounded = {"model": "m", "prompt": "abcdefgh"}
    first, second = (budgets.reserve(TOKEN, KEY, "all", unbounded, f"u{i}") for i in range(2))
    third = budgets.reserve(TOKEN, KEY, "all", unbounded, "u2")  # 0.1 - 0.084: the last 0.016
    assert (first.amount, second.amount, third.amount) == (42 * MILLI, 42 * MILLI, 16 * MILLI)
    with pytest.raises(GatewayError) as held:
        budgets.reserve(TOKEN, KEY, "all", unbounded, "u3")
    assert held.value.status == 429
    assert nanos(budgets, "reserved_nanos") == 100 * MILLI


def test_nothing_is_reserved_without_a_budget_or_a_cost(budgets):
    assert budgets.reserve(TOKEN, {"created_epoch": 0}, "all", BOUNDED, "r") is None
    assert budgets.reserve(TOKEN, KEY, "all", {"model": "free", "max_tokens": 5}, "r") is None
    assert not budgets.redis.exists(budgets.names.budget_holds(TOKEN))


def test_settling_adds_the_real_cost_and_gives_the_reservation_back(budgets, accounting):
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r")
    accounting.record(finished(0.012), KEY, hold=hold)
    stored = spend_hash(budgets)
    assert stored["budget_spend_nanos"] == stored["spend_nanos"] == str(12 * MILLI)
    assert stored["reserved_nanos"] == "0" and stored["requests"] == "1"
    assert not {"spend", "budget_spend", "reserved"} & stored.keys()  # no float field any more
    assert budgets.redis.zcard(budgets.names.budget_holds(TOKEN)) == 0
    assert hold.member not in budgets.leases.held  # no longer renewed
    # 0.012 spent + 4 × 0.022 reserved = 0.1: exactly the budget
    for i in range(4):
        budgets.reserve(TOKEN, KEY, "all", BOUNDED, f"again-{i}")
    with pytest.raises(GatewayError):
        budgets.reserve(TOKEN, KEY, "all", {**BOUNDED, "max_tokens": 1}, "over")


def test_a_failed_request_settles_at_zero_and_frees_its_reservation(budgets, accounting):
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r")
    accounting.record(finished(0.0, 0, 0), KEY, hold=hold)
    assert spend_hash(budgets)["budget_spend_nanos"] == spend_hash(budgets)["reserved_nanos"] == "0"


def test_a_crashed_workers_reservation_runs_out_after_its_lease(redis_client):
    names = RedisNames(redis_client.test_prefix)
    crashed = Budgets(redis_client, names, PRICES, lease_seconds=1.0)  # longer than admission waits on held room
    for i in range(4):
        crashed.reserve(TOKEN, KEY, "all", BOUNDED, f"r{i}")
    crashed.leases.held.clear()  # the worker is gone: nothing renews its leases
    alive = Budgets(redis_client, names, PRICES, lease_seconds=120)
    with pytest.raises(GatewayError):
        alive.reserve(TOKEN, KEY, "all", BOUNDED, "now")
    time.sleep(1.05)  # the lease's own length: the thing under test is that it runs out
    assert alive.reserve(TOKEN, KEY, "all", BOUNDED, "later") is not None
    assert redis_client.hget(names.key_spend(TOKEN), "reserved_nanos") == str(22 * MILLI)
    assert redis_client.zcard(names.budget_holds(TOKEN)) == 1


def test_a_running_request_keeps_its_reservation_past_the_lease(redis_client):
    # Leases of 1 s renewed every 0.25 s: a renewal may be 0.75 s late (a loaded 2-core machine)
    # before the test would see the reservation lapse.
    budgets = Budgets(redis_client, RedisNames(redis_client.test_prefix), PRICES, lease_seconds=1.0)
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "long")
    deadline = time.monotonic() + 3.0  # three leases long
    while time.monotonic() < deadline:
        assert redis_client.zscore(budgets.names.budget_holds(TOKEN), hold.member) > time.time()
        time.sleep(0.1)
    budgets.release_lease(hold)


def test_a_new_budget_period_starts_at_zero_and_a_late_charge_never_resets_it(budgets, accounting):
    key = {**KEY, "budget_duration": "1h"}
    accounting.record(finished(0.09), key)  # period "0" (created_epoch 0 ... now) — spent
    old = spend_hash(budgets)["budget_period"]
    with pytest.raises(GatewayError):
        budgets.reserve(TOKEN, key, old, BOUNDED, "same period")
    new = str(int(old) + 1)
    hold = budgets.reserve(TOKEN, key, new, BOUNDED, "next period")  # reset at admission
    assert spend_hash(budgets)["budget_period"] == new and nanos(budgets, "budget_spend_nanos") == 0
    late = finished(0.05)  # a request of the old period, settled after the reset
    accounting.record(late, key)
    assert spend_hash(budgets)["budget_period"] == new and nanos(budgets, "budget_spend_nanos") == 0
    assert nanos(budgets, "spend_nanos") == 140 * MILLI  # all-time spend has it
    accounting.record(finished(0.01), {**key, "created_epoch": -3600}, hold=hold)  # now in the new period
    assert nanos(budgets, "budget_spend_nanos") == 10 * MILLI


def test_a_batch_whose_reply_was_lost_is_not_charged_twice(budgets, accounting, monkeypatch):
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r")
    pipeline_class = type(accounting.redis.pipeline())
    real_execute = pipeline_class.execute

    def applied_then_lost(self, *args, **kwargs):
        real_execute(self, *args, **kwargs)
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(pipeline_class, "execute", applied_then_lost)
    accounting.record(finished(0.012), KEY, hold=hold)
    assert accounting.unsettled and len(accounting.pending) == 1  # kept for the retry
    accounting.record(finished(0.004, request_id="second"), KEY)  # queued behind it, fails too
    monkeypatch.setattr(pipeline_class, "execute", real_execute)
    assert accounting.flush()
    stored = spend_hash(budgets)
    assert stored["budget_spend_nanos"] == str(16 * MILLI) and stored["requests"] == "2"
    assert stored["reserved_nanos"] == "0" and not accounting.unsettled and not accounting.pending


def test_an_outage_keeps_the_charge_and_the_reservation_until_redis_answers(budgets, accounting, monkeypatch):
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r")
    pipeline_class = type(accounting.redis.pipeline())
    real_execute = pipeline_class.execute

    def refused(self, *args, **kwargs):
        raise redis.exceptions.ConnectionError("Error 111 connecting. Connection refused.")

    monkeypatch.setattr(pipeline_class, "execute", refused)
    accounting.record(finished(0.012), KEY, hold=hold)
    assert nanos(budgets, "reserved_nanos") == 12 * MILLI  # held, at its real cost
    monkeypatch.setattr(pipeline_class, "execute", real_execute)
    assert accounting.flush()
    assert nanos(budgets, "budget_spend_nanos") == 12 * MILLI
    assert nanos(budgets, "reserved_nanos") == 0


# -- Redis Cluster rules ----------------------------------------------------------------------
def test_every_script_touches_one_slot(budgets):
    names = budgets.names
    limiter = RateLimiter(budgets.redis, names, 120)
    groups = [
        [names.key_spend(TOKEN), names.budget_holds(TOKEN)],                                  # reserve
        [names.key_spend(TOKEN), names.budget_holds(TOKEN), names.budget_settled(TOKEN)],     # settle
        [names.rpm(TOKEN, 1), names.tpm(TOKEN, 1), names.parallel(TOKEN)],                  # acquire
    ]
    for keys in groups:
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    assert limiter.names is names


class NoEvalshaPipeline:
    """Stands in for redis-py's ClusterPipeline rule: EVALSHA refused, everything else passed on."""

    def __init__(self, pipe):
        self._pipe = pipe

    def evalsha(self, *args, **kwargs):
        raise redis.exceptions.RedisClusterException("EVALSHA is blocked in cluster pipelines")

    def execute_command(self, *args, **kwargs):
        if str(args[0]).upper() == "EVALSHA":
            self.evalsha()
        return self._pipe.execute_command(*args, **kwargs)

    def __len__(self):
        return len(self._pipe)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def test_the_flush_queues_no_evalsha_on_its_pipeline(budgets, monkeypatch):
    client = budgets.redis
    limiter = RateLimiter(client, budgets.names, 120)
    accounting = Accounting(client, budgets.names, PRICES, 1000, limiter, background=False, budgets=budgets)
    real_pipeline = client.pipeline
    monkeypatch.setattr(client, "pipeline", lambda *a, **k: NoEvalshaPipeline(real_pipeline(*a, **k)))
    slot = limiter.acquire(TOKEN, {"rpm_limit": 5, "max_parallel_requests": 2}, "r")
    limiter._defer(slot)  # a refund queued for the flush (it runs the refund script on the pipeline)
    hold = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "r")
    accounting.record(finished(0.012), KEY, hold=hold)
    assert not accounting.pending and not accounting.unsettled and not limiter.deferred
    assert nanos(budgets, "budget_spend_nanos") == 12 * MILLI


def test_a_charge_settled_after_its_key_was_regenerated_reaches_the_new_key(redis_client, budgets, accounting):
    from gateway.keys.store import KeyStore

    store = KeyStore(redis_client, budgets.names, cache=False)
    old = store.generate({"max_budget": 1.0}, caller="master")
    accounting.record({**finished(0.01), "token": old["token"]}, KEY)
    hold = budgets.reserve(old["token"], KEY, "all", BOUNDED, "in-flight")  # admitted before the swap
    new = store.regenerate(old, None, caller="master")
    assert redis_client.hget(budgets.names.key_spend(new["token"]), "spend_nanos") == str(10 * MILLI)
    accounting.record({**finished(0.02), "token": old["token"]}, KEY, hold=hold)  # settles after it
    moved = redis_client.hgetall(budgets.names.key_spend(new["token"]))
    assert moved["spend_nanos"] == str(30 * MILLI) and moved["requests"] == "2"
    assert redis_client.zcard(budgets.names.budget_holds(old["token"])) == 0


def test_an_ended_request_holds_its_real_cost_until_it_is_settled(budgets, accounting, monkeypatch):
    """Between a request's end and its batch, the next request must see the real cost, not the
    estimate (else, near the end of a budget, it would get a 429 until the batch runs)."""
    first = budgets.reserve(TOKEN, KEY, "all", BOUNDED, "first")
    monkeypatch.setattr(accounting, "_wake_up", lambda: None)  # the batch has not run yet
    accounting.record(finished(0.005), KEY, hold=first)
    assert nanos(budgets, "reserved_nanos") == 5 * MILLI
    assert [budgets.reserve(TOKEN, KEY, "all", BOUNDED, f"next-{i}") for i in range(4)]  # 0.005 + 4 × 0.022
    monkeypatch.undo()
    assert accounting.flush()
    assert nanos(budgets, "budget_spend_nanos") == 5 * MILLI
    assert nanos(budgets, "reserved_nanos") == 4 * 22 * MILLI


def test_float_noise_of_the_previous_version_is_not_room_left(budgets):
    """0.5 - 0.494 - 0.006 is 5.6e-17 in floating point. Spend the previous version wrote as
    floats is folded into nano-dollars first: exactly no room, so no request is admitted."""
    names, key = budgets.names, {"max_budget": 0.5, "created_epoch": 0}
    budgets.redis.hset(names.key_spend(TOKEN), mapping={"budget_period": "all", "budget_spend": "0.494",
                                                        "reserved": "0.006"})
    budgets.redis.zadd(names.budget_holds(TOKEN), {"0.006|in-flight": time.time() + 60})
    with pytest.raises(GatewayError) as held:
        budgets.reserve(TOKEN, key, "all", {"model": "m", "prompt": "abcdefgh"}, "noise")
    assert held.value.status == 429
    assert "spend 0.494000 + reserved 0.006000" in held.value.message
    assert nanos(budgets, "budget_spend_nanos") == 494 * MILLI and nanos(budgets, "reserved_nanos") == 6 * MILLI


@pytest.fixture
def calendar_resets():
    periods.configure("calendar", "UTC")
    yield
    periods.configure("creation", "UTC")


def test_calendar_periods_replace_each_other_in_order_and_a_change_of_setting_starts_afresh(
        budgets, accounting, calendar_resets):
    key = {**KEY, "budget_duration": "1h"}
    accounting.record(finished(0.09), key)
    old = spend_hash(budgets)["budget_period"]
    assert old == budget_period(key, time.time()) and old.startswith("c")
    with pytest.raises(GatewayError):
        budgets.reserve(TOKEN, key, old, BOUNDED, "same hour")
    new = "c%d" % (int(old[1:]) + 3600)  # the next hour
    hold = budgets.reserve(TOKEN, key, new, BOUNDED, "next hour")
    assert spend_hash(budgets)["budget_period"] == new and nanos(budgets, "budget_spend_nanos") == 0
    accounting.record(finished(0.05), key)  # settled late, from the hour before: no reset
    assert spend_hash(budgets)["budget_period"] == new and nanos(budgets, "budget_spend_nanos") == 0
    budgets.release_lease(hold)
    # BUDGET_RESETS back to creation: a period of the other kind replaces the stored one.
    budgets.reserve(TOKEN, key, "0", BOUNDED, "creation again")
    assert spend_hash(budgets)["budget_period"] == "0" and nanos(budgets, "budget_spend_nanos") == 0
