"""Admission in order of cost: what needs only headers comes before the body is read, and a
request the model check refuses does not keep its rate-limit count (LiteLLM #39309)."""
from tests.conftest import MASTER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return {"Authorization": f"Bearer {created['key']}"}


def test_a_request_refused_by_the_model_check_gives_its_rpm_count_back(kclient, vllm):
    auth = make_key(kclient, rpm_limit=2, max_parallel_requests=1, models=["fake-model"])
    for _ in range(5):
        refused = kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "model": "other"})
        assert refused.status_code == 403
    for expected_remaining in ("1", "0"):
        ok = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
        assert ok.status_code == 200, ok.get_json()
        assert ok.headers["x-ratelimit-remaining-requests"] == expected_remaining
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 429


class _Untouchable:
    """A request body that fails the test if anything reads it."""

    def read(self, *args):
        raise AssertionError("the body was read before admission refused the request")

    readline = read


def _environ_with_unread_body(auth: dict) -> dict:
    return {"wsgi.input": _Untouchable(), "CONTENT_LENGTH": str(60 * 1024 * 1024),
            "CONTENT_TYPE": "application/json", "HTTP_AUTHORIZATION": auth["Authorization"]}


def test_a_key_over_its_rpm_limit_is_refused_before_its_body_is_read(kclient, vllm):
    auth = make_key(kclient, rpm_limit=1)
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    resp = kclient.post("/vllm/v1/chat/completions", environ_overrides=_environ_with_unread_body(auth))
    assert resp.status_code == 429


def test_a_key_over_its_budget_is_refused_before_its_body_is_read(kclient, vllm):
    auth = make_key(kclient, max_budget=0)
    resp = kclient.post("/vllm/v1/chat/completions", environ_overrides=_environ_with_unread_body(auth))
    assert resp.status_code == 400 and resp.get_json()["error"]["type"] == "budget_exceeded"


def test_a_route_the_key_may_not_call_is_refused_before_its_body_is_read(kclient, vllm):
    auth = make_key(kclient)
    resp = kclient.post("/vllm/sleep", environ_overrides=_environ_with_unread_body(auth))
    assert resp.status_code == 403
