"""vgw_replica_up and vgw_redis_up: probed by the worker that renders /metrics, bounded in time,
and never a reason for /metrics to fail."""
import re
import socket
import threading
import time

import fakeredis
import pytest
import redis

from gateway.core.metrics import Probes
from tests.conftest import MASTER, build_app, free_port, gateway_environ


def gauge(text: str, name: str, **labels) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


# -- Probes ---------------------------------------------------------------------------------------

def test_a_hanging_check_costs_at_most_the_deadline_and_is_down():
    release = threading.Event()
    probes = Probes(deadline=0.3, reuse=0.0)
    start = time.monotonic()
    assert probes.run({"slow": lambda: release.wait(10), "fast": lambda: True}) == {"slow": False, "fast": True}
    assert time.monotonic() - start < 1.0
    release.set()


def test_a_check_still_hanging_is_not_started_again():
    calls, release = [], threading.Event()

    def hang():
        calls.append(1)
        return release.wait(10)
    probes = Probes(deadline=0.1, reuse=0.0)
    for _ in range(5):
        assert probes.run({"redis": hang}) == {"redis": False}
    assert len(calls) == 1  # probes do not pile up behind a dead dependency
    release.set()


def test_a_check_that_raises_is_down():
    def boom():
        raise RuntimeError("no")
    assert Probes(deadline=1).run({"x": boom, "y": lambda: False}) == {"x": False, "y": False}


def test_a_recent_result_is_reused_and_a_stale_one_probed_again():
    calls = []

    def check():
        calls.append(1)
        return True
    probes = Probes(deadline=1, reuse=0.2)
    for _ in range(10):
        assert probes.run({"vllm": check}) == {"vllm": True}
    assert len(calls) == 1  # a burst of scrapes makes one probe, not ten
    time.sleep(0.25)
    probes.run({"vllm": check})
    assert len(calls) == 2


def test_concurrent_scrapes_wait_for_the_running_probe_instead_of_reporting_down():
    started = threading.Event()

    def slow_up():
        started.set()
        time.sleep(0.2)
        return True
    probes = Probes(deadline=2, reuse=0.0)
    results = []
    first = threading.Thread(target=lambda: results.append(probes.run({"vllm": slow_up})))
    first.start()
    started.wait(2)
    results.append(probes.run({"vllm": slow_up}))
    first.join()
    assert results == [{"vllm": True}, {"vllm": True}]


# -- /metrics --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def test_replica_up_is_1_for_a_live_vllm_and_0_for_a_closed_port(vllm):
    dead = f"http://127.0.0.1:{free_port()}"
    app = build_app({"environ": gateway_environ(f"{vllm.url},{dead}"),
                     "redis": fakeredis.FakeRedis(decode_responses=True)})
    text = app.test_client().get("/metrics", headers=MASTER).get_data(as_text=True)
    assert gauge(text, "vgw_replica_up", replica=vllm.url) == 1
    assert gauge(text, "vgw_replica_up", replica=dead) == 0
    assert gauge(text, "vgw_redis_up") == 1


def test_replica_label_is_the_configured_base_with_its_path():
    base = f"http://127.0.0.1:{free_port()}/some/prefix"
    app = build_app({"environ": gateway_environ(base), "redis": fakeredis.FakeRedis(decode_responses=True)})
    text = app.test_client().get("/metrics", headers=MASTER).get_data(as_text=True)
    assert gauge(text, "vgw_replica_up", replica=base) == 0
    assert f'vgw_upstream_errors_total{{kind="connection_refused",replica="{base}"}} 0.0' in text


def test_redis_refusing_connections_makes_redis_up_0_not_a_failed_scrape():
    app = build_app({"environ": gateway_environ("http://127.0.0.1:9"),
                     "redis": fakeredis.FakeRedis(decode_responses=True)})
    app.extensions["gateway"].redis = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1)
    resp = app.test_client().get("/metrics", headers=MASTER)
    assert resp.status_code == 200
    assert gauge(resp.get_data(as_text=True), "vgw_redis_up") == 0


def test_a_redis_that_never_answers_delays_metrics_by_the_probe_deadline_at_most():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel; nothing ever answers
    try:
        app = build_app({"environ": gateway_environ("http://127.0.0.1:9"),
                         "redis": fakeredis.FakeRedis(decode_responses=True)})
        app.extensions["gateway"].redis = redis.Redis(port=silent.getsockname()[1], socket_timeout=30)
        client = app.test_client()
        start = time.monotonic()
        resp = client.get("/metrics", headers=MASTER)
        first = time.monotonic() - start
        assert resp.status_code == 200 and gauge(resp.get_data(as_text=True), "vgw_redis_up") == 0
        assert first < 3.0
        start = time.monotonic()
        assert gauge(client.get("/metrics", headers=MASTER).get_data(as_text=True), "vgw_redis_up") == 0
        assert time.monotonic() - start < 0.5  # the hanging probe is not waited for twice
    finally:
        silent.close()
