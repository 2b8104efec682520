"""Budget reservations through the gateway: taken after the model check, refused with the usual
400 envelope, given back when the request fails or is refused, on fakeredis and the real Redis."""

import datetime
from zoneinfo import ZoneInfo

from gateway.usage import periods
from tests.conftest import MASTER, TEST_PRICES, build_app, gateway_environ

# TEST_PRICES: 0.001 a prompt token, 0.002 a completion token. This body reserves
# 8 prompt tokens (0.008) + max_tokens 10 (0.020) = 0.028; the fake answers 3 + 5 tokens (0.013).
BOUNDED = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def budget_state(client, token) -> tuple[int, int]:
    """(budget-period spend, reserved) in nano-dollars, as Redis holds them."""
    services = client.application.extensions["gateway"]
    spend = services.redis.hgetall(services.accounting.names.key_spend(token))
    return int(spend.get("budget_spend_nanos", 0)), int(spend.get("reserved_nanos", 0))


def test_the_reservation_refuses_what_the_budget_cannot_cover(kclient, vllm):
    created, auth = make_key(kclient, max_budget=0.05)
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED).status_code == 200
    # spent 0.013; 0.013 + 0.028 <= 0.05 admits one more, then 0.026 + 0.028 > 0.05
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED).status_code == 200
    vllm.clear()
    refused = kclient.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED)
    assert refused.status_code == 400
    error = refused.get_json()["error"]
    assert error["type"] == "budget_exceeded" and error["message"].startswith("Budget has been exceeded: spend 0.026000")
    assert vllm.requests() == []
    # a smaller bound still fits: 0.026 + 0.008 + 0.004 <= 0.05
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json={**BOUNDED, "max_tokens": 2}).status_code == 200
    assert budget_state(kclient, created["token"]) == (33_000_000, 0)  # 0.033: 3 + 2 tokens


def test_a_request_refused_by_the_model_check_reserves_nothing(kclient):
    created, auth = make_key(kclient, max_budget=1.0, models=["fake-model"], rpm_limit=5)
    refused = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**BOUNDED, "model": "other"})
    assert refused.status_code == 403
    assert budget_state(kclient, created["token"]) == (0, 0)


def test_a_request_the_budget_refuses_gives_its_rpm_count_back(kclient):
    _, auth = make_key(kclient, max_budget=0.02, rpm_limit=2)  # 0.028 never fits
    for _ in range(4):
        assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED).status_code == 400
    ok = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**BOUNDED, "max_tokens": 1})
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "1"


def test_an_upstream_error_gives_the_reservation_back(redis_client, vllm):
    env = gateway_environ(vllm.url, REDIS_KEY_PREFIX=redis_client.test_prefix, MODEL_PRICES=TEST_PRICES,
                          UPSTREAM_READ_TIMEOUT=0.2)
    client = build_app({"environ": env, "redis": redis_client}).test_client()
    created, auth = make_key(client, max_budget=0.03)  # room for one reservation at a time
    for _ in range(3):  # a reservation kept would refuse the second attempt with a 400
        resp = client.post("/vllm/v1/chat/completions", headers={**auth, "x-fake-delay-ms": "2000"}, json=BOUNDED)
        assert resp.status_code == 504
    assert budget_state(client, created["token"]) == (0, 0)


def test_a_key_without_max_budget_reserves_nothing(kclient):
    created, auth = make_key(kclient)
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED).status_code == 200
    services = kclient.application.extensions["gateway"]
    assert "reserved_nanos" not in services.redis.hgetall(services.accounting.names.key_spend(created["token"]))


def test_a_workers_slots_and_budget_holds_share_one_lease_renewer(kclient):
    """One greenlet and one round trip renew a request's parallel slot and budget hold together."""
    services = kclient.application.extensions["gateway"]
    assert services.budgets.leases is services.limiter.leases
    assert services.accounting.budgets is services.budgets is services.passthrough.budgets


def test_calendar_resets_put_every_daily_budget_on_midnight_in_the_time_zone(vllm, redis_client):
    env = gateway_environ(vllm.url, REDIS_KEY_PREFIX=redis_client.test_prefix, MODEL_PRICES=TEST_PRICES,
                          BUDGET_RESETS="calendar", BUDGET_TIMEZONE="Asia/Kolkata")
    try:
        client = build_app({"environ": env, "redis": redis_client}).test_client()
        created, auth = make_key(client, max_budget=1, budget_duration="1d")
        assert client.post("/vllm/v1/chat/completions", headers=auth, json=BOUNDED).status_code == 200
        info = client.get("/key/info", headers=auth).get_json()["info"]
        now = datetime.datetime.now(ZoneInfo("Asia/Kolkata"))
        midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), now.tzinfo)
        assert info["budget_reset_at"] == midnight.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert info["spend"] == 0.013
        services = client.application.extensions["gateway"]
        stored = services.redis.hget(services.accounting.names.key_spend(created["token"]), "budget_period")
        assert stored == "c%d" % (midnight - datetime.timedelta(days=1)).timestamp()
    finally:
        periods.configure("creation", "UTC")  # the process-wide calendar other tests expect
