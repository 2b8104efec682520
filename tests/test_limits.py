"""Per-key rate limits: rpm, tpm, parallel requests; exact under concurrency, across workers."""
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import (
    MASTER,
    REAL_REDIS_URL,
    TEST_PRICES,
    build_app,
    gateway_environ,
    open_raw_stream,
    wait_until,
)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def test_rpm_limit_and_headers(kclient, vllm):
    _, auth = make_key(kclient, rpm_limit=3, tpm_limit=1000)
    remaining = []
    for _ in range(3):
        resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
        remaining.append(resp.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    vllm.clear()
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
    assert resp.status_code == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    err = resp.get_json()["error"]
    assert err["type"] == "rate_limit_error" and "rpm_limit of 3" in err["message"]
    assert vllm.requests() == []


def test_tpm_limit_charged_from_usage(kclient):
    _, auth = make_key(kclient, tpm_limit=20)   # each call uses 3 + 5 = 8 tokens
    seen = []
    for _ in range(4):
        resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
        seen.append((resp.status_code, resp.headers.get("x-ratelimit-remaining-tokens")))
    assert seen == [(200, "20"), (200, "12"), (200, "4"), (429, "0")]


def test_unlimited_keys_carry_no_rate_headers(kclient):
    _, auth = make_key(kclient)
    resp = kclient.get("/vllm/v1/models", headers=auth)
    assert resp.status_code == 200 and "x-ratelimit-limit-requests" not in resp.headers


def test_parallel_limit_released_after_client_disconnect(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix))
    created = requests.post(gw.url + "/key/generate", headers=MASTER, json={"max_parallel_requests": 1}).json()
    auth = {"Authorization": f"Bearer {created['key']}"}
    s, _ = open_raw_stream(gw.port, "par-1", key=created["key"])
    with s:
        # While the stream is open the only slot is taken.
        busy = requests.get(gw.url + "/vllm/v1/models", headers=auth)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
    assert vllm.wait_event("stream_closed_early", "par-1", timeout=5)[0] == 200
    assert wait_until(lambda: requests.get(gw.url + "/vllm/v1/models", headers=auth).status_code == 200)
    assert client.zcard(prefix + "rl:{" + created["token"] + "}:parallel") == 0


def test_parallel_slot_released_on_upstream_error(redis_client, vllm):
    env = gateway_environ(vllm.url, REDIS_KEY_PREFIX=redis_client.test_prefix, UPSTREAM_READ_TIMEOUT=0.2)
    kclient = build_app({"environ": env, "redis": redis_client}).test_client()
    _, auth = make_key(kclient, max_parallel_requests=1)
    for _ in range(3):  # a leaked slot would turn the second attempt into a 429
        resp = kclient.get("/vllm/v1/models", headers={**auth, "x-fake-delay-ms": "2000"})
        assert resp.status_code == 504


def test_forty_simultaneous_requests_rpm_ten_across_workers_and_instances(vllm, start_gateway, real_redis_prefix):
    """Two gateway instances on one Redis (the first with two workers) share one rpm budget.

    A gevent worker may accept every connection of a burst, so the second instance is what
    guarantees that more than one process takes part."""
    _, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    gateways = [start_gateway(env, workers=2), start_gateway(env, workers=1)]
    created = requests.post(gateways[0].url + "/key/generate", headers=MASTER, json={"rpm_limit": 10}).json()
    auth = {"Authorization": f"Bearer {created['key']}", "Connection": "close", "x-fake-delay-ms": "50"}

    def call(i):
        gw = gateways[i % 2]
        return requests.post(gw.url + "/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": f"rl-{i}"},
                             json=CHAT, timeout=30).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(call, range(40)))
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    workers = set()
    for i, gw in enumerate(gateways):
        for j in range(i, 40, 2):
            gw.stdout.wait_for(f'"request_id":"rl-{j}"')
        workers |= {line["worker"] for line in gw.access_lines() if line["request_id"].startswith("rl-")}
    assert len(workers) >= 2
