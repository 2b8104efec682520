"""/metrics: exact values after known traffic, added up across two gunicorn workers."""
import re
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import MASTER, REAL_REDIS_URL, TEST_PRICES, gateway_environ

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if found == {k: str(v) for k, v in labels.items()}:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_need_the_master_key_unless_public(gateway, vllm, start_gateway):
    assert requests.get(gateway.url + "/metrics").status_code == 401
    resp = requests.get(gateway.url + "/metrics", headers=MASTER)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    public = start_gateway(gateway_environ(vllm.url, METRICS_PUBLIC=1))
    assert requests.get(public.url + "/metrics").status_code == 200


def test_exact_counts_across_two_workers(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                                       MODEL_PRICES=TEST_PRICES), workers=2)
    created = requests.post(gw.url + "/key/generate", headers=MASTER, json={"key_alias": "m-key"}).json()
    auth = {"Authorization": f"Bearer {created['key']}", "Connection": "close", "x-fake-delay-ms": "20"}

    def chat(i):
        return requests.post(gw.url + "/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": f"mx-{i}"},
                             json=CHAT).status_code

    sent = 0
    with ThreadPoolExecutor(16) as pool:
        for _ in range(20):  # bursts until both workers have answered some (a gevent worker may take a whole burst)
            assert set(pool.map(chat, range(sent, sent + 32))) == {200}
            sent += 32
            for i in range(sent):
                gw.stdout.wait_for(f'"request_id":"mx-{i}"')
            if len({line["worker"] for line in gw.access_lines() if line["request_id"].startswith("mx-")}) == 2:
                break
    assert len({line["worker"] for line in gw.access_lines() if line["request_id"].startswith("mx-")}) == 2
    limited = requests.post(gw.url + "/key/generate", headers=MASTER, json={"key_alias": "rl-key", "rpm_limit": 1}).json()
    for _ in range(3):
        requests.get(gw.url + "/vllm/v1/models", headers={"Authorization": f"Bearer {limited['key']}"})
        requests.get(gw.url + "/vllm/v1/models", headers={"Authorization": "Bearer sk-nope-nope-nope-00"})
    text = requests.get(gw.url + "/metrics", headers=MASTER).text
    assert sample(text, "vgw_requests_total", route="chat_completions", method="POST", status="200") == sent
    assert sample(text, "vgw_request_duration_seconds_count", route="chat_completions") == sent
    assert sample(text, "vgw_tokens_total", key_alias="m-key", model="fake-model", type="prompt") == 3 * sent
    assert sample(text, "vgw_tokens_total", key_alias="m-key", model="fake-model", type="completion") == 5 * sent
    assert abs(sample(text, "vgw_spend_total", key_alias="m-key", model="fake-model") - sent * 0.013) < 1e-6
    assert sample(text, "vgw_requests_total", route="models", method="GET", status="200") == 1
    assert sample(text, "vgw_requests_total", route="models", method="GET", status="429") == 2
    assert sample(text, "vgw_rate_limited_total", limit="rpm") == 2
    assert sample(text, "vgw_requests_total", route="models", method="GET", status="401") == 3
    assert sample(text, "vgw_auth_failures_total", reason="invalid_key") == 3
    assert sample(text, "vgw_streams_open") == 0


def test_upstream_errors_by_replica(vllm, start_gateway):
    from tests.conftest import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(gateway_environ(f"{dead},{vllm.url}", UPSTREAM_COOLOFF_SECONDS=0))
    for _ in range(4):
        assert requests.get(gw.url + "/vllm/v1/models", headers=MASTER).status_code == 200
    text = requests.get(gw.url + "/metrics", headers=MASTER).text
    refused = sample(text, "vgw_upstream_errors_total", kind="connection_refused", replica=dead)
    assert 1 <= refused <= 4


def test_streams_open_gauge(vllm, start_gateway):
    from tests.conftest import wait_until
    gw = start_gateway(gateway_environ(vllm.url))
    with requests.post(gw.url + "/vllm/v1/chat/completions", stream=True, timeout=10,
                       headers={**MASTER, "x-fake-chunk-delay-ms": "100", "x-fake-chunks": "100"},
                       json={**CHAT, "stream": True}) as resp:
        chunks = resp.iter_content(chunk_size=None)  # kept: a dropped generator closes the connection
        next(chunks)
        assert sample(requests.get(gw.url + "/metrics", headers=MASTER).text, "vgw_streams_open") == 1
    assert wait_until(lambda: sample(requests.get(gw.url + "/metrics", headers=MASTER).text, "vgw_streams_open") == 0)


def test_odd_model_names_do_not_break_metrics_or_accounting(client, vllm):
    """A model name vLLM never saw (a lone surrogate, refused upstream) must not reach the labels."""
    resp = client.post("/vllm/v1/chat/completions", headers={**MASTER, "Content-Type": "application/json"},
                       data=b'{"model": "\\ud800", "messages": []}')
    status = resp.status_code  # whatever the fake vLLM made of it is relayed
    text = client.get("/metrics", headers=MASTER)
    assert text.status_code == 200
    assert sample(text.get_data(as_text=True), "vgw_tokens_total", key_alias="master", model="unknown",
                  type="prompt") == 0
    logs = client.get("/spend/logs", headers=MASTER).get_json()["logs"]
    assert logs[0]["model"] is None and logs[0]["status"] == status


def test_callers_without_a_key_cannot_create_series(start_gateway, vllm):
    """Random HTTP methods (45,000 of them once made 50k series) all land in one `other` series."""
    import secrets

    gw = start_gateway(gateway_environ(vllm.url))

    def series() -> int:
        text = requests.get(gw.url + "/metrics", headers=MASTER).text
        return sum(1 for line in text.splitlines() if line.startswith("vgw_requests_total{"))

    session = requests.Session()
    session.request("FIRSTODD", gw.url + "/vllm/v1/models")
    series()  # the /metrics request itself is counted after it answered
    before = series()
    for _ in range(200):
        method = secrets.token_hex(5).upper()
        assert session.request(method, gw.url + "/vllm/v1/models").status_code in (401, 405)
    assert series() == before
