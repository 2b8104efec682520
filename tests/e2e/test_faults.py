"""Faults, each against a real gunicorn gevent gateway, a real Redis and the fake vLLM."""
import json
import shutil
import signal
import socket
import subprocess

import pytest
import requests

from tests.conftest import (
    MASTER,
    MASTER_KEY,
    TEST_PRICES,
    free_port,
    gateway_environ,
    open_raw_stream,
    sent_for,
    wait_until,
)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def test_vllm_refusing_connections_is_502(start_gateway):
    gw = start_gateway(gateway_environ(f"http://127.0.0.1:{free_port()}"))
    resp = requests.post(gw.url + "/vllm/v1/chat/completions", headers=MASTER, json=CHAT)
    assert resp.status_code == 502
    assert resp.json()["error"]["message"] == "vLLM is unreachable (connection refused)"


def test_vllm_that_never_answers_is_504_and_is_hung_up_on(vllm, start_gateway):
    gw = start_gateway(gateway_environ(vllm.url, UPSTREAM_READ_TIMEOUT=1))
    resp = requests.post(gw.url + "/vllm/v1/chat/completions", json=CHAT, timeout=30,
                         headers={**MASTER, "x-fake-hang": "1", "X-Request-Id": "hang-1"})
    assert resp.status_code == 504
    assert resp.json()["error"]["message"] == "vLLM did not answer within 1s"
    status, event = vllm.wait_event("hang_ended", "hang-1", timeout=5)
    assert status == 200 and event["reason"] == "client_gone"


def test_client_leaving_before_vllm_answers_aborts_the_upstream_within_a_second(vllm, start_gateway):
    """A long prefill: vLLM has not sent its head yet when the caller hangs up. The upstream
    request is closed at once (vLLM aborts it), not left running until the read timeout."""
    gw = start_gateway(gateway_environ(vllm.url))  # read timeout: the default 600 s
    body = json.dumps(CHAT).encode()
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Request-Id: prefill-1\r\n"
              + f"Authorization: Bearer {MASTER_KEY}\r\nx-fake-hang: 1\r\nContent-Type: application/json\r\n".encode()
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_until(lambda: any(sent_for(x["request_id"], "prefill-1") for x in vllm.requests()))
    s.close()
    status, event = vllm.wait_event("hang_ended", "prefill-1", timeout=1.0)
    assert status == 200 and event["reason"] == "client_gone", "vLLM was not hung up on within a second"
    gw.stdout.wait_for('"request_id":"prefill-1"')
    line = next(x for x in gw.access_lines() if x["request_id"] == "prefill-1")
    assert line["status"] == 499 and line["error"] == "client disconnected before vLLM answered"
    # the replica is not blamed for the caller's hang-up
    assert requests.get(gw.url + "/health/readiness", headers=MASTER).status_code == 200


def test_client_leaving_during_a_silence_closes_the_upstream_within_a_second(vllm, start_gateway):
    """vLLM sends one event then stays silent for 20 s (think: a long prefill). The client
    leaves; the gateway must not wait for vLLM's next byte to notice."""
    gw = start_gateway(gateway_environ(vllm.url))
    s, _ = open_raw_stream(gw.port, "silent-1", delay_ms=20000)
    s.close()
    status, event = vllm.wait_event("stream_closed_early", "silent-1", timeout=1.0)
    assert status == 200, "vLLM was not hung up on within a second of the client leaving"
    gw.stdout.wait_for('"request_id":"silent-1"')
    line = next(x for x in gw.access_lines() if x["request_id"] == "silent-1")
    assert line["error"] == "client disconnected"


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, persisting every write (so a crash loses nothing)."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary")
    port = free_port()

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        proc = None

        def start(self):
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", "--dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
            for line in iter(self.proc.stdout.readline, ""):
                if "Ready to accept connections" in line:
                    return
            raise RuntimeError("redis-server did not start")

        def crash(self):
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    server = Server()
    server.start()
    yield server
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(10)


def test_redis_outage_fails_closed_keeps_master_and_loses_nothing(vllm, start_gateway, own_redis):
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=own_redis.url, REDIS_SOCKET_TIMEOUT=0.5,
                                       MODEL_PRICES=TEST_PRICES))
    created = requests.post(gw.url + "/key/generate", headers=MASTER,
                            json={"key_alias": "outage", "max_budget": 0.05}).json()
    auth = {"Authorization": f"Bearer {created['key']}"}
    for _ in range(3):
        assert requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    master_chat = {**CHAT, "user": "zed"}
    assert requests.post(gw.url + "/vllm/v1/chat/completions", headers=MASTER, json=master_chat).status_code == 200

    def key_info():
        return requests.get(gw.url + "/key/info", params={"key": created["key"]}, headers=MASTER)

    assert wait_until(lambda: key_info().json()["info"]["requests"] == 3)

    own_redis.crash()
    # Fail closed for virtual keys (once the sub-second key cache has run out) ...
    assert wait_until(lambda: requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth,
                                            json=CHAT).status_code == 503)
    refused = requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth, json=CHAT)
    assert refused.status_code == 503 and "key store (Redis) is unavailable" in refused.json()["error"]["message"]
    # ... while the master key is still served, and its accounting waits.
    for _ in range(2):
        assert requests.post(gw.url + "/vllm/v1/chat/completions", headers=MASTER, json=master_chat).status_code == 200
    assert requests.get(gw.url + "/health/readiness").status_code == 503

    own_redis.start()
    # Service resumes by itself, with everything written before the outage still there.
    assert wait_until(lambda: requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth,
                                            json=CHAT).status_code == 200, timeout=10)
    assert wait_until(lambda: requests.get(gw.url + "/end_user/info", params={"end_user_id": "zed"},
                                           headers=MASTER).json().get("requests") == 3, timeout=10)
    # The request that proved service is back is accounted in the background; wait for it.
    assert wait_until(lambda: key_info().json()["info"]["requests"] >= 4, timeout=10)
    info = key_info().json()["info"]
    assert info["key_alias"] == "outage"
    # Requests refused during the outage (a budgeted key cannot reserve: 503) count at no cost;
    # every answered one costs 0.013 for its 8 tokens.
    assert info["spend"] == pytest.approx(info["total_tokens"] / 8 * 0.013)
    # the budget (0.05, spent 0.052 after 4 requests) still holds across the outage
    assert wait_until(lambda: requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth,
                                            json=CHAT).status_code == 400)
    assert requests.get(gw.url + "/health/readiness").status_code == 200
