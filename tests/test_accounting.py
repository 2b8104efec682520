"""Usage, cost, budgets, end users and the spend log, on fakeredis and the real Redis."""
import time

import pytest

from tests.conftest import MASTER, wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def info(client, created):
    return client.get("/key/info", query_string={"key": created["key"]}, headers=MASTER).get_json()["info"]


def test_json_usage_and_cost_per_key(kclient):
    created, auth = make_key(kclient)
    for _ in range(2):
        assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    totals = info(kclient, created)
    # the fake reports 3 prompt tokens (words) and 5 completion tokens per request
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"], totals["total_tokens"]) == (2, 6, 10, 16)
    assert totals["spend"] == pytest.approx(2 * (3 * 0.001 + 5 * 0.002))
    assert totals["total_spend"] == pytest.approx(totals["spend"])


def test_stream_usage_exact_with_usage_chunk_and_estimated_without(kclient):
    created, auth = make_key(kclient, key_alias="streamer")
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "x-fake-chunks": "7", "X-Request-Id": "u-1"}, json=body)
    assert resp.status_code == 200 and resp.data.endswith(b"data: [DONE]\n\n")
    resp.close()
    resp = kclient.post("/vllm/v1/chat/completions", headers={**auth, "x-fake-chunks": "4", "X-Request-Id": "u-2"},
                        json={**CHAT, "stream": True})
    assert resp.status_code == 200 and resp.data
    resp.close()
    logs = {e["request_id"]: e for e in kclient.get("/spend/logs?key_alias=streamer", headers=MASTER).get_json()["logs"]}
    exact, estimated = logs["u-1"], logs["u-2"]
    assert (exact["prompt_tokens"], exact["completion_tokens"], exact["estimated"]) == (3, 7, False)
    assert estimated["completion_tokens"] == 4 and estimated["estimated"] is True
    assert exact["stream"] is True and exact["model"] == "fake-model"
    assert info(kclient, created)["completion_tokens"] == 11


def test_unknown_model_costs_nothing_but_counts_tokens(kclient):
    created, auth = make_key(kclient)
    resp = kclient.post("/vllm/v1/completions", headers=auth, json={"model": "fake-model", "prompt": "a b"})
    assert resp.status_code == 200
    totals = info(kclient, created)
    assert totals["spend"] > 0
    kclient.application.extensions["gateway"].accounting.prices = {}
    kclient.post("/vllm/v1/completions", headers=auth, json={"model": "fake-model", "prompt": "a b"})
    again = info(kclient, created)
    assert again["spend"] == pytest.approx(totals["spend"]) and again["total_tokens"] == 2 * totals["total_tokens"]


def test_budget_cut_off_before_vllm(kclient, vllm):
    created, auth = make_key(kclient, max_budget=0.02)   # one request costs 0.013
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    vllm.clear()
    resp = kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT)
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["type"] == "budget_exceeded" and "0.026000" in err["message"] and "0.020000" in err["message"]
    assert vllm.requests() == []
    # raising the budget lets the key work again
    kclient.post("/key/update", headers=MASTER, json={"key": created["key"], "max_budget": 1.0})
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200


def test_budget_resets_on_schedule(kclient):
    created, auth = make_key(kclient, max_budget=0.01, budget_duration="2s")
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
    assert kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 400
    assert info(kclient, created)["budget_reset_at"] is not None
    assert wait_until(lambda: kclient.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200,
                      timeout=5)
    totals = info(kclient, created)
    assert totals["total_spend"] > totals["spend"]  # all-time spend kept, period spend restarted


def test_end_user_tracking(kclient):
    _, auth = make_key(kclient)
    kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "user": "alice"})
    kclient.post("/vllm/v1/chat/completions", headers={**auth, "x-end-user-id": "alice"}, json=CHAT)
    kclient.post("/vllm/v1/chat/completions", headers=MASTER, json={**CHAT, "user": "bob"})
    alice = kclient.get("/end_user/info?end_user_id=alice", headers=MASTER).get_json()
    assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (2, 6, 10)
    assert alice["spend"] == pytest.approx(2 * 0.013)
    assert kclient.get("/end_user/info?end_user_id=bob", headers=MASTER).get_json()["requests"] == 1
    assert kclient.get("/end_user/info?end_user_id=nobody", headers=MASTER).status_code == 404
    assert kclient.get("/end_user/info", headers=MASTER).status_code == 400
    assert kclient.get("/end_user/info?end_user_id=alice", headers=auth).status_code == 403


def test_spend_log_contents_filters_and_pages(kclient):
    created, auth = make_key(kclient, key_alias="logged")
    t0 = time.time()
    for i in range(5):
        kclient.post("/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": f"s-{i}"},
                     json={**CHAT, "user": "carol" if i % 2 else "dave"})
    kclient.post("/vllm/v1/chat/completions", headers={**MASTER, "X-Request-Id": "s-master"}, json=CHAT)
    t1 = time.time()
    logs = kclient.get("/spend/logs", query_string={"key": created["key"]}, headers=MASTER).get_json()["logs"]
    assert [e["request_id"] for e in logs] == ["s-4", "s-3", "s-2", "s-1", "s-0"]   # newest first
    entry = logs[0]
    assert entry["token"] == created["token"] and entry["key_alias"] == "logged" and entry["end_user"] == "dave"
    assert (entry["model"], entry["route"], entry["status"], entry["prompt_tokens"], entry["completion_tokens"]) == \
        ("fake-model", "/v1/chat/completions", 200, 3, 5)
    assert entry["spend"] == pytest.approx(0.013) and entry["stream"] is False and entry["estimated"] is False
    assert t0 <= entry["start_time"] <= entry["end_time"] <= t1 and entry["ttfb_ms"] >= 0
    carol = kclient.get("/spend/logs?end_user=carol", headers=MASTER).get_json()["logs"]
    assert [e["request_id"] for e in carol] == ["s-3", "s-1"]
    page2 = kclient.get("/spend/logs", query_string={"key": created["token"], "size": 2, "page": 2}, headers=MASTER).get_json()
    assert [e["request_id"] for e in page2["logs"]] == ["s-2", "s-1"] and page2["has_more"] is True
    every = kclient.get("/spend/logs", query_string={"start_date": t0, "end_date": t1}, headers=MASTER).get_json()["logs"]
    assert "s-master" in [e["request_id"] for e in every] and len(every) == 6
    none = kclient.get("/spend/logs", query_string={"end_date": t0 - 10}, headers=MASTER).get_json()["logs"]
    assert none == []
    assert kclient.get("/spend/logs?start_date=yesterday", headers=MASTER).status_code == 400
    assert kclient.get("/spend/logs?size=0", headers=MASTER).status_code == 400


def test_rejections_are_logged(kclient):
    created, auth = make_key(kclient, key_alias="denied", models=["other"])
    kclient.post("/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": "r-1"}, json=CHAT)
    logs = kclient.get("/spend/logs?key_alias=denied", headers=MASTER).get_json()["logs"]
    assert logs[0]["request_id"] == "r-1" and logs[0]["status"] == 403 and logs[0]["total_tokens"] == 0


def test_accounting_survives_a_redis_outage(vllm):
    """Master-key traffic during an outage is accounted once Redis answers again."""
    import fakeredis

    from tests.conftest import TEST_PRICES, build_app, gateway_environ

    server = fakeredis.FakeServer()
    client = build_app({"environ": gateway_environ(vllm.url, MODEL_PRICES=TEST_PRICES),
                         "redis": fakeredis.FakeRedis(server=server, decode_responses=True)}).test_client()
    server.connected = False
    for i in range(3):
        resp = client.post("/vllm/v1/chat/completions", headers={**MASTER, "X-Request-Id": f"o-{i}"},
                           json={**CHAT, "user": "erin"})
        assert resp.status_code == 200
    server.connected = True
    client.post("/vllm/v1/chat/completions", headers={**MASTER, "X-Request-Id": "o-3"}, json={**CHAT, "user": "erin"})
    assert client.get("/end_user/info?end_user_id=erin", headers=MASTER).get_json()["requests"] == 4
    ids = {e["request_id"] for e in client.get("/spend/logs", headers=MASTER).get_json()["logs"]}
    assert ids == {"o-0", "o-1", "o-2", "o-3"}
