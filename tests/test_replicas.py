"""Several vLLM replicas behind /vllm: balance, failover, stickiness, readiness."""

import re

import pytest
import requests

from gateway.core.errors import GatewayError
from gateway.relay.replicas import Replicas, sticky_id
from tests.conftest import (
    MASTER,
    UPSTREAM_KEY,
    FakeVLLM,
    free_port,
    gateway_environ,
    open_raw_stream,
    sent_for,
    wait_until,
)


@pytest.fixture(scope="module")
def replica_pair():
    """Two fresh fake vLLMs of this module's own (so no other test's stream is in flight there)."""
    servers = [FakeVLLM(["--api-key", UPSTREAM_KEY]) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def two(replica_pair):
    for server in replica_pair:
        server.clear()
    return tuple(replica_pair)


def dead_base():
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# -- unit: the choice itself -------------------------------------------------------------------

class StubUpstream:
    def __init__(self, base, fail=None):
        self.base, self.base_path, self.fail, self.calls = base, "", fail, 0

    def send(self, method, path, headers, body):
        self.calls += 1
        if self.fail:
            raise self.fail
        return f"response from {self.base}"


def test_fewest_in_flight_wins_and_ties_alternate():
    a, b, c = StubUpstream("a"), StubUpstream("b"), StubUpstream("c")
    reps = Replicas([a, b, c], cooloff=10)
    held = [reps.send("GET", "/x", "", {}, None)[0] for _ in range(6)]  # none released: all in flight
    assert sorted(r.name for r in held) == ["a", "a", "b", "b", "c", "c"]
    for replica in held[:2]:
        reps.release(replica)
    freed = {held[0].name, held[1].name}
    assert reps.send("GET", "/x", "", {}, None)[0].name in freed


def test_connect_failure_fails_over_and_cools_off():
    refused = GatewayError(502, "vLLM is unreachable (connection refused)", kind="connection_refused", retryable=True)
    bad, good = StubUpstream("bad", fail=refused), StubUpstream("good")
    reps = Replicas([bad, good], cooloff=60)
    for _ in range(5):
        replica, resp = reps.send("GET", "/x", "", {}, None)
        assert replica.name == "good"
        reps.release(replica)
    assert bad.calls == 1  # skipped while cooling off
    assert reps.replicas[0].inflight == 0 and reps.replicas[1].inflight == 0


def test_failure_after_the_request_was_sent_is_not_retried():
    late = GatewayError(504, "vLLM did not answer within 1s", kind="read_timeout")
    slow, other = StubUpstream("slow", fail=late), StubUpstream("other")
    reps = Replicas([slow, other], cooloff=60)
    reps._turn = 0
    with pytest.raises(GatewayError):
        reps.send("GET", "/x", "", {}, None)
    assert other.calls == 0 and reps.replicas[0].inflight == 0


def test_all_down_is_the_last_error():
    refused = GatewayError(502, "vLLM is unreachable (connection refused)", kind="connection_refused", retryable=True)
    reps = Replicas([StubUpstream("a", fail=refused), StubUpstream("b", fail=refused)], cooloff=60)
    with pytest.raises(GatewayError) as err:
        reps.send("GET", "/x", "", {}, None)
    assert err.value.status == 502


@pytest.mark.parametrize("method, path, fields, expected", [
    ("GET", "/v1/responses/resp_1", None, "resp_1"),
    ("POST", "/v1/responses/resp_2/cancel", None, "resp_2"),
    ("POST", "/v1/responses", {"previous_response_id": "resp_3"}, "resp_3"),
    ("POST", "/v1/responses", {"input": "x"}, None),
    ("POST", "/v1/chat/completions", {"previous_response_id": "resp_4"}, None),
])
def test_sticky_routes(method, path, fields, expected):
    assert sticky_id(method, path, fields) == expected


def test_rendezvous_is_stable():
    reps = Replicas([StubUpstream(n) for n in "abcd"], cooloff=10)
    chosen = {reps.rendezvous(f"resp_{i}").name for i in range(200)}
    assert chosen == set("abcd")  # spread...
    assert all(reps.rendezvous(f"resp_{i}") is reps.rendezvous(f"resp_{i}") for i in range(50))  # ...and stable


# -- through a real gunicorn gateway -------------------------------------------------------------

def test_streams_spread_by_in_flight(two, start_gateway):
    """Identical prompts, no session: without prefix affinity they spread (by the figures and
    the sends since them, or by in-flight counts)."""
    a, b = two
    gw = start_gateway(gateway_environ(f"{a.url},{b.url}", ROUTING_AFFINITY=0))
    socks = []
    try:
        for i in range(6):
            socks.append(open_raw_stream(gw.port, f"spread-{i}", chunks=600, delay_ms=100)[0])
        def inflight():  # the fake counts a /metrics read in progress too: that one passes
            return [requests.get(f.url + "/_fake/inflight").json()["inflight"] for f in (a, b)]
        assert wait_until(lambda: inflight() == [3, 3], 2), inflight()
        # with the counts tied, a non-stream request still goes through
        r = requests.post(gw.url + "/vllm/v1/chat/completions", headers=MASTER,
                          json={"model": "fake-model", "messages": [{"role": "user", "content": "y"}]})
        assert r.status_code == 200
    finally:
        for s in socks:
            s.close()


def test_refused_replica_is_skipped(vllm, start_gateway):
    gw = start_gateway(gateway_environ(f"{dead_base()},{vllm.url}"))
    for _ in range(6):
        r = requests.get(gw.url + "/vllm/v1/models", headers=MASTER)
        assert r.status_code == 200, r.text
    # (load-aware routing also reads vLLM's /metrics)
    assert len([r for r in vllm.requests() if r["path"] != "/metrics"]) == 6
    ready = requests.get(gw.url + "/health/readiness", headers=MASTER).json()  # details need the master key
    assert ready["status"] == "degraded"
    states = {r["status"] for r in ready["dependencies"]["upstream"]["replicas"]}
    assert states == {"up", "down"}
    errors = {r["status"]: r["last_error"] for r in ready["dependencies"]["upstream"]["replicas"]}
    assert errors == {"down": "vLLM is unreachable (connection refused)", "up": None}


def test_all_replicas_down_is_502_and_not_ready(start_gateway):
    gw = start_gateway(gateway_environ(f"{dead_base()},{dead_base()}"))
    r = requests.get(gw.url + "/vllm/v1/models", headers=MASTER)
    assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
    assert requests.get(gw.url + "/health/readiness").status_code == 503


def test_no_retry_once_the_response_started(two, start_gateway):
    a, b = two
    gw = start_gateway(gateway_environ(f"{a.url},{b.url}"))
    r = requests.post(gw.url + "/vllm/v1/chat/completions", stream=True, timeout=10,
                      headers={**MASTER, "x-fake-fail-after": "2", "X-Request-Id": "once-1"},
                      json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True})
    try:
        for _ in r.iter_content(chunk_size=None):
            pass
    except requests.exceptions.ChunkedEncodingError:
        pass
    sent = [x for f in (a, b) for x in f.requests() if sent_for(x["request_id"], "once-1")]
    assert len(sent) == 1


@pytest.mark.parametrize("topology", ["redis", "cluster", "sentinel"])
def test_responses_follow_ups_stick_to_the_creating_replica(two, start_gateway, real_redis_prefix, request, topology):
    from tests.conftest import REAL_REDIS_URL, _purge, gateway_redis, topology_environ
    a, b = two
    _, prefix = real_redis_prefix
    redis_env = {"REDIS_URL": REAL_REDIS_URL}
    if topology != "redis":  # the stickiness map on a sharded or Sentinel-watched Redis
        started = request.getfixturevalue(f"shared_{topology}")
        redis_env = topology_environ(started)
        request.addfinalizer(lambda: _purge(gateway_redis(started), prefix))
    # Without prefix affinity: the creations (identical prompts) are spread over both replicas.
    gw = start_gateway(gateway_environ(f"{a.url},{b.url}", REDIS_KEY_PREFIX=prefix, ROUTING_AFFINITY=0, **redis_env),
                       workers=2)
    creators = {}
    for i in range(6):
        r = requests.post(gw.url + "/vllm/v1/responses", headers={**MASTER, "X-Request-Id": f"stick-{i}"},
                          json={"model": "fake-model", "input": "hi", "store": True, "stream": i % 2 == 0})
        assert r.status_code == 200
        # The fake, like vLLM, derives the response id from the X-Request-Id the gateway sent.
        rid = re.search(r'"id": ?"(resp_stick-[^"]+)"', r.text).group(1)
        creators[rid] = next(f for f in (a, b) if any(sent_for(x["request_id"], f"stick-{i}") for x in f.requests()))
    assert {id(f) for f in creators.values()} == {id(a), id(b)}  # creations were spread over both
    for rid, creator in creators.items():
        for follow_up in (f"/v1/responses/{rid}", f"/v1/responses/{rid}/cancel"):
            method = requests.get if follow_up.endswith(rid) else requests.post
            assert method(gw.url + "/vllm" + follow_up, headers=MASTER).status_code == 200
        r = requests.post(gw.url + "/vllm/v1/responses", headers={**MASTER, "X-Request-Id": f"next-{rid}"},
                          json={"model": "fake-model", "input": "more", "previous_response_id": rid})
        assert r.status_code == 200
        for f in (a, b):
            touched = any(x["path"].startswith(f"/v1/responses/{rid}") or sent_for(x["request_id"], f"next-{rid}")
                          for x in f.requests())
            assert touched == (f is creator), rid


def test_a_broken_short_body_releases_the_replica_and_is_logged():
    """vLLM announces a Content-Length and dies before sending it all: 502, and the replica's
    in-flight count drops back (a leak would steer every later request to another replica)."""
    from tests.conftest import build_app
    from tests.hostile_upstream import HostileUpstream, response

    def short_body(conn, request):
        conn.send(response(200, "OK", [("Content-Type", "application/json")], b'{"partial":', content_length=100))
        return False  # then close: the body ends 89 bytes short

    with HostileUpstream(short_body) as upstream:
        app = build_app({"environ": gateway_environ(upstream.url)})
        reps = app.extensions["gateway"].passthrough.replicas
        resp = app.test_client().get("/vllm/v1/models", headers=MASTER)
    assert resp.status_code == 502 and "broke off" in resp.get_json()["error"]["message"]
    assert reps.replicas[0].inflight == 0
