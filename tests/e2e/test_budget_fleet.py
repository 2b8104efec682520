"""Exact budgets across a fleet: 3 gateway instances × 2 gunicorn workers race one key with a
small max_budget. With reservations at admission the settled spend stays within 2% of the budget
(before them: 9–14% over), and the budget is used, not just refused: clients retry a 429 (the
budget held by requests in flight, as the openai client does) and stop at the 400."""
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests

from tests.conftest import MASTER, REAL_REDIS_URL, TEST_PRICES, gateway_environ, wait_until
from tests.e2e.budget_race import CHAT, race_to_budget

# The fake answers 3 prompt + 5 completion tokens: 0.013 a request at TEST_PRICES. With max_tokens 5
# it reserves 8 prompt tokens (estimate) + 5: 0.018; without a bound, BUDGET_DEFAULT_MAX_TOKENS
# (more than the whole budget at these prices: each request holds what remains, one at a time).
COST = 0.013
MAX_BUDGET = 0.5
CLIENTS = 48


@pytest.mark.parametrize("bound", [{"max_tokens": 5}, {}], ids=["max_tokens", "no-bound"])
def test_three_instances_of_two_workers_racing_one_key_stay_within_its_budget(vllm, start_gateway,
                                                                             real_redis_prefix, bound):
    redis_client, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    with ThreadPoolExecutor(3) as pool:  # they boot in parallel: the run stays short
        gateways = list(pool.map(lambda _: start_gateway(env, workers=2), range(3)))
    created = requests.post(gateways[0].url + "/key/generate", headers=MASTER,
                            json={"max_budget": MAX_BUDGET}).json()
    auth = {"Authorization": f"Bearer {created['key']}", "x-fake-delay-ms": "30"}
    statuses = race_to_budget(CLIENTS, lambda i, j: (gateways[(i + j) % 3].url,
                                                     {**auth, "X-Request-Id": f"bf-{i}-{j}"}), bound)
    admitted = statuses.count(200)

    def info():
        return requests.get(gateways[1].url + "/key/info", params={"key": created["key"]}, headers=MASTER).json()["info"]

    # Every request is accounted, refused ones at 0 tokens: once all are in, everything settled.
    assert wait_until(lambda: info()["requests"] == len(statuses), timeout=10), info()
    spend = info()["spend"]
    ideal = int(MAX_BUDGET / COST + 1e-9)
    overshoot = (spend - MAX_BUDGET) / MAX_BUDGET
    print(f"\nbudget fleet ({bound or 'no bound'}): admitted {admitted} (ideal {ideal}), {statuses.count(429)} × 429, spend {spend:.6f} of "
          f"{MAX_BUDGET}, overshoot {overshoot:+.2%}")
    assert spend <= MAX_BUDGET * 1.02
    # Exact: the JSON number is the decimal sum of the charges, no float noise.
    assert Decimal(repr(spend)) == Decimal(str(COST)) * admitted and info()["completion_tokens"] == 5 * admitted
    assert admitted >= ideal, "the reservations refused what the budget allowed"
    # Every instance took part (the race really was across the fleet).
    workers = set()
    for gw in gateways:
        workers |= {(gw.port, line["worker"]) for line in gw.access_lines()
                    if line["request_id"].startswith("bf-") and line["status"] == 200}
    assert len({port for port, _ in workers}) == 3 and len(workers) >= 4, workers
    # No reservation is left behind once everything settled.
    assert redis_client.hget(prefix + "spend:{" + created["token"] + "}", "reserved_nanos") == "0"


def test_one_client_back_to_back_never_meets_its_own_reservation(vllm, start_gateway, real_redis_prefix):
    """Each unbounded request here reserves all that remains (the default bound costs more than
    the budget): the next one, sent the moment the answer arrives, on another instance, must
    still find the room its predecessor did not use — never a 429 — until the 400."""
    redis_client, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    gateways = [start_gateway(env, workers=2), start_gateway(env, workers=2)]
    created = requests.post(gateways[0].url + "/key/generate", headers=MASTER, json={"max_budget": 0.2}).json()
    auth = {"Authorization": f"Bearer {created['key']}"}
    statuses = []
    with requests.Session() as session:
        for i in range(40):
            resp = session.post(gateways[i % 2].url + "/vllm/v1/chat/completions", json=CHAT, headers=auth)
            statuses.append(resp.status_code)
            if resp.status_code != 200:
                break
    assert statuses == [200] * 16 + [400], statuses  # 15 × 0.013 = 0.195 < 0.2: the 16th takes the rest
