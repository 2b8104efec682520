"""Calling /vllm with a virtual key: route policy, model allow-list, Redis outages."""
import base64
import json
import shutil
import subprocess

import pytest

from app import create_app
from tests.conftest import MASTER, free_port, gateway_environ


def make_key(client, **fields) -> dict:
    resp = client.post("/key/generate", headers=MASTER, json=fields)
    assert resp.status_code == 200, resp.get_json()
    return {"Authorization": f"Bearer {resp.get_json()['key']}"}


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_virtual_key_calls_inference_routes(kclient, vllm):
    auth = make_key(kclient, key_alias="dev")
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
    assert resp.status_code == 200 and resp.get_json()["object"] == "chat.completion"
    recorded = vllm.last()
    # The virtual key is replaced by the upstream key.
    assert auth["Authorization"] not in json.dumps(recorded)
    for path in ("/vllm/v1/models", "/vllm/health", "/vllm/metrics", "/vllm/version", "/vllm/ping"):
        assert kclient.get(path, headers=auth).status_code == 200, path
    assert kclient.post("/vllm/tokenize", headers=auth, json={"model": "fake-model", "prompt": "a b"}).status_code == 200


@pytest.mark.parametrize("path", ["/vllm/generative_scoring", "/vllm/inference/v1/generate"])
def test_current_inference_routes_reach_vllm(kclient, vllm, path):
    """vLLM 0.32's newer inference routes are admitted (rule in gateway/keys/policy.py)."""
    auth = make_key(kclient)
    resp = kclient.post(path, headers=auth, json={"model": "fake-model"})
    assert resp.status_code != 403, resp.get_data()
    assert vllm.last()["path"] == path[len("/vllm"):]


@pytest.mark.parametrize("path", [
    "/vllm/inference", "/vllm/generative_scoringx", "/vllm/sleep", "/vllm/wake_up", "/vllm/collective_rpc", "/vllm/reset_prefix_cache", "/vllm/server_info",
    "/vllm/start_profile", "/vllm/pause", "/vllm/resume", "/vllm/update_weights", "/vllm/v1/load_lora_adapter",
    "/vllm/v1/unload_lora_adapter", "/vllm/is_sleeping", "/vllm/fault_tolerance/x", "/vllm//sleep",
    "/vllm/SLEEP", "/vllm/v1/load%5Flora_adapter", "/vllm/%73leep", "/vllm/echo/x", "/vllm/", "/vllm",
])
def test_operator_and_unknown_routes_refused_to_virtual_keys(kclient, vllm, path):
    auth = make_key(kclient)
    resp = kclient.post(path, headers=auth, json={})
    assert resp.status_code == 403, path
    assert resp.get_json()["error"]["type"] == "permission_error"
    assert vllm.requests() == []
    # The master key may call vLLM's operator routes.
    if path == "/vllm/sleep":
        assert kclient.post(path, headers=MASTER, json={}).status_code == 200


def test_allowed_routes_narrow_the_key(kclient, vllm):
    auth = make_key(kclient, allowed_routes=["/v1/chat/completions", "/vllm/tokenize"])
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    assert kclient.post("/vllm/tokenize", headers=auth, json={"prompt": "x"}).status_code == 200
    resp = kclient.post("/vllm/v1/completions", headers=auth, json={"model": "fake-model", "prompt": "x"})
    assert resp.status_code == 403 and "allowed_routes" in resp.get_json()["error"]["message"]
    # allowed_routes never widens past the default policy
    auth = make_key(kclient, allowed_routes=["/sleep", "/*"])
    assert kclient.post("/vllm/sleep", headers=auth).status_code == 403
    assert kclient.get("/vllm/v1/models", headers=auth).status_code == 200


def test_model_allow_list(kclient, vllm):
    auth = make_key(kclient, models=["fake-model"])
    raw = b'{"model":"fake-model",  "messages":[{"role":"user","content":"hi"}]}'
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "Content-Type": "application/json"}, data=raw)
    assert resp.status_code == 200
    assert base64.b64decode(vllm.last()["body_b64"]) == raw  # still byte-for-byte
    vllm.clear()
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "other-model"})
    assert resp.status_code == 403
    err = resp.get_json()["error"]
    assert err["type"] == "key_model_access_denied" and "other-model" in err["message"]
    assert vllm.requests() == []


@pytest.mark.parametrize("body, ctype", [
    (b'{"model": "fake-model",}', "application/json"),          # unreadable JSON
    (b'{"messages": []}', "application/json"),                  # no model
    (b'{"model": ["fake-model"]}', "application/json"),         # not a string
    (b"model=fake-model", "application/x-www-form-urlencoded"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
])
def test_model_allow_list_fails_closed(kclient, vllm, body, ctype):
    auth = make_key(kclient, models=["fake-model"])
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "Content-Type": ctype}, data=body)
    assert resp.status_code == 403 and resp.get_json()["error"]["type"] == "key_model_access_denied"
    assert vllm.requests() == []


def test_model_allow_list_reads_multipart(kclient, vllm):
    auth = make_key(kclient, models=["fake-model"])
    boundary = "bnd"

    def form(model):
        return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
                f"RIFF\r\n--{boundary}--\r\n").encode()

    ctype = f"multipart/form-data; boundary={boundary}"
    assert kclient.post("/vllm/v1/audio/transcriptions", headers={**auth, "Content-Type": ctype},
                        data=form("fake-model")).status_code == 200
    assert kclient.post("/vllm/v1/audio/transcriptions", headers={**auth, "Content-Type": ctype},
                        data=form("whisper-large")).status_code == 403


def test_get_without_body_is_not_refused_by_the_model_list(kclient):
    auth = make_key(kclient, models=["fake-model"])
    assert kclient.get("/vllm/v1/models", headers=auth).status_code == 200


def test_redis_down_fails_closed_for_virtual_keys_only(vllm):
    port = free_port()  # nothing listens here
    env = gateway_environ(vllm.url, REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_SOCKET_TIMEOUT=0.5)
    client = create_app({"environ": env}).test_client()
    resp = client.get("/vllm/v1/models", headers={"Authorization": "Bearer sk-some-virtual-key-0000"})
    assert resp.status_code == 503
    assert "unavailable" in resp.get_json()["error"]["message"]
    assert client.get("/vllm/v1/models", headers=MASTER).status_code == 200
    assert client.post("/key/generate", headers=MASTER, json={}).status_code == 503
    ready = client.get("/health/readiness")
    assert ready.status_code == 503 and ready.get_json()["dependencies"]["keystore"]["status"] == "down"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_service_resumes_when_redis_returns(vllm, tmp_path):
    port = free_port()

    def start_redis():
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for line in iter(proc.stdout.readline, ""):
            if "Ready to accept connections" in line:
                return proc
        raise RuntimeError("redis-server did not start")

    server = start_redis()
    try:
        env = gateway_environ(vllm.url, REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_SOCKET_TIMEOUT=0.5)
        client = create_app({"environ": env}).test_client()
        auth = make_key(client)
        assert client.get("/vllm/v1/models", headers=auth).status_code == 200
        server.terminate()
        server.wait(10)
        assert client.get("/vllm/v1/models", headers=auth).status_code == 503
        assert client.get("/vllm/v1/models", headers=MASTER).status_code == 200
        # A fresh Redis (nothing persisted here): the service answers again by itself.
        server = start_redis()
        resp = client.get("/vllm/v1/models", headers=auth)
        assert resp.status_code == 401  # reachable again; this empty Redis does not know the key
        auth = make_key(client)
        assert client.get("/vllm/v1/models", headers=auth).status_code == 200
    finally:
        server.terminate()
        server.wait(10)
