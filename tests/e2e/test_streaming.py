"""Streaming, disconnects and raw-path safety through a real gunicorn gevent gateway."""
import http.client
import json
import socket

import pytest
import requests

from tests.conftest import (
    MASTER,
    MASTER_KEY,
    UPSTREAM_KEY,
    GatewayServer,
    gateway_environ,
    open_raw_stream,
    wait_until,
)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "say five words"}], "stream": True}


def sse_reads(base_url, path, payload, headers):
    """POST and return the separate socket reads of the body (chunk boundaries as received)."""
    host, port = base_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    reads = []
    while True:
        data = resp.read1(65536)
        if not data:
            break
        reads.append(data)
    conn.close()
    return resp, reads


def test_sse_chunks_are_relayed_one_by_one(gateway, vllm):
    headers = {**MASTER, "x-fake-chunk-delay-ms": "30", "x-fake-chunks": "6"}
    resp, reads = sse_reads(gateway.url, "/vllm/v1/chat/completions",
                            {**CHAT, "stream_options": {"include_usage": True}}, headers)
    direct_resp, direct_reads = sse_reads(vllm.url, "/v1/chat/completions",
                                          {**CHAT, "stream_options": {"include_usage": True}},
                                          {"Authorization": f"Bearer {UPSTREAM_KEY}", "x-fake-chunk-delay-ms": "30",
                                           "x-fake-chunks": "6"})
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    assert resp.getheader("X-Accel-Buffering") == "no"
    assert resp.getheader("Content-Length") is None
    # Same events, one read each: nothing merged, nothing split.
    assert len(reads) == len(direct_reads)
    assert all(r.startswith(b"data: ") and r.endswith(b"\n\n") and r.count(b"data: ") == 1 for r in reads)
    assert reads[-1] == b"data: [DONE]\n\n"
    assert json.loads(reads[-2][6:])["usage"]["completion_tokens"] == 6


def test_first_event_arrives_before_the_stream_ends(gateway, vllm):
    # The fake sends the first event at once, then waits 20 s: a buffering gateway times out here.
    headers = {**MASTER, "x-fake-chunk-delay-ms": "20000", "Content-Type": "application/json"}
    with requests.post(gateway.url + "/vllm/v1/chat/completions", json=CHAT, headers=headers,
                       stream=True, timeout=(5, 5)) as resp:
        first = next(resp.iter_content(chunk_size=None))
    assert first.startswith(b"data: ") and b'"role":"assistant"' in first.replace(b" ", b"")


@pytest.mark.parametrize("path, payload", [
    ("/vllm/v1/completions", {"model": "fake-model", "prompt": "hello there", "stream": True}),
    ("/vllm/v1/responses", {"model": "fake-model", "input": "hello", "stream": True}),
])
def test_other_streams_are_relayed(gateway, vllm, path, payload):
    resp, reads = sse_reads(gateway.url, path, payload, MASTER)
    assert resp.status == 200 and resp.getheader("X-Accel-Buffering") == "no"
    direct = requests.post(vllm.url + path[5:], json=payload, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
    direct_events = [e for e in direct.content.split(b"\n\n") if e]
    assert len(reads) == len(direct_events) > 2
    assert all(r.endswith(b"\n\n") and r.count(b"\n\n") == 1 for r in reads)


def test_streamed_transcription_is_relayed(gateway, vllm):
    boundary = "b0undary"
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfake-model\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
           "RIFFdata\r\n" f"--{boundary}--\r\n").encode()
    resp = requests.post(gateway.url + "/vllm/v1/audio/transcriptions", data=raw, stream=True,
                         headers={**MASTER, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    chunks = list(resp.iter_content(chunk_size=None))
    assert resp.status_code == 200 and resp.headers["X-Accel-Buffering"] == "no"
    assert chunks[-1] == b"data: [DONE]\n\n" and len(chunks) > 2


def test_client_disconnect_closes_the_upstream(gateway, vllm):
    s, received = open_raw_stream(gateway.port, "disc-1")
    assert b"data: " in received
    s.close()
    # The client is gone; the gateway must hang up on vLLM so it stops generating.
    status, event = vllm.wait_event("stream_closed_early", "disc-1", timeout=5)
    assert status == 200, "the fake vLLM never saw the gateway close the stream"
    assert event["events_sent"] < 2000


def test_upstream_dying_mid_stream_ends_the_client_stream(gateway, vllm):
    headers = {**MASTER, "x-fake-fail-after": "2", "x-fake-chunks": "10", "X-Request-Id": "die-1"}
    resp = requests.post(gateway.url + "/vllm/v1/chat/completions", json=CHAT, headers=headers,
                         stream=True, timeout=10)
    received = b""
    try:
        for chunk in resp.iter_content(chunk_size=None):
            received += chunk
    except requests.exceptions.ChunkedEncodingError:
        pass
    assert received.count(b"data: ") >= 2 and b"[DONE]" not in received
    line = _wait_access_line(gateway, "die-1")
    assert "upstream stream broke" in line["error"] and line["stream"] is True


def _wait_access_line(gateway, request_id):
    gateway.stdout.wait_for(f'"request_id":"{request_id}"')
    return next(line for line in gateway.access_lines() if line["request_id"] == request_id)


@pytest.fixture(scope="module")
def echo_gateway(fake_vllm_server):
    """One gateway for the path tests, its base carrying a path prefix."""
    server = GatewayServer(gateway_environ(fake_vllm_server.url + "/echo"))
    yield server
    server.stop()


def raw_request(gateway, target: str, method="GET"):
    """Send a request line exactly as written (http.client would not let us)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
                  "Connection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("target", [
    "/vllm/../admin", "/vllm/v1/../../x", "/vllm/%2e%2e/x", "/vllm/v1/%2E%2e/%2e%2e/y",
    "/vllm/v1%2F..%2F..%2Fsleep", "/vllm/./v1/models", "/vllm/%252e%252e/x", "/vllm/v1\\..\\x",
    "/vllm/caf\xe9",  # raw non-ASCII in the request line: gunicorn itself answers 400
])
def test_dot_segments_are_refused(echo_gateway, vllm, target):
    assert raw_request(echo_gateway, target) == 400
    assert vllm.requests() == []


@pytest.mark.parametrize("target, expected_path", [
    ("/vllm//evil.example/x", "/echo//evil.example/x"),
    ("/vllm/@evil.example/x", "/echo/@evil.example/x"),
    ("/vllm/http://evil.example/x", "/echo/http://evil.example/x"),
    ("/vllm/v1%2Fmodels", "/echo/v1%2Fmodels"),
    ("http://gw/vllm/abs/form?q=1", "/echo/abs/form"),
])
def test_odd_paths_stay_on_the_upstream_below_the_base(echo_gateway, vllm, target, expected_path):
    assert raw_request(echo_gateway, target) == 200
    recorded = vllm.last()
    assert recorded["path"] == expected_path
    host = [v for k, v in recorded["headers"] if k.lower() == "host"]
    assert host == [f"127.0.0.1:{vllm.port}"]


def test_streams_cut_short_still_record_usage(gateway, vllm):
    # upstream dies after 3 content events
    resp = requests.post(gateway.url + "/vllm/v1/chat/completions", json=CHAT, stream=True, timeout=10,
                         headers={**MASTER, "x-fake-fail-after": "3", "x-fake-chunks": "10", "X-Request-Id": "cut-up"})
    try:
        for _ in resp.iter_content(chunk_size=None):
            pass
    except requests.exceptions.ChunkedEncodingError:
        pass
    # client goes away after the first events
    s, _ = open_raw_stream(gateway.port, "cut-client", events=3)
    s.close()
    vllm.wait_event("stream_closed_early", "cut-client", timeout=5)
    # Accounting is written in batches shortly after the response: poll until both are in.
    logs = {}

    def both_logged():
        logs.update((e["request_id"], e) for e in requests.get(gateway.url + "/spend/logs", headers=MASTER).json()["logs"])
        return {"cut-up", "cut-client"} <= set(logs)

    assert wait_until(both_logged)
    upstream_died, client_left = logs["cut-up"], logs["cut-client"]
    assert upstream_died["completion_tokens"] == 3 and upstream_died["estimated"] is True
    assert "upstream stream broke" in upstream_died["error"]
    assert client_left["completion_tokens"] >= 2 and client_left["error"] == "client disconnected"
