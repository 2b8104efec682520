"""A team's budget and rpm_limit hold for the team as a whole: two keys of one team race across
two gateway instances × two gunicorn workers on one (real) Redis. Budget: the exact-budgets
bound (README) for the team, as tests/e2e/test_budget_fleet.py shows for one key; rpm: exactly
rpm_limit requests admitted in the minute, whichever key and instance they came through."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests

from tests.conftest import MASTER, REAL_REDIS_URL, TEST_PRICES, gateway_environ, wait_until
from tests.e2e.budget_race import CHAT, race_to_budget

COST = 0.013  # 3 prompt + 5 completion tokens at TEST_PRICES
MAX_BUDGET = 0.5
CLIENTS = 32


def two_gateways(vllm, start_gateway, prefix):
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: start_gateway(env, workers=2), range(2)))


def team_with_two_keys(url, **team_fields):
    team = requests.post(url + "/team/new", headers=MASTER, json=team_fields).json()
    keys = [requests.post(url + "/key/generate", headers=MASTER, json={"team_id": team["team_id"]}).json()
            for _ in range(2)]
    return team, keys


@pytest.mark.parametrize("bound", [{"max_tokens": 5}, {}], ids=["max_tokens", "no-bound"])
def test_two_keys_of_a_team_across_two_instances_stay_within_its_budget(vllm, start_gateway, real_redis_prefix,
                                                                         bound):
    redis_client, prefix = real_redis_prefix
    gateways = two_gateways(vllm, start_gateway, prefix)
    team, keys = team_with_two_keys(gateways[0].url, max_budget=MAX_BUDGET)
    statuses = race_to_budget(CLIENTS, lambda i, j: (gateways[(i // 2 + j) % 2].url,
                                                     {"Authorization": f"Bearer {keys[i % 2]['key']}",
                                                      "x-fake-delay-ms": "30"}), bound)
    admitted = statuses.count(200)

    def info():
        return requests.get(gateways[1].url + "/team/info", params={"team_id": team["team_id"]},
                            headers=MASTER).json()["team_info"]

    assert wait_until(lambda: info()["requests"] == len(statuses), timeout=10), info()
    spend = info()["spend"]
    print(f"\nteam budget fleet ({bound or 'no bound'}): admitted {admitted} (ideal {int(MAX_BUDGET / COST)}), "
          f"spend {spend:.6f} of {MAX_BUDGET}, overshoot {(spend - MAX_BUDGET) / MAX_BUDGET:+.2%}")
    assert spend <= MAX_BUDGET * 1.02
    assert Decimal(repr(spend)) == Decimal(str(COST)) * admitted
    assert admitted >= int(MAX_BUDGET / COST + 1e-9)
    subject = "spend:{team:" + team["team_id"] + "}"
    assert redis_client.hget(prefix + subject, "reserved_nanos") == "0"


def test_team_rpm_is_exact_across_keys_and_instances(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    gateways = two_gateways(vllm, start_gateway, prefix)
    team, keys = team_with_two_keys(gateways[0].url, rpm_limit=20)
    if time.time() % 60 > 45:  # the whole race must fall in one minute window
        time.sleep(61 - time.time() % 60)
    start = threading.Barrier(CLIENTS)

    def client(i):
        start.wait()
        resp = requests.post(gateways[i % 2].url + "/vllm/v1/chat/completions", json=CHAT, timeout=30,
                             headers={"Authorization": f"Bearer {keys[(i // 2) % 2]['key']}"})
        return resp.status_code

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = list(pool.map(client, range(CLIENTS)))
    assert statuses.count(200) == 20 and statuses.count(429) == CLIENTS - 20, statuses
