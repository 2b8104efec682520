"""Indexed spend-log queries and the usage report, through the app and on a Redis Cluster.

The app tests empty the global stream after the traffic: what a filtered /spend/logs query still
returns can only have come from the per-key, per-end-user or request-id index. The cluster test
writes a batch through the gateway's RedisCluster pipeline (single-key commands only, no EVALSHA) and reads
every index back.
"""
import time

import pytest

from gateway.core.redisnames import RedisNames
from gateway.usage.spendlog import SpendLog
from tests.conftest import MASTER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def make_key(client, **fields):
    created = client.post("/key/generate", headers=MASTER, json=fields).get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def logged(client, **query) -> list[str]:
    resp = client.get("/spend/logs", query_string=query, headers=MASTER)
    assert resp.status_code == 200, resp.get_json()
    return [e["request_id"] for e in resp.get_json()["logs"]]


def test_filtered_spend_logs_come_from_the_indexes(kclient, redis_client):
    created, auth = make_key(kclient, key_alias="indexed")
    other, other_auth = make_key(kclient)
    for i in range(3):
        kclient.post("/vllm/v1/chat/completions", headers={**auth, "X-Request-Id": f"i-{i}"},
                     json={**CHAT, "user": "ivy" if i else "jon"})
    kclient.post("/vllm/v1/chat/completions", headers={**other_auth, "X-Request-Id": "i-1"},
                 json={**CHAT, "user": "ivy"})  # the caller chose a request id already used
    redis_client.delete(RedisNames(redis_client.test_prefix).spend_log)
    assert logged(kclient) == []
    assert logged(kclient, key=created["key"]) == ["i-2", "i-1", "i-0"]
    assert logged(kclient, key_alias="indexed") == ["i-2", "i-1", "i-0"]
    assert logged(kclient, end_user="ivy") == ["i-1", "i-2", "i-1"]
    assert logged(kclient, end_user="ivy", key_alias="indexed") == ["i-2", "i-1"]
    both = kclient.get("/spend/logs?request_id=i-1", headers=MASTER).get_json()["logs"]
    assert [e["token"] for e in both] == [other["token"], created["token"]]
    assert logged(kclient, request_id="i-1", key=other["token"]) == ["i-1"]
    page = kclient.get("/spend/logs", query_string={"key_alias": "indexed", "size": 2, "page": 2},
                       headers=MASTER).get_json()
    assert [e["request_id"] for e in page["logs"]] == ["i-0"] and page["has_more"] is False


def test_usage_report_by_key_model_and_end_user(kclient):
    created, auth = make_key(kclient, key_alias="reported")
    for user in ("kim", "kim", "lou"):
        kclient.post("/vllm/v1/chat/completions", headers=auth, json={**CHAT, "user": user})
    kclient.post("/vllm/v1/chat/completions", headers=MASTER, json=CHAT)
    report = kclient.get("/spend/report?group_by=key&interval=hour", headers=MASTER).get_json()
    assert len(report["buckets"]) == 24 and report["interval"] == "hour"
    keys = {s["group"]: s["totals"] for s in report["series"]}
    assert keys[created["token"]]["requests"] == 3 and keys["master"]["requests"] == 1
    assert keys[created["token"]]["spend"] == pytest.approx(3 * 0.013)
    assert report["series"][0]["requests"][-1] == 3  # the current hour is the last bucket
    users = kclient.get("/spend/report?group_by=end_user", headers=MASTER).get_json()
    assert len(users["buckets"]) == 30
    assert {s["group"]: s["totals"]["requests"] for s in users["series"]} == {"kim": 2, "lou": 1}
    models = kclient.get("/spend/report?group_by=model&interval=day&start_date=2020-01-01&end_date=2020-01-03",
                         headers=MASTER).get_json()
    assert models["buckets"] == ["2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z", "2020-01-03T00:00:00Z"]
    assert models["series"] == []


@pytest.mark.parametrize("query", ["group_by=organization", "interval=week", "limit=0", "limit=x", "bogus=1",
                                   "start_date=2026-02-01&end_date=2026-01-01",
                                   "interval=hour&start_date=2020-01-01&end_date=2026-01-01"])
def test_usage_report_bad_arguments_are_400(kclient, query):
    resp = kclient.get("/spend/report?" + query, headers=MASTER)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["message"]


def test_usage_report_is_master_only(kclient):
    _, auth = make_key(kclient)
    assert kclient.get("/spend/report", headers=auth).status_code == 403


# -- Redis Cluster ------------------------------------------------------------------------------
@pytest.fixture
def cluster(shared_cluster):
    """The gateway's own client for the shared test cluster (3 masters + 3 replicas)."""
    from tests.conftest import gateway_redis

    client = gateway_redis(shared_cluster)
    yield client
    for name in client.scan_iter(match="cl-spendlog:*", count=500):
        client.delete(name)
    client.close()


def test_a_batch_is_written_and_read_on_a_redis_cluster(cluster):
    log = SpendLog(cluster, RedisNames("cl-spendlog:"), 1000)
    now = time.time()
    entries = [{"request_id": f"c-{i}", "token": f"{i % 3:x}" * 64, "end_user": f"eu-{i % 4}", "model": "m",
                "status": 200, "prompt_tokens": 1, "completion_tokens": 2, "spend": 0.5,
                "start_time": now, "end_time": now, "duration_ms": 1.0} for i in range(24)]
    pipe = cluster.pipeline(transaction=False)
    log.queue_batch(pipe, entries)
    pipe.execute()
    slots = {cluster.keyslot(name) for name in cluster.scan_iter(match="cl-spendlog:*")}
    assert len({cluster.get_node_from_key(f"x{{{s}}}").name for s in range(100)}) == 3
    assert len(slots) > 10  # the batch really spanned slots (and nodes)
    assert [e["request_id"] for e in log.query(token="1" * 64, size=3)["logs"]] == ["c-22", "c-19", "c-16"]
    assert len(log.query(end_user="eu-2")["logs"]) == 6
    assert [e["token"] for e in log.query(request_id="c-5")["logs"]] == ["2" * 64]
    assert log.query(token="0" * 64, end_user="eu-0")["logs"][0]["request_id"] == "c-12"
    report = log.counters.report("end_user", "hour", now, now)
    assert {s["group"]: s["totals"]["requests"] for s in report["series"]} == {f"eu-{i}": 6 for i in range(4)}
    assert log.end_user_totals("eu-1")["requests"] == 6
