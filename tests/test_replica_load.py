"""GET /replicas: each replica's state and vLLM's own load figures read from its /metrics,
including from replicas that answer badly (tests/hostile_upstream.py)."""
import time

import pytest
import requests

from gateway.relay.upstream import Upstream
from gateway.relay.vllmload import MAX_METRICS_BYTES, LoadUnreadable, parse_load, read_load
from tests.conftest import MASTER, UPSTREAM_KEY, build_app, free_port, gateway_environ
from tests.hostile_upstream import HostileUpstream, response

DATA_PARALLEL = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 4.0
vllm:num_preemptions_total{engine="1",model_name="m"} 1.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 60.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 40.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 20.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 10.0
"""


def test_figures_are_summed_over_engines_and_kv_use_averaged():
    assert parse_load(DATA_PARALLEL) == {"requests_running": 5.0, "requests_waiting": 8.0,
                                         "preemptions_total": 5.0, "kv_cache_usage": 0.375,
                                         "prefix_cache_hits_total": 30.0, "prefix_cache_queries_total": 100.0}


def test_older_vllm_kv_cache_name_is_read():
    text = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.8\n"
    load = parse_load(text)
    assert load["kv_cache_usage"] == 0.8 and load["requests_running"] is None


@pytest.mark.parametrize("text", ["<html>nope</html>", "vllm:num_requests_running{engine=\"0\" 1\n", "x y z\n"])
def test_text_that_is_not_prometheus_is_unreadable_not_a_crash(text):
    with pytest.raises(LoadUnreadable) as caught:
        parse_load(text)
    assert "not Prometheus text" in str(caught.value)


@pytest.fixture
def hostile():
    server = HostileUpstream().start()
    yield server
    server.stop()


def upstream_at(url):
    return Upstream(url, requests.Session(), api_key="sk-upstream-secret-123", connect_timeout=1, read_timeout=1)


def test_the_upstream_key_goes_along_and_a_refusal_is_reported(hostile):
    hostile.script = lambda conn, req: conn.send(response(401, "Unauthorized", body=b"no"))
    with pytest.raises(LoadUnreadable) as caught:
        read_load(upstream_at(hostile.url))
    assert str(caught.value) == "HTTP 401 on /metrics"
    assert "authorization: bearer sk-upstream-secret-123" in hostile.requests[0][1].lower()


def test_an_endless_metrics_body_is_cut_off(hostile):
    def endless(conn, req):
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"# " + b"x" * 65530 + b"\n"
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        while conn.send(chunk):
            pass
        return False

    hostile.script = endless
    with pytest.raises(LoadUnreadable) as caught:
        read_load(upstream_at(hostile.url))
    assert f"larger than {MAX_METRICS_BYTES // 1048576} MiB" in str(caught.value)


def test_a_trickling_metrics_body_is_given_up(hostile):
    def trickle(conn, req):
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while conn.send(b"#" * 100) and conn.sleep(0.1):
            pass
        return False

    hostile.script = trickle
    started = time.monotonic()
    with pytest.raises(LoadUnreadable) as caught:
        read_load(upstream_at(hostile.url), timeout=0.3)
    assert "took longer than" in str(caught.value) and time.monotonic() - started < 3


def test_replicas_route_shows_state_and_vllm_figures(vllm):
    dead = f"http://127.0.0.1:{free_port()}"
    app = build_app({"environ": gateway_environ(vllm.url + "," + dead)})
    client = app.test_client()
    body = client.get("/replicas", headers=MASTER).get_json()
    up, down = body["replicas"]
    assert up["name"] == vllm.url and up["status"] == "up" and up["inflight"] == 0
    # (the prefix-cache counters are whatever the fake reports, None when it does not)
    assert {k: v for k, v in up["vllm"].items() if not k.startswith("prefix_cache")} == {
        "requests_running": 0.0, "requests_waiting": 0.0, "kv_cache_usage": 0.0, "preemptions_total": None,
        "error": None}
    assert {"prefix_cache_hits_total", "prefix_cache_queries_total"} <= set(up["vllm"])
    assert down["status"] == "down" and down["vllm"]["requests_running"] is None
    assert "could not be read" in down["vllm"]["error"]
    assert down["name"] == dead and UPSTREAM_KEY not in str(body)


def test_replicas_route_needs_the_master_key(client):
    assert client.get("/replicas").status_code == 401
    resp = client.get("/replicas", query_string={"verbose": "1"}, headers=MASTER)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "verbose"
