"""The pass-through contract, through Flask's test client and a real fake vLLM on loopback."""
import base64
import gzip
import json

import pytest
import requests

from app import create_app
from tests.conftest import MASTER, MASTER_KEY, UPSTREAM_KEY, gateway_environ, header, sent_for


def body_of(recorded) -> bytes:
    return base64.b64decode(recorded["body_b64"])


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_reaches_vllm(client, vllm, method):
    resp = client.open("/vllm/echo/m", method=method, headers=MASTER, data=b"x" if method in ("POST", "PUT", "PATCH") else None)
    assert resp.status_code == 200
    assert vllm.last()["method"] == method
    assert vllm.last()["path"] == "/echo/m"


def test_query_string_is_forwarded_byte_for_byte(client, vllm):
    query = "a=1&a=2&b=%20x+y&c=&d&e=%E2%9C%93&a=3"
    client.get("/vllm/echo/q?" + query, headers=MASTER)
    assert vllm.last()["query"] == query


def test_json_body_bytes_are_not_re_encoded(client, vllm):
    raw = b'{ "model" : "fake-model",\n  "messages":[{"role":"user","content":"h\\u00e9llo \xc3\xa9"}], "x":1.0000 }'
    client.post("/vllm/echo/body", headers={**MASTER, "Content-Type": "application/json"}, data=raw)
    assert body_of(vllm.last()) == raw


def test_malformed_json_gets_vllms_own_400(client, vllm):
    raw = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],}'
    direct = requests.post(vllm.url + "/v1/chat/completions", data=raw,
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {UPSTREAM_KEY}"})
    resp = client.post("/vllm/v1/chat/completions", headers={**MASTER, "Content-Type": "application/json"}, data=raw)
    assert resp.status_code == 400 == direct.status_code
    assert resp.data == direct.content
    assert body_of(vllm.last()) == raw


def test_multipart_upload_keeps_its_boundary(client, vllm):
    boundary = "----gatewayBoundary7MA4YWxkTrZu0gW"
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfake-model\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
           f"Content-Type: audio/wav\r\n\r\n").encode() + bytes(range(256)) * 4 + f"\r\n--{boundary}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={boundary}"
    resp = client.post("/vllm/v1/audio/transcriptions", headers={**MASTER, "Content-Type": ctype}, data=raw)
    assert resp.status_code == 200, resp.data
    assert "text" in resp.get_json()
    recorded = vllm.last()
    assert body_of(recorded) == raw
    assert header(recorded, "Content-Type") == [ctype]


def test_headers_forwarded_without_hop_by_hop_or_credentials(client, vllm):
    sent = {
        "X-Litellm-Api-Key": MASTER_KEY, "Authorization": "Bearer sk-caller-secret-3",
        "X-Api-Key": "sk-caller-secret-1", "Api-Key": "sk-caller-secret-2",
        "X-Custom": "kept", "X-End-User-Id": "alice", "Accept": "text/plain",
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Upgrade": "h2c", "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Trailer": "X-T", "Host": "evil.example",
    }
    resp = client.get("/vllm/echo/h", headers=sent)
    assert resp.status_code == 200, resp.data
    recorded = vllm.last()
    names = {k.lower() for k, _ in recorded["headers"]}
    assert header(recorded, "X-Custom") == ["kept"]
    assert header(recorded, "X-End-User-Id") == ["alice"]
    assert header(recorded, "Accept") == ["text/plain"]
    for dropped in ("x-api-key", "api-key", "x-litellm-api-key", "x-drop-me", "keep-alive", "te",
                    "upgrade", "proxy-authorization", "trailer"):
        assert dropped not in names, dropped
    assert header(recorded, "Host") == [f"127.0.0.1:{vllm.port}"]
    # The caller's key is replaced by the upstream key, never forwarded.
    assert header(recorded, "Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert "sk-caller-secret" not in json.dumps(recorded) and MASTER_KEY not in json.dumps(recorded)


def test_no_upstream_key_means_no_authorization_header(vllm):
    env = gateway_environ(vllm.url)
    del env["HOSTED_VLLM_API_KEY"]
    client = create_app({"environ": env}).test_client()
    client.get("/vllm/echo/x", headers=MASTER)
    assert header(vllm.last(), "Authorization") == []


def test_vllm_api_key_alias_is_accepted(vllm):
    env = gateway_environ(vllm.url)
    del env["HOSTED_VLLM_API_KEY"]
    env["VLLM_API_KEY"] = "alias-key-0123456789"
    client = create_app({"environ": env}).test_client()
    client.get("/vllm/echo/x", headers=MASTER)
    assert header(vllm.last(), "Authorization") == ["Bearer alias-key-0123456789"]


def test_request_id_is_the_callers_or_a_new_one(client, vllm):
    resp = client.post("/vllm/v1/chat/completions", headers={**MASTER, "X-Request-Id": "req-abc.123"},
                       json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.headers["X-Request-Id"] == "req-abc.123"
    # vLLM gets the caller's id made unique per request (it becomes vLLM's engine request id).
    [sent] = header(vllm.last(), "X-Request-Id")
    assert sent_for(sent, "req-abc.123")
    assert resp.get_json()["id"] == "chatcmpl-" + sent
    resp = client.get("/vllm/echo/x", headers=MASTER)
    generated = resp.headers["X-Request-Id"]
    assert len(generated) >= 16 and header(vllm.last(), "X-Request-Id") == [generated]


def test_x_forwarded_headers_are_added(client, vllm):
    client.get("/vllm/echo/x", headers={**MASTER, "X-Forwarded-For": "203.0.113.9"},
               environ_base={"REMOTE_ADDR": "198.51.100.7"})
    recorded = vllm.last()
    assert header(recorded, "X-Forwarded-For") == ["203.0.113.9, 198.51.100.7"]
    assert header(recorded, "X-Forwarded-Proto") == ["http"]


def test_vllm_errors_are_relayed_unchanged(client, vllm):
    payload = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    direct = requests.post(vllm.url + "/v1/chat/completions", json=payload,
                           headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
    resp = client.post("/vllm/v1/chat/completions", headers=MASTER, json=payload)
    assert resp.status_code == direct.status_code == 404
    assert resp.data == direct.content
    assert resp.headers["Content-Type"] == direct.headers["Content-Type"]
    resp = client.get("/vllm/no/such/route", headers=MASTER)
    assert resp.status_code == 404 and resp.get_json() == {"detail": "Not Found"}


def test_upstream_401_is_relayed(vllm):
    env = gateway_environ(vllm.url, HOSTED_VLLM_API_KEY="wrong-upstream-key-000")
    client = create_app({"environ": env}).test_client()
    resp = client.get("/vllm/v1/models", headers=MASTER)
    assert resp.status_code == 401 and resp.get_json() == {"error": "Unauthorized"}


def test_gzip_response_is_relayed_raw_with_its_length(client, vllm):
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    resp = client.post("/vllm/v1/chat/completions", json=payload,
                       headers={**MASTER, "x-fake-gzip": "1", "Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert int(resp.headers["Content-Length"]) == len(resp.data)
    assert json.loads(gzip.decompress(resp.data))["object"] == "chat.completion"


def test_status_and_headers_come_back(client, vllm):
    resp = client.get("/vllm/v1/models", headers=MASTER)
    direct = requests.get(vllm.url + "/v1/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
    assert resp.status_code == 200 and resp.data == direct.content
    assert resp.headers["Content-Type"] == direct.headers["Content-Type"]


def test_metrics_pass_through_untouched(client, vllm):
    resp = client.get("/vllm/metrics", headers=MASTER)
    assert resp.status_code == 200 and b"vllm:" in resp.data
    assert vllm.last()["path"] == "/metrics"


def test_base_with_path_prefix_keeps_it(vllm):
    client = create_app({"environ": gateway_environ(vllm.url + "/echo///")}).test_client()
    client.get("/vllm/v1/models?x=1", headers=MASTER)
    assert vllm.last()["path"] == "/echo/v1/models" and vllm.last()["query"] == "x=1"


def test_body_over_the_limit_is_refused_with_413(vllm):
    client = create_app({"environ": gateway_environ(vllm.url, MAX_REQUEST_BODY_BYTES=1000)}).test_client()
    resp = client.post("/vllm/echo/big", headers=MASTER, data=b"x" * 1001)
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "413"
    assert vllm.requests() == []
    assert client.post("/vllm/echo/big", headers=MASTER, data=b"x" * 1000).status_code == 200


def test_unreachable_vllm_is_a_502_envelope():
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = create_app({"environ": gateway_environ(f"http://127.0.0.1:{port}")}).test_client()
    resp = client.get("/vllm/v1/models", headers=MASTER)
    assert resp.status_code == 502
    err = resp.get_json()["error"]
    assert "unreachable" in err["message"] and err["type"] == "upstream_error"
    assert UPSTREAM_KEY not in resp.get_data(as_text=True)


def test_read_timeout_is_a_504(vllm):
    env = gateway_environ(vllm.url, UPSTREAM_READ_TIMEOUT=0.3)
    client = create_app({"environ": env}).test_client()
    resp = client.get("/vllm/v1/models", headers={**MASTER, "x-fake-delay-ms": "3000"})
    assert resp.status_code == 504
    assert "did not answer within 0.3s" in resp.get_json()["error"]["message"]


def test_connect_timeout_is_a_504():
    import socket
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect hangs.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        env = gateway_environ(f"http://127.0.0.1:{port}", UPSTREAM_CONNECT_TIMEOUT=0.3, UPSTREAM_READ_TIMEOUT=0.3)
        client = create_app({"environ": env}).test_client()
        resp = client.get("/vllm/v1/models", headers=MASTER)
        assert resp.status_code == 504
        assert resp.get_json()["error"]["type"] == "upstream_timeout"
    finally:
        for s in fillers:
            s.close()
        server.close()
