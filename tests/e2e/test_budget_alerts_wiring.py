"""Budget alerts wired end to end: real requests through a gunicorn gateway (gevent workers, the
deliverer started per worker) to the fake vLLM, prices set, settled by the accounting flusher;
a webhook receiver on loopback gets exactly one signed call per threshold crossed, for the key
and for its team, and /key/info and /team/info list the thresholds alerted this period."""
from __future__ import annotations

import time

import requests

from gateway.alerts.webhook import verify_signature
from tests.conftest import MASTER, REAL_REDIS_URL, TEST_PRICES, gateway_environ
from tests.e2e.test_alert_webhook import receiver  # noqa: F401 (fixture)

SECRET = "whsec-wiring-0123456789abcdef"
# 0.013 a request (3 + 5 tokens at TEST_PRICES). Unbounded requests reserve what remains, so the
# key (max_budget 0.05) is admitted 4 times: 0.013, 0.026, 0.039, 0.052, then refused.
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def test_one_signed_call_per_threshold_for_the_key_and_its_team(vllm, start_gateway, real_redis_prefix, receiver):
    hooks = receiver()
    _, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES,
                          ALERT_WEBHOOK_URL=hooks.url, ALERT_WEBHOOK_SECRET=SECRET,
                          BUDGET_ALERT_THRESHOLDS="50%,80%,100%", ALERT_WEBHOOK_POLL_INTERVAL=0.05)
    gateway = start_gateway(env, workers=2)
    team = requests.post(gateway.url + "/team/new", headers=MASTER,
                         json={"team_alias": "research", "max_budget": 0.08}).json()
    key = requests.post(gateway.url + "/key/generate", headers=MASTER,
                        json={"key_alias": "alice", "team_id": team["team_id"], "max_budget": 0.05,
                              "soft_budget": 0.02}).json()
    auth = {"Authorization": f"Bearer {key['key']}"}
    statuses = [requests.post(gateway.url + "/vllm/v1/chat/completions", json=CHAT, headers=auth).status_code
                for _ in range(6)]
    assert statuses == [200] * 4 + [400] * 2, statuses

    # key: soft_budget (0.02) and 50% (0.025) at 0.026, 80% and 100% at 0.052; team: 50% (0.04) at 0.052
    assert hooks.wait_calls(5), hooks.events()
    time.sleep(1.0)  # nothing more arrives: once per threshold
    events = hooks.events()
    assert len(events) == 5, events
    fired = sorted((e["event_group"], e["threshold"]) for e in events)
    assert fired == [("key", "100%"), ("key", "50%"), ("key", "80%"), ("key", "soft_budget"), ("team", "50%")]
    for headers, body in hooks.calls:
        assert verify_signature(SECRET.encode(), body, headers["X-Gateway-Timestamp"], headers["X-Gateway-Signature"])
    by_threshold = {(e["event_group"], e["threshold"]): e for e in events}
    assert by_threshold[("key", "100%")]["spend"] == 0.052 and by_threshold[("key", "100%")]["token"] == key["token"]
    assert by_threshold[("team", "50%")]["team_id"] == team["team_id"]

    info = requests.get(gateway.url + "/key/info", params={"key": key["key"]}, headers=MASTER).json()["info"]
    assert sorted(info["budget_alerts_sent"]) == ["100%", "50%", "80%", "soft_budget"]
    team_info = requests.get(gateway.url + "/team/info", params={"team_id": team["team_id"]},
                             headers=MASTER).json()["team_info"]
    assert team_info["budget_alerts_sent"] == ["50%"] and team_info["spend"] == 0.052
    # The outcomes are counted, summed over the workers: 5 queued, 5 delivered at the first attempt.
    metrics = requests.get(gateway.url + "/metrics", headers=MASTER).text
    counted = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vgw_budget_alerts_total{")}
    assert counted["queued"] == 5 and counted["delivered"] == 5 and counted["dropped"] == 0, counted
