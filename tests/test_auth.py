"""Master-key auth on /vllm: the four credential headers, the envelope, constant time."""
import pytest

from gateway.keys import auth
from tests.conftest import MASTER_KEY, header


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {MASTER_KEY}"},
    {"Authorization": f"bearer   {MASTER_KEY}"},
    {"x-litellm-api-key": MASTER_KEY},
    {"api-key": MASTER_KEY},
    {"x-api-key": MASTER_KEY},
])
def test_master_key_accepted_in_every_header(client, vllm, headers):
    resp = client.get("/vllm/echo/a", headers=headers)
    assert resp.status_code == 200
    recorded = vllm.last()
    for name in ("x-litellm-api-key", "api-key", "x-api-key"):
        assert header(recorded, name) == []


@pytest.mark.parametrize("headers, fragment", [
    ({}, "No API key"),
    ({"Authorization": "Bearer sk-wrong-key-0000000000000"}, "Invalid API key"),
    ({"Authorization": f"Basic {MASTER_KEY}"}, "No API key"),
    ({"Authorization": f"Bearer {MASTER_KEY}x"}, "Invalid API key"),
    ({"x-api-key": MASTER_KEY[:-1]}, "Invalid API key"),
])
def test_missing_or_wrong_key_is_401_envelope(client, vllm, headers, fragment):
    resp = client.post("/vllm/v1/chat/completions", headers=headers, json={"model": "fake-model"})
    assert resp.status_code == 401
    body = resp.get_json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "auth_error" and body["error"]["code"] == "401"
    assert body["error"]["param"] is None
    assert fragment in body["error"]["message"]
    assert MASTER_KEY not in resp.get_data(as_text=True)
    assert vllm.requests() == []


def test_first_matching_header_wins(client, vllm):
    resp = client.get("/vllm/echo/a", headers={"x-litellm-api-key": "sk-wrong-wrong-wrong-0",
                                               "Authorization": f"Bearer {MASTER_KEY}"})
    assert resp.status_code == 401


def test_master_key_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    authenticator = auth.Authenticator(MASTER_KEY)
    assert authenticator.is_master(MASTER_KEY)
    assert not authenticator.is_master("short")
    # Digests of equal length are compared, whatever the length of the presented key.
    assert calls == [(32, 32), (32, 32)]
