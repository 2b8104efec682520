"""Liveness and readiness probes."""
import socket

import pytest

from app import create_app
from tests.conftest import MASTER, REAL_REDIS_URL, gateway_environ, real_redis_available


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
    resp = client.get("/health/readiness", headers=MASTER)
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
    resp = app.test_client().get("/health/readiness", headers=MASTER)
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


def test_public_readiness_shows_states_only(vllm):
    """Anyone may probe readiness; the vLLM address and error details need the master key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"http://127.0.0.1:{port}"
    client = create_app({"environ": gateway_environ(f"{vllm.url},{down}")}).test_client()
    public = client.get("/health/readiness")
    assert public.status_code == 200 and public.get_json()["status"] == "degraded"
    text = public.get_data(as_text=True)
    assert vllm.url not in text and down not in text and "refused" not in text and "detail" not in text
    assert public.get_json()["dependencies"]["upstream"] == {"status": "up", "replicas": [{"status": "up"},
                                                                                           {"status": "down"}]}
    for headers in ({"Authorization": "Bearer sk-not-the-master-key-000"}, {"Authorization": "Basic x"}):
        assert client.get("/health/readiness", headers=headers).get_data(as_text=True) == text
    detailed = client.get("/health/readiness", headers=MASTER).get_json()["dependencies"]["upstream"]
    assert [r["base"] for r in detailed["replicas"]] == [vllm.url, down]
    assert detailed["replicas"][1]["detail"] == "connection refused"


def test_readiness_says_when_the_keystore_is_ephemeral(vllm):
    ephemeral = create_app({"environ": gateway_environ(vllm.url)}).test_client()
    assert ephemeral.get("/health/readiness").get_json()["dependencies"]["keystore"] == {"status": "up",
                                                                                      "ephemeral": True}
    if not real_redis_available():
        pytest.skip(f"no Redis at {REAL_REDIS_URL}")
    durable = create_app({"environ": gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL)}).test_client()
    assert durable.get("/health/readiness").get_json()["dependencies"]["keystore"] == {"status": "up"}
