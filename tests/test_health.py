"""Liveness and readiness probes."""
import socket

from app import create_app
from tests.conftest import gateway_environ


def test_liveliness_needs_no_key(client):
    for path in ("/health/liveliness", "/health/liveness"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.get_json() == "I'm alive!"


def test_readiness_names_the_upstream(client, vllm):
    resp = client.get("/health/readiness")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "healthy" and body["dependencies"]["upstream"]["status"] == "up"


def test_readiness_is_503_when_vllm_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = create_app({"environ": gateway_environ(f"http://127.0.0.1:{port}")}).test_client()
    resp = client.get("/health/readiness")
    assert resp.status_code == 503
    upstream = resp.get_json()["dependencies"]["upstream"]
    assert upstream["status"] == "down" and upstream["replicas"][0]["detail"] == "connection refused"


def test_unknown_route_is_a_404_envelope(client):
    resp = client.get("/v1/chat/completions")
    assert resp.status_code == 404
    assert resp.get_json()["error"]["type"] == "not_found_error"


def test_wrong_method_is_a_405_envelope(client):
    resp = client.post("/health/liveliness")
    assert resp.status_code == 405 and resp.get_json()["error"]["code"] == "405"


def _readiness(app):
    resp = app.test_client().get("/health/readiness")
    return resp.status_code, resp.get_json()["dependencies"]["upstream"]["replicas"][0]["detail"]


def test_readiness_fails_when_vllm_refuses_the_upstream_key(vllm):
    """vLLM's /health needs no key: readiness also probes /v1/models, which does."""
    status, detail = _readiness(create_app({"environ": {**gateway_environ(vllm.url),
                                                        "HOSTED_VLLM_API_KEY": "wrong-key-123"}}))
    assert status == 503 and "refused the gateway's upstream key" in detail and "HOSTED_VLLM_API_KEY" in detail
    assert "wrong-key-123" not in detail
    env = gateway_environ(vllm.url)
    del env["HOSTED_VLLM_API_KEY"]
    status, detail = _readiness(create_app({"environ": env}))
    assert status == 503 and "vLLM requires a key" in detail


def test_readiness_fails_when_the_base_url_ends_in_v1(vllm):
    status, detail = _readiness(create_app({"environ": gateway_environ(vllm.url + "/v1")}))
    assert status == 503 and "HTTP 404 on /health" in detail and "without /v1" in detail
