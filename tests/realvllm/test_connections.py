"""Connections between caller, gateway and a real vLLM: hang-ups abort vLLM's work, and idle
keep-alive connections that vLLM's uvicorn drops after 5 s never cost a caller a 502."""
import json
import re
import socket
import time

import requests

from tests.conftest import MASTER_KEY, wait_until
from tests.realvllm.conftest import MODEL, rid

# Long enough that vLLM, left alone, would still be generating well after the 1 s allowed.
MAX_TOKENS = 1500
# A stream the engine cannot finish before the test hangs up: the tiny model makes ~1,000-3,000
# tokens/s here, so this takes seconds (the context is 4,096; the prompt a few tokens).
LONG_STREAM_TOKENS = 4000


def open_stream(port: int, body: dict, request_id: str) -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
              + f"Authorization: Bearer {MASTER_KEY}\r\nX-Request-Id: {request_id}\r\n".encode()
              + f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


def test_client_disconnect_mid_stream_stops_vllm(real_gateway, real_vllm):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": True,
            "max_tokens": LONG_STREAM_TOKENS, "ignore_eos": True}
    request_id = rid()
    s = open_stream(real_gateway.port, body, request_id)
    received = b""
    while received.count(b"data: ") < 5:
        data = s.recv(65536)
        assert data, f"the gateway closed the stream early: {received[-500:]!r}\n{real_vllm.out.text()[-3000:]}"
        received += data
    # (vLLM's running gauge is not a precondition here: it lags the engine by up to its stats
    # interval. The "aborted" line below is the proof that the request was still running.)
    s.close()
    # vLLM logs "aborted" only for a request it did not finish, so the line itself proves the
    # abort; the deadline is generous because the full suite loads this 2-core machine (alone,
    # it comes within 25-160 ms; a run to max_tokens would log no abort).
    real_vllm.wait_aborted(request_id, timeout=5.0)
    assert wait_until(lambda: real_vllm.metric("vllm:num_requests_running") == 0, timeout=5.0)


def test_client_gone_before_the_first_token_aborts_vllm(real_gateway, real_vllm):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1000}], "stream": True,
            "max_tokens": MAX_TOKENS, "ignore_eos": True}
    request_id = rid()
    s = open_stream(real_gateway.port, body, request_id)
    s.close()  # before any byte of the answer
    # The gateway may notice the hang-up before the request reached vLLM (then vLLM never
    # starts it); if vLLM did receive it, it must abort it within the second.
    real_gateway.stdout.wait_for(re.escape(f'"request_id":"{request_id}"'), timeout=5)
    if re.search(r"Received request \S*" + re.escape(request_id), real_vllm.out.text()):
        real_vllm.wait_aborted(request_id, timeout=1.0)
    assert wait_until(lambda: real_vllm.metric("vllm:num_requests_running") == 0, timeout=1.0)


def test_keep_alive_across_uvicorns_idle_drop(real_gateway, calls):
    """Requests 4.5-6 s apart for a minute: uvicorn closes idle connections at 5 s."""
    key = calls.new_key()
    gaps = [4.5, 5.0, 5.5, 6.0, 4.8, 5.2, 4.9, 5.8, 5.1, 4.6, 5.4]  # 56.8 s in all
    statuses = []
    for gap in [0.0, *gaps]:
        time.sleep(gap)  # the load shape under test, not a wait for something
        # A new caller connection each time: gunicorn's own 5 s keep-alive is not under test,
        # the gateway's pooled connections to vLLM are.
        resp = requests.post(real_gateway.url + "/vllm/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        statuses.append(resp.status_code)
    assert statuses == [200] * len(statuses)
