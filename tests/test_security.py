"""Security properties: where keys may and may not appear.

Also covered elsewhere: constant-time master-key comparison (test_auth), /key/* refused to
virtual keys (test_keys), vLLM operator routes refused to virtual keys (test_virtual_keys),
weak master keys refused at start-up (test_config).
"""
import json

import requests

from tests.conftest import (
    MASTER,
    MASTER_KEY,
    REAL_REDIS_URL,
    UPSTREAM_KEY,
    free_port,
    gateway_environ,
)
from tests.test_keys import all_redis_text

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def exercise_admin(client):
    """Generate, use, update, block, regenerate: returns every plaintext key that existed."""
    keys = []
    for body in ({}, {"key_alias": "sec", "duration": "1h"}, {"key": "sk-custom-secret-value-0001"}):
        keys.append(client.post("/key/generate", headers=MASTER, json=body).get_json()["key"])
    for key in keys:
        client.post("/vllm/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT)
    client.post("/key/update", headers=MASTER, json={"key": keys[0], "rpm_limit": 5})
    client.post("/key/block", headers=MASTER, json={"key": keys[1]})
    keys.append(client.post("/key/regenerate", headers=MASTER, json={"key": keys[2]}).get_json()["key"])
    return keys


def test_no_plaintext_key_is_ever_stored(kclient, redis_client):
    keys = exercise_admin(kclient)
    stored = all_redis_text(redis_client)
    assert "spendlog" in stored and "key:" in stored  # there is plenty to look at
    for secret in keys + [MASTER_KEY, UPSTREAM_KEY]:
        assert secret not in stored and secret[3:] not in stored


def test_caller_credentials_never_go_upstream(kclient, vllm):
    key = kclient.post("/key/generate", headers=MASTER, json={}).get_json()["key"]
    for name in ("Authorization", "x-litellm-api-key", "api-key", "x-api-key"):
        value = f"Bearer {key}" if name == "Authorization" else key
        assert kclient.post("/vllm/v1/chat/completions", headers={name: value}, json=CHAT).status_code == 200
        sent = json.dumps(vllm.last())
        assert key not in sent and key[3:] not in sent
        assert [v for k, v in vllm.last()["headers"] if k.lower() == "authorization"] == [f"Bearer {UPSTREAM_KEY}"]


def test_the_upstream_key_is_never_returned(kclient, vllm):
    key = kclient.post("/key/generate", headers=MASTER, json={"key_alias": "leak", "rpm_limit": 1,
                                                                "models": ["fake-model"]}).get_json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    answers = [
        kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT),                       # 200
        kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT),                       # 429
        kclient.post("/vllm/v1/chat/completions", headers=MASTER, json={**CHAT, "model": "x"}),   # vLLM 404
        kclient.post("/vllm/v1/chat/completions", headers=MASTER, data=b"{bad json"),             # vLLM 400
        kclient.post("/vllm/sleep", headers=auth),                                                # 403
        kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}),      # 401
        kclient.get("/vllm/v1/models", headers={**MASTER, "x-fake-status": "500"}),               # vLLM 500
        kclient.get("/health/readiness"),
        kclient.get("/metrics", headers=MASTER),
        kclient.get("/key/list?return_full_object=true", headers=MASTER),
        kclient.get("/key/info", query_string={"key": key}, headers=MASTER),
        kclient.get("/spend/logs", headers=MASTER),
    ]
    for resp in answers:
        everything = resp.get_data(as_text=True) + json.dumps(dict(resp.headers))
        assert UPSTREAM_KEY not in everything and MASTER_KEY not in everything


def test_timeouts_and_unreachable_errors_name_no_secret(vllm):
    from tests.conftest import build_app
    for base, headers in ((f"http://127.0.0.1:{free_port()}", {}), (vllm.url, {"x-fake-delay-ms": "2000"})):
        client = build_app({"environ": gateway_environ(base, UPSTREAM_READ_TIMEOUT=0.3)}).test_client()
        resp = client.get("/vllm/v1/models", headers={**MASTER, **headers})
        assert resp.status_code in (502, 504)
        assert UPSTREAM_KEY not in resp.get_data(as_text=True) and MASTER_KEY not in resp.get_data(as_text=True)


def test_no_secret_in_the_logs(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix))

    class Client:  # the same admin exercise, over HTTP against gunicorn
        @staticmethod
        def post(path, headers=None, json=None):
            resp = requests.post(gw.url + path, headers=headers, json=json)
            resp.get_json = resp.json
            return resp

    keys = exercise_admin(Client)
    requests.get(gw.url + "/vllm/v1/models", headers={"Authorization": "Bearer sk-wrong-secret-attempt-0"})
    requests.get(gw.url + "/key/info", params={"key": keys[0]}, headers=MASTER)
    requests.get(gw.url + "/spend/logs", params={"key": keys[0]}, headers=MASTER)
    gw.stop()
    gw.stdout.wait_eof()
    gw.stderr.wait_eof()
    logs = gw.stdout.text() + gw.stderr.text()
    assert '"request_id"' in logs
    for secret in keys + [MASTER_KEY, UPSTREAM_KEY, "sk-wrong-secret-attempt-0"]:
        assert secret not in logs and secret[3:] not in logs
