"""/metrics: exact values after known traffic, added up across two gunicorn workers; the read-only
METRICS_TOKEN; series that exist from start-up; the vLLM and Redis up gauges."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import requests

from gateway.core.metrics import AUTH_FAILURE_REASONS, RATE_LIMIT_KINDS, UPSTREAM_ERROR_KINDS
from tests.conftest import MASTER, REAL_REDIS_URL, ROOT, TEST_PRICES, free_port, gateway_environ

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


# -- METRICS_TOKEN, series from start-up, vgw_replica_up / vgw_redis_up ----------------------------

SCRAPE_TOKEN = "mt-e2e-scrape-token-0123456789abcdef"


def value(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text; None when the series is absent."""
    wanted = {k: str(v) for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if found == wanted:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_token_scrapes_metrics_and_is_refused_everywhere_else(vllm, start_gateway):
    gw = start_gateway(gateway_environ(vllm.url, METRICS_TOKEN=SCRAPE_TOKEN))
    scrape = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    resp = requests.get(gw.url + "/metrics", headers={**scrape, "X-Request-Id": "mt-scrape"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert value(resp.text, "vgw_streams_open") == 0
    assert requests.get(gw.url + "/metrics", headers=MASTER).status_code == 200

    wrong = requests.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN[:-1]}x",
                                                      "X-Request-Id": "mt-wrong"})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {"message": "Invalid API key", "type": "auth_error", "param": None, "code": "401"}

    refused = {}
    for i, (method, path) in enumerate([("GET", "/key/list"), ("GET", "/spend/logs"), ("GET", "/vllm/v1/models"),
                                        ("POST", "/vllm/v1/chat/completions"), ("POST", "/key/generate")]):
        resp = requests.request(method, gw.url + path, headers={**scrape, "X-Request-Id": f"mt-else-{i}"},
                                json=CHAT if method == "POST" else None)
        refused[path] = resp.status_code
        assert SCRAPE_TOKEN not in resp.text
        assert resp.json()["error"]["type"] == "auth_error"
    assert set(refused.values()) == {401}, refused
    assert not any(r["path"].startswith("/v1/chat") for r in vllm.requests())  # nothing reached vLLM

    for request_id in ("mt-scrape", "mt-wrong", *(f"mt-else-{i}" for i in range(5))):
        gw.stdout.wait_for(f'"request_id":"{request_id}"')
    [line] = [line for line in gw.access_lines() if line["request_id"] == "mt-scrape"]
    assert line["caller"] == "metrics_token" and line["status"] == 200
    assert SCRAPE_TOKEN not in gw.stdout.text() and SCRAPE_TOKEN not in gw.stderr.text()
    text = requests.get(gw.url + "/metrics", headers=scrape).text
    assert value(text, "vgw_auth_failures_total", reason="invalid_key") == 6  # the wrong one and 5 elsewhere


def test_a_weak_metrics_token_stops_the_start_in_one_line_without_echoing_it():
    token = "short-metrics-1"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(gateway_environ("http://127.0.0.1:9", METRICS_TOKEN=token))
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                           "--bind", f"127.0.0.1:{free_port()}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("gateway configuration error")]
    assert "METRICS_TOKEN" in line and "16 characters" in line
    assert token not in proc.stderr + proc.stdout and "Booting worker" not in proc.stderr


def test_series_exist_at_zero_and_up_gauges_are_set_on_the_first_scrape(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    dead = f"http://127.0.0.1:{free_port()}"  # a replica whose port nothing listens on
    gw = start_gateway(gateway_environ(f"{vllm.url},{dead}", REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                                       METRICS_TOKEN=SCRAPE_TOKEN), workers=2)
    text = requests.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).text
    missing = [f"auth {r}" for r in AUTH_FAILURE_REASONS if value(text, "vgw_auth_failures_total", reason=r) != 0]
    missing += [f"limit {k}" for k in RATE_LIMIT_KINDS if value(text, "vgw_rate_limited_total", limit=k) != 0]
    missing += [f"upstream {k} {r}" for r in (vllm.url, dead) for k in UPSTREAM_ERROR_KINDS
                if value(text, "vgw_upstream_errors_total", kind=k, replica=r) != 0]
    assert missing == []
    assert value(text, "vgw_budget_rejections_total") == 0
    assert value(text, "vgw_replica_up", replica=vllm.url) == 1
    assert value(text, "vgw_replica_up", replica=dead) == 0
    assert value(text, "vgw_redis_up") == 1
    assert "pid=" not in text  # the up gauges are one series each, not one per worker
