"""Exact money end to end (gateway/usage/money.py): prices read exactly, costs and spend in integer
nano-dollars, every API amount a JSON number spelling the exact decimal, API money inputs read as
Decimal, and spend the previous version wrote as float dollars read and folded without a loss;
on fakeredis, the real Redis, a Redis Cluster and Sentinel."""
import json
import time
from decimal import Decimal

import fakeredis
import pytest

from gateway.core.redisnames import RedisNames
from gateway.core.timefmt import iso
from gateway.usage.accounting import Accounting, Charge
from gateway.usage.prices import parse_prices
from gateway.usage.tap import Usage
from tests.conftest import MASTER, build_app, gateway_environ
from tests.hostile_upstream import HostileUpstream, ok_response

# The fake answers 3 prompt + 5 completion tokens: 3 × 170 + 5 × 1,100 = 6,010 nano-dollars a
# request, a sum doubles cannot keep (3 × 0.00000601 is 1.8030000000000002e-05 in floating point).
PRICES = json.dumps({"fake-model": {"input_cost_per_token": 1.7e-7, "output_cost_per_token": 1.1e-6,
                                   "cache_read_input_token_cost": 1.7e-8}})
COST = Decimal("0.00000601")
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
def mclient(vllm, redis_client):
    env = gateway_environ(vllm.url, REDIS_KEY_PREFIX=redis_client.test_prefix, MODEL_PRICES=PRICES)
    return build_app({"environ": env, "redis": redis_client}).test_client()


def exact(resp) -> dict:
    """The JSON body with each number as the decimal its text spells: 0.051000000000000004 would
    stay that, not pass as 0.051."""
    assert resp.status_code == 200, resp.get_data()[:300]
    return json.loads(resp.get_data(), parse_float=Decimal)


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def key_info(client, created) -> dict:
    return exact(client.get("/key/info", query_string={"key": created["token"]}, headers=MASTER))["info"]


# -- JSON shows exact sums ---------------------------------------------------------------------
def test_every_endpoint_shows_the_exact_sum(mclient):
    created, auth = make_key(mclient, key_alias="exact")
    for i in range(7):
        assert mclient.post("/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": f"x-{i}"},
                            json={**CHAT, "user": "ursula"}).status_code == 200
    total, token = 7 * COST, created["token"]
    info = key_info(mclient, created)
    assert info["spend"] == info["total_spend"] == total
    usage = exact(mclient.get("/key/usage", query_string={"key": token}, headers=MASTER))
    assert usage["totals"]["spend"] == sum(usage["spend"]) == total
    for group_by, group in (("key", token), ("model", "fake-model"), ("end_user", "ursula")):
        for interval in ("hour", "day"):
            report = exact(mclient.get("/spend/report", query_string={"group_by": group_by, "interval": interval},
                                       headers=MASTER))
            [series] = [s for s in report["series"] if s["group"] == group]
            assert series["totals"]["spend"] == sum(series["spend"]) == total, (group_by, interval)
    user = exact(mclient.get("/end_user/info", query_string={"end_user_id": "ursula"}, headers=MASTER))
    assert user["spend"] == user["keys"][token]["spend"] == total
    logs = exact(mclient.get("/spend/logs", query_string={"key_alias": "exact"}, headers=MASTER))["logs"]
    assert [entry["spend"] for entry in logs] == [COST] * 7


def test_a_regenerated_keys_usage_is_merged_exactly(mclient):
    """/spend/report adds the series of a key's old token to the new one: in nano-dollars."""
    created, auth = make_key(mclient)
    for _ in range(3):
        mclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
    new = mclient.post("/key/regenerate", headers=MASTER, json={"key": created["key"]}).get_json()
    for _ in range(4):
        mclient.post("/vllm/v1/chat/completions", headers={"Authorization": f"Bearer {new['key']}"}, json=CHAT)
    report = exact(mclient.get("/spend/report", headers=MASTER))
    [series] = [s for s in report["series"] if s["group"] == new["token"]]
    assert series["totals"]["spend"] == 7 * COST and series["spend"][-1] == 7 * COST


# -- budgets hold to the nano-dollar -----------------------------------------------------------
def test_a_budget_is_spent_to_the_nano_dollar_and_not_one_more(mclient, vllm):
    created, auth = make_key(mclient, max_budget=float(3 * COST))  # exactly three requests
    for _ in range(3):
        assert mclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    vllm.clear()
    refused = mclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
    assert refused.status_code == 400 and vllm.requests() == []
    assert "spend 0.00001803 >= max_budget 0.00001803" in refused.get_json()["error"]["message"]
    info = key_info(mclient, created)
    assert info["spend"] == info["max_budget"] == 3 * COST


# -- money inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, shown", [(b"0.1", "0.1"), (b"12.000000001", "12.000000001"), (b"1e-9", "1e-09"),
                                         (b"5", "5.0"), (b"999999.999999999", "999999.999999999")])
def test_max_budget_is_read_and_shown_exactly(mclient, text, shown):
    created = mclient.post("/key/generate", headers=MASTER, data=b'{"max_budget": ' + text + b"}",
                           content_type="application/json")
    assert Decimal(str(exact(created)["max_budget"])) == Decimal(text.decode())
    assert f'"max_budget":{shown}' in created.get_data(as_text=True).replace(" ", "")
    updated = mclient.post("/key/update", headers=MASTER, content_type="application/json",
                           data=b'{"key": "%s", "max_budget": %s}' % (created.get_json()["key"].encode(), text))
    assert exact(updated)["max_budget"] == Decimal(text.decode())
    audit = exact(mclient.get("/audit/logs", query_string={"action": "update"}, headers=MASTER))["logs"][0]
    assert audit["changes"]["max_budget"] == Decimal(text.decode())


@pytest.mark.parametrize("text, says", [
    (b"0.0000000001", "at most 9 decimal places"), (b"NaN", "finite"), (b"-Infinity", "finite"),
    (b"-0.01", "must not be negative"), (b"1e10", "at most 1000000000"), (b"1" + b"0" * 400, "at most"),
    (b"123456789.123456789", "15 significant digits"), (b'"5"', "a number"), (b"true", "a number"),
])
@pytest.mark.parametrize("endpoint", ["/key/generate", "/key/update"])
def test_a_money_input_it_cannot_keep_exactly_is_a_clear_400(mclient, redis_client, endpoint, text, says):
    created, _ = make_key(mclient, max_budget=1)
    before = sorted(redis_client.scan_iter(match=redis_client.test_prefix + "*"))
    body = b'{"key": "%s", "max_budget": %s}' % (created["key"].encode(), text) if endpoint.endswith("update") \
        else b'{"max_budget": ' + text + b"}"
    answer = mclient.post(endpoint, headers=MASTER, data=body, content_type="application/json")
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error["param"] == "max_budget" and says in error["message"], error
    assert sorted(redis_client.scan_iter(match=redis_client.test_prefix + "*")) == before
    assert key_info(mclient, created)["max_budget"] == 1


def test_metadata_numbers_are_kept_as_before(mclient):
    """Only money fields are read as Decimal; other numbers stay JSON numbers as sent."""
    created = exact(mclient.post("/key/generate", headers=MASTER, json={"metadata": {"ratio": 0.1, "n": 3}}))
    assert created["metadata"] == {"ratio": Decimal("0.1"), "n": 3}


# -- the previous version's float spend --------------------------------------------------------
def seed_legacy_spend(redis_client, token: str, end_user: str) -> None:
    """What the previous version left: float dollars from HINCRBYFLOAT and Lua's '%.17g', a live
    reservation lease named by its dollars, float end-user stats and a float usage bucket."""
    names, now = RedisNames(redis_client.test_prefix), time.time()
    redis_client.hset(names.key_spend(token), mapping={
        "requests": 4, "prompt_tokens": 12, "completion_tokens": 20, "budget_period": "all",
        "spend": "0.051000000000000004", "budget_spend": "0.051000000000000004", "reserved": "0.028"})
    redis_client.zadd(names.budget_holds(token), {"0.028|an-old-worker's-request": now + 60})
    redis_client.hset(names.end_user_stats(token, end_user), mapping={
        "requests": 2, "prompt_tokens": 6, "completion_tokens": 10, "spend": "0.026000000000000002",
        "last_seen": iso(now)})
    redis_client.zadd(names.end_user_keys(end_user), {token: now})
    day = int(now // 86400) * 86400
    redis_client.hset(names.usage_bucket("day", day), f"k|{token}", "4 12 20 0.052000000000000005")


def test_float_spend_of_the_previous_version_is_read_and_folded_exactly(mclient, redis_client):
    created, auth = make_key(mclient, max_budget=1)
    token, names = created["token"], RedisNames(redis_client.test_prefix)
    seed_legacy_spend(redis_client, token, "legacy")

    info = key_info(mclient, created)  # read before any script folded it
    assert info["spend"] == info["total_spend"] == Decimal("0.051") and info["requests"] == 4
    assert exact(mclient.get("/end_user/info?end_user_id=legacy", headers=MASTER))["spend"] == Decimal("0.026")
    assert exact(mclient.get("/key/usage", query_string={"key": token}, headers=MASTER))["totals"]["spend"] \
        == Decimal("0.052")

    assert mclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "user": "legacy"}).status_code == 200
    info = key_info(mclient, created)
    assert info["spend"] == info["total_spend"] == Decimal("0.051") + COST and info["requests"] == 5
    stored = redis_client.hgetall(names.key_spend(token))
    assert stored["spend_nanos"] == stored["budget_spend_nanos"] == "51006010"
    assert stored["reserved_nanos"] == "28000000"  # the old worker's live lease, recounted
    assert not {"spend", "budget_spend", "reserved"} & stored.keys()  # folded once, gone
    user = exact(mclient.get("/end_user/info?end_user_id=legacy", headers=MASTER))
    assert user["spend"] == Decimal("0.026") + COST and user["requests"] == 3
    usage = exact(mclient.get("/key/usage", query_string={"key": token}, headers=MASTER))
    assert usage["totals"]["spend"] == Decimal("0.052") + COST and usage["totals"]["requests"] == 5
    day = int(time.time() // 86400) * 86400
    assert redis_client.hget(names.usage_bucket("day", day), f"k|{token}") == "5 15 25 n52006010"


def test_a_legacy_lease_that_runs_out_frees_its_dollars_exactly(mclient, redis_client):
    created, auth = make_key(mclient, max_budget=float(Decimal("0.051") + 2 * COST))
    token, names = created["token"], RedisNames(redis_client.test_prefix)
    seed_legacy_spend(redis_client, token, "legacy")
    redis_client.zadd(names.budget_holds(token), {"0.028|an-old-worker's-request": time.time() - 1})  # it died
    for _ in range(2):  # room for exactly two more requests once the dead lease is gone
        assert mclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    assert mclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 400
    assert redis_client.hget(names.key_spend(token), "reserved_nanos") == "0"


# -- a million requests ------------------------------------------------------------------------
def test_a_million_requests_at_1_5e_7_a_token_add_up_exactly(redis_client):
    """Each cost crosses the relay as a float and is charged in nano-dollars: a million of them,
    settled in Redis, sum to the exact decimal, and /key/info's JSON number spells it."""
    names = RedisNames(redis_client.test_prefix)
    prices = parse_prices('{"m": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}}', "test")
    accounting = Accounting(redis_client, names, prices, 1000, background=False)
    token, exact_total = "c" * 64, Decimal(0)
    charge = Charge(token, "all", accounting.budgets.next_sequence())
    for i in range(1_000_000):
        prompt, completion = 1 + i % 97, i % 13
        charge.add({"prompt_tokens": prompt, "completion_tokens": completion, "end_time": 0.0,
                    "spend": accounting.cost("m", prompt, completion)}, None)
    for i in range(97):  # the exact sum, in closed form: each residue the same number of times
        exact_total += Decimal("1.5e-07") * (1 + i) * len(range(i, 1_000_000, 97))
    for i in range(13):
        exact_total += Decimal("6e-07") * i * len(range(i, 1_000_000, 13))
    pipe = redis_client.pipeline(transaction=False)
    accounting.budgets.queue_settle(pipe, charge)
    pipe.execute()
    assert Decimal(redis_client.hget(names.key_spend(token), "spend_nanos")) == exact_total * 10**9
    shown = accounting.key_totals(token, {"created_epoch": 0})["total_spend"]
    assert Decimal(json.dumps(shown)) == exact_total


def test_many_small_settles_add_up_exactly_in_redis(redis_client):
    """One script call per request (HINCRBY in Redis): no drift however many."""
    names = RedisNames(redis_client.test_prefix)
    prices = parse_prices('{"m": {"input_cost_per_token": 1.5e-07}}', "test")
    accounting = Accounting(redis_client, names, prices, 1000, background=False)
    token = "d" * 64
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2000):
        charge = Charge(token, "all", accounting.budgets.next_sequence())
        charge.add({"prompt_tokens": 7, "completion_tokens": 0, "end_time": 0.0,
                    "spend": accounting.cost("m", 7, 0)}, None)  # 0.00000105 each
        accounting.budgets.queue_settle(pipe, charge)
    pipe.execute()
    totals = accounting.key_totals(token, {"created_epoch": 0})
    assert Decimal(json.dumps(totals["total_spend"])) == Decimal(json.dumps(totals["spend"])) == Decimal("0.0021")


# -- cached prompt tokens ----------------------------------------------------------------------
def test_the_cost_of_a_usage_charges_cached_prompt_tokens_at_their_price():
    accounting = Accounting(fakeredis.FakeRedis(decode_responses=True), RedisNames("x:"), parse_prices(PRICES, "test"),
                            10, background=False)
    # 4 uncached × 170 + 8 cached × 17 + 3 × 1,100 nano-dollars
    assert accounting.usage_cost(Usage("fake-model", 12, 3, cached_tokens=8)) == pytest.approx(4116e-9, abs=0)
    assert accounting.usage_cost(Usage("fake-model", 12, 3)) == pytest.approx(5340e-9, abs=0)


def cached_answer(conn, request):
    body = {"id": "c1", "object": "chat.completion", "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 8}}}
    conn.send(ok_response(json.dumps(body).encode()))


def test_cached_prompt_tokens_vllm_reports_are_charged_at_the_cached_price(redis_client):
    with HostileUpstream(cached_answer) as upstream:
        env = gateway_environ(upstream.url, REDIS_KEY_PREFIX=redis_client.test_prefix, MODEL_PRICES=PRICES)
        client = build_app({"environ": env, "redis": redis_client}).test_client()
        created, auth = make_key(client)
        assert client.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
        assert key_info(client, created)["spend"] == Decimal("0.000004116")
