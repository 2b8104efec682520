"""Per-model limits on a key (issue 16, item 2): model_rpm_limit, model_tpm_limit and
model_max_budget in LiteLLM's names, exact under concurrency across workers and instances."""
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import MASTER, REAL_REDIS_URL, TEST_PRICES, gateway_environ

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
OTHER = {**CHAT, "model": "other-model"}  # the fake vLLM answers 404: reached it, not limited by us


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def chat(client, auth, body=CHAT):
    return client.post("/vllm/v1/chat/completions", headers=auth, json=body)


def test_model_rpm_limit_counts_only_its_model(kclient, vllm):
    _, auth = make_key(kclient, model_rpm_limit={"fake-model": 2})
    assert [chat(kclient, auth).status_code for _ in range(3)] == [200, 200, 429]
    resp = chat(kclient, auth)
    err = resp.get_json()["error"]
    assert err["type"] == "rate_limit_error" and "model_rpm_limit of 2" in err["message"]
    assert "'fake-model'" in err["message"] and 1 <= int(resp.headers["Retry-After"]) <= 60
    assert chat(kclient, auth, OTHER).status_code == 404


def test_model_tpm_limit_charged_from_usage(kclient):
    _, auth = make_key(kclient, model_tpm_limit={"fake-model": 20})  # each call: 3 + 5 = 8 tokens
    assert [chat(kclient, auth).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert "model_tpm_limit of 20" in chat(kclient, auth).get_json()["error"]["message"]
    assert chat(kclient, auth, OTHER).status_code == 404


def test_model_max_budget(kclient):
    # 3 prompt tokens at 0.001 + 5 completion tokens at 0.002 = 0.013 a call
    _, auth = make_key(kclient, model_max_budget={"fake-model": {"budget_limit": 0.03, "time_period": "1d"}})
    assert [chat(kclient, auth).status_code for _ in range(4)] == [200, 200, 200, 400]
    err = chat(kclient, auth).get_json()["error"]
    assert err["type"] == "budget_exceeded"
    assert "spend 0.039" in err["message"] and "model_max_budget 0.03" in err["message"]
    assert chat(kclient, auth, OTHER).status_code == 404


def test_rpm_count_given_back_when_a_later_check_refuses(kclient, vllm):
    """The key's budget reservation refuses after the model's rpm was counted: the count goes back."""
    _, auth = make_key(kclient, model_rpm_limit={"fake-model": 1}, max_budget=0.05)
    resp = chat(kclient, auth, {**CHAT, "max_tokens": 100000})  # its estimate is far over the budget
    assert resp.status_code == 400 and resp.get_json()["error"]["type"] == "budget_exceeded"
    assert chat(kclient, auth).status_code == 200
    assert chat(kclient, auth).status_code == 429


def test_alias_counts_against_the_real_model(kclient):
    _, auth = make_key(kclient, aliases={"fast": "fake-model"}, model_rpm_limit={"fake-model": 1})
    assert chat(kclient, auth, {**CHAT, "model": "fast"}).status_code == 200
    assert chat(kclient, auth).status_code == 429


def test_unreadable_model_refused_when_limits_apply(kclient):
    _, auth = make_key(kclient, model_rpm_limit={"fake-model": 5})
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
                        data=b'{"model": 7}')
    assert resp.status_code == 403 and resp.get_json()["error"]["param"] == "model"


def test_twenty_concurrent_requests_model_rpm_seven_across_instances(vllm, start_gateway, real_redis_prefix):
    """Two gateway instances on one Redis (the first with two workers) share one model window."""
    _, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    gateways = [start_gateway(env, workers=2), start_gateway(env, workers=1)]
    created = requests.post(gateways[0].url + "/key/generate", headers=MASTER,
                            json={"model_rpm_limit": {"fake-model": 7}}).json()
    auth = {"Authorization": f"Bearer {created['key']}", "Connection": "close", "x-fake-delay-ms": "50"}

    def call(i, body=CHAT):
        return requests.post(gateways[i % 2].url + "/vllm/v1/chat/completions",
                             headers={**auth, "X-Request-Id": f"mrl-{i}"}, json=body, timeout=30).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(call, range(20)))
    assert statuses.count(200) == 7 and statuses.count(429) == 13
    assert [call(i, OTHER) for i in range(2)] == [404, 404]  # another model: not limited


def test_key_info_shows_what_each_model_has_left(kclient):
    _, auth = make_key(kclient, model_rpm_limit={"fake-model": 5},
                       model_max_budget={"fake-model": {"budget_limit": 1, "time_period": "1d"}})
    assert chat(kclient, auth).status_code == 200
    models = kclient.get("/key/info", headers=auth).get_json()["info"]["limits"]["models"]
    shown = models["fake-model"]
    assert shown["rpm"]["used"] == 1 and shown["rpm"]["remaining"] == 4 and shown["tpm"] is None
    assert shown["budget"]["spend"] == 0.013 and shown["budget"]["remaining"] == 0.987
    assert shown["budget"]["resets_at"].endswith("T00:00:00Z")  # 1d: midnight UTC
    _, plain = make_key(kclient)
    assert "models" not in kclient.get("/key/info", headers=plain).get_json()["info"]["limits"]
