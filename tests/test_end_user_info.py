"""/end_user/info: an end user's usage per key (one tenant's traffic never mixes into another's
figures) and summed; master-key requests count under "master"."""
import pytest

from tests.conftest import MASTER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def test_end_user_info_is_per_key_and_summed(kclient):
    a, auth_a = make_key(kclient, key_alias="tenant-a")
    b, auth_b = make_key(kclient, key_alias="tenant-b")
    for _ in range(2):
        kclient.post("/vllm/v1/chat/completions", headers=auth_a, json={**CHAT, "user": "shared-id"})
    kclient.post("/vllm/v1/chat/completions", headers={**auth_b, "x-end-user-id": "shared-id"}, json=CHAT)
    kclient.post("/vllm/v1/chat/completions", headers=MASTER, json={**CHAT, "user": "shared-id"})
    info = kclient.get("/end_user/info?end_user_id=shared-id", headers=MASTER).get_json()
    assert info["requests"] == 4 and info["total_tokens"] == 32 and info["spend"] == pytest.approx(4 * 0.013)
    per_key = {token: usage["requests"] for token, usage in info["keys"].items()}
    assert per_key == {a["token"]: 2, b["token"]: 1, "master": 1}
    assert info["last_seen"] is not None
