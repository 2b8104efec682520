"""What a key's holder may read about that key alone (GET /key/info, GET /key/usage), and the
facts the console shows operators: last use, alias search, key aliases in the usage report."""
import time

import pytest

from tests.conftest import MASTER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def make_key(client, **fields):
    resp = client.post("/key/generate", headers=MASTER, json=fields)
    assert resp.status_code == 200, resp.get_json()
    created = resp.get_json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def chat(client, auth, times=1):
    for _ in range(times):
        assert client.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200


def test_a_virtual_key_reads_its_own_info_with_what_its_limits_leave(kclient):
    created, auth = make_key(kclient, key_alias="mine", rpm_limit=10, tpm_limit=1000, max_parallel_requests=3,
                             max_budget=5.0, budget_duration="30d", models=["fake-model"],
                             allowed_routes=["/v1/chat/completions"])
    chat(kclient, auth, 2)
    body = kclient.get("/key/info", headers=auth).get_json()
    assert body["role"] == "key" and body["key"] == created["token"]
    info = body["info"]
    assert (info["key_alias"], info["models"], info["allowed_routes"]) == ("mine", ["fake-model"], ["/v1/chat/completions"])
    assert info["requests"] == 2 and info["spend"] == pytest.approx(2 * (3 * 0.001 + 5 * 0.002))
    assert info["max_budget"] == 5.0 and info["budget_reset_at"].endswith("Z")
    limits = info["limits"]
    assert limits["rpm"]["limit"] == 10 and limits["rpm"]["used"] == 2 and limits["rpm"]["remaining"] == 8
    assert limits["tpm"]["used"] == 16 and limits["tpm"]["remaining"] == 984  # 8 tokens per request
    assert limits["rpm"]["resets_at"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    assert limits["parallel"] == {"limit": 3, "in_use": 0, "remaining": 3}
    assert "key" not in info  # the plaintext key is shown once, at creation, never again
    # naming itself explicitly, by key or by token, is the same
    for ident in (created["key"], created["token"]):
        assert kclient.get("/key/info", headers=auth, query_string={"key": ident}).get_json()["key"] == created["token"]


def test_a_key_without_limits_shows_none(kclient):
    _, auth = make_key(kclient)
    assert kclient.get("/key/info", headers=auth).get_json()["info"]["limits"] == {"rpm": None, "tpm": None, "parallel": None}


def test_a_virtual_key_cannot_read_another_key(kclient):
    other, _ = make_key(kclient, key_alias="theirs")
    _, auth = make_key(kclient, key_alias="mine")
    for ident in (other["key"], other["token"]):
        for route in ("/key/info", "/key/usage"):
            resp = kclient.get(route, headers=auth, query_string={"key": ident})
            assert resp.status_code == 403 and resp.get_json()["error"]["type"] == "permission_error"
            assert "theirs" not in resp.get_data(as_text=True)
    # and the rest of the admin API stays closed to it
    for route in ("/key/list", "/spend/report", "/spend/logs", "/audit/logs", "/replicas"):
        assert kclient.get(route, headers=auth).status_code == 403


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-key-at-all-000"}])
def test_self_service_routes_refuse_a_missing_or_wrong_key(kclient, headers):
    for route in ("/key/info", "/key/usage"):
        resp = kclient.get(route, headers=headers)
        assert resp.status_code == 401 and "sk-not-a-key" not in resp.get_data(as_text=True)


def test_a_blocked_key_is_refused_like_on_the_relay(kclient):
    created, auth = make_key(kclient)
    kclient.post("/key/block", headers=MASTER, json={"key": created["key"]})
    resp = kclient.get("/key/info", headers=auth)
    assert resp.status_code == 401 and "blocked" in resp.get_json()["error"]["message"]


def test_the_master_key_learns_its_role_and_reads_any_key(kclient):
    created, _ = make_key(kclient, key_alias="any")
    assert kclient.get("/key/info", headers=MASTER).get_json() == {"role": "master", "key": None, "info": None}
    body = kclient.get("/key/info", headers=MASTER, query_string={"key": created["key"]}).get_json()
    assert body["role"] == "master" and body["info"]["key_alias"] == "any" and "limits" not in body["info"]


def test_own_usage_over_time_comes_from_the_counters(kclient):
    created, auth = make_key(kclient, key_alias="user")
    other, other_auth = make_key(kclient)
    chat(kclient, auth, 3)
    chat(kclient, other_auth, 5)
    report = kclient.get("/key/usage", headers=auth, query_string={"interval": "hour"}).get_json()
    assert report["key"] == created["token"] and report["key_alias"] == "user"
    assert len(report["buckets"]) == 24 and report["interval"] == "hour"
    assert report["requests"][-1] == 3 and sum(report["requests"]) == 3
    assert report["totals"] == {"requests": 3, "prompt_tokens": 9, "completion_tokens": 15, "total_tokens": 24,
                                "spend": pytest.approx(3 * 0.013)}
    daily = kclient.get("/key/usage", headers=auth).get_json()
    assert len(daily["buckets"]) == 30 and daily["totals"]["requests"] == 3
    # the master key reads the same by naming the key, and must name one
    assert kclient.get("/key/usage", headers=MASTER, query_string={"key": created["key"], "interval": "hour"}
                       ).get_json()["requests"] == report["requests"]
    assert kclient.get("/key/usage", headers=MASTER).status_code == 400


def test_usage_before_a_regenerate_stays_with_the_key(kclient):
    created, auth = make_key(kclient, key_alias="rolling")
    chat(kclient, auth, 2)
    new = kclient.post("/key/regenerate", headers=MASTER, json={"key": created["key"], "grace_period": "1h"}).get_json()
    chat(kclient, {"Authorization": f"Bearer {new['key']}"}, 1)
    for holder in (auth, {"Authorization": f"Bearer {new['key']}"}):  # the old copy reads the key it belongs to
        report = kclient.get("/key/usage", headers=holder).get_json()
        assert report["key"] == new["token"] and report["totals"]["requests"] == 3


@pytest.mark.parametrize("args, param", [({"interval": "week"}, "interval"), ({"start_date": "yesterday"}, "start_date"),
                                         ({"start_date": "2026-02-01", "end_date": "2026-01-01"}, "start_date"),
                                         ({"interval": "hour", "start_date": "2020-01-01"}, "start_date"),
                                         ({"verbose": "1"}, "verbose")])
def test_bad_usage_arguments_are_named(kclient, args, param):
    _, auth = make_key(kclient)
    resp = kclient.get("/key/usage", headers=auth, query_string=args)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param


def test_last_use_is_recorded_and_only_moves_forward(kclient):
    created, auth = make_key(kclient)
    assert kclient.get("/key/info", headers=auth).get_json()["info"]["last_used_at"] is None
    before = time.time()
    chat(kclient, auth)
    shown = kclient.get("/key/info", headers=MASTER, query_string={"key": created["key"]}).get_json()["info"]["last_used_at"]
    assert shown is not None and shown >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(before)))
    listed = kclient.get("/key/list", headers=MASTER, query_string={"return_full_object": "true", "size": 100}).get_json()
    assert {k["token"]: k["last_used_at"] for k in listed["keys"]}[created["token"]] == shown


def test_settling_an_older_batch_never_moves_last_use_back(kclient):
    from gateway.usage.accounting import Charge

    created, auth = make_key(kclient)
    chat(kclient, auth)
    services = kclient.application.extensions["gateway"]
    shown = kclient.get("/key/info", headers=auth).get_json()["info"]["last_used_at"]
    late = Charge(created["token"], "all", services.budgets.next_sequence())
    late.last_used = 1_000_000.0  # a batch from another worker, of requests that ended long ago
    pipe = services.redis.pipeline(transaction=False)
    services.budgets.queue_settle(pipe, late)
    pipe.execute()
    assert kclient.get("/key/info", headers=auth).get_json()["info"]["last_used_at"] == shown


def test_alias_search_is_by_prefix_ignoring_case_and_pages(kclient):
    for alias in ("Alpha-1", "alpha-2", "ALPINE", "beta", "al"):
        make_key(kclient, key_alias=alias)
    make_key(kclient)  # no alias: never matches

    def search(text, **args):
        return kclient.get("/key/list", headers=MASTER,
                           query_string={"search": text, "return_full_object": "true", **args}).get_json()

    found = search("AL")
    assert found["total_count"] == 4
    assert [k["key_alias"] for k in found["keys"]] == ["al", "Alpha-1", "alpha-2", "ALPINE"]  # alphabetical
    assert [k["key_alias"] for k in search("alp", size=2, page=2)["keys"]] == ["ALPINE"]
    assert search("alpha")["total_count"] == 2 and search("gamma")["total_count"] == 0
    assert search("")["total_count"] == 6  # empty: the plain listing


def test_alias_search_follows_renames_and_deletes(kclient):
    created, _ = make_key(kclient, key_alias="old-name")
    gone, _ = make_key(kclient, key_alias="old-timer")
    kclient.post("/key/update", headers=MASTER, json={"key": created["key"], "key_alias": "new-name"})
    kclient.post("/key/delete", headers=MASTER, json={"keys": [gone["key"]]})

    def aliases(text):
        return [k["key_alias"] for k in kclient.get("/key/list", headers=MASTER, query_string={
            "search": text, "return_full_object": "true"}).get_json()["keys"]]

    assert aliases("old") == [] and aliases("new") == ["new-name"]


def test_keys_made_before_the_search_index_are_added_once_at_start(kclient, kapp, redis_client):
    from gateway.core.redisnames import RedisNames

    make_key(kclient, key_alias="early-one")
    make_key(kclient, key_alias="early-two")
    names = RedisNames(redis_client.test_prefix)
    redis_client.delete(names.keys_by_alias, names.keys_by_alias_built)  # as an earlier version left Redis
    keystore = kapp.extensions["gateway"].keystore
    assert keystore.build_alias_search() == 2
    assert keystore.build_alias_search() == 0  # done once: the marker stays
    found = kclient.get("/key/list", headers=MASTER, query_string={"search": "early"}).get_json()
    assert found["total_count"] == 2


@pytest.mark.parametrize("text", ["x" * 257])
def test_bad_search_text_is_refused(kclient, text):
    resp = kclient.get("/key/list", headers=MASTER, query_string={"search": text})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "search"


def test_the_usage_report_by_key_names_each_keys_alias(kclient):
    named, auth = make_key(kclient, key_alias="named")
    _, bare = make_key(kclient)
    chat(kclient, auth)
    chat(kclient, bare)
    chat(kclient, MASTER)
    series = kclient.get("/spend/report", headers=MASTER, query_string={"group_by": "key"}).get_json()["series"]
    aliases = {s["group"]: s["key_alias"] for s in series}
    assert aliases[named["token"]] == "named" and aliases["master"] is None and None in aliases.values()


def test_the_usage_report_counts_a_regenerated_key_as_one_key(kclient):
    created, auth = make_key(kclient, key_alias="rolled")
    chat(kclient, auth, 2)
    first = kclient.post("/key/regenerate", headers=MASTER, json={"key": created["key"], "grace_period": "1h"}).get_json()
    chat(kclient, {"Authorization": f"Bearer {first['key']}"}, 1)
    second = kclient.post("/key/regenerate", headers=MASTER, json={"key": first["key"]}).get_json()  # no grace
    chat(kclient, {"Authorization": f"Bearer {second['key']}"}, 1)
    series = kclient.get("/spend/report", headers=MASTER, query_string={"group_by": "key", "interval": "hour"}
                         ).get_json()["series"]
    mine = [s for s in series if s["key_alias"] == "rolled" or s["group"] in (created["token"], first["token"])]
    assert [s["group"] for s in mine] == [second["token"]]
    assert mine[0]["totals"]["requests"] == 4 and mine[0]["requests"][-1] == 4
    assert mine[0]["totals"]["spend"] == pytest.approx(4 * 0.013)
