"""The admin API for virtual keys (/key/*), on fakeredis and on the real Redis."""
import hashlib
import re

import pytest

from gateway.core.redisnames import RedisNames
from tests.conftest import MASTER, wait_until


def gen(client, **fields):
    resp = client.post("/key/generate", headers=MASTER, json=fields)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def all_redis_text(redis_client) -> str:
    """Every key name and value under the test prefix, as one string."""
    out = []
    for name in redis_client.scan_iter(match=redis_client.test_prefix + "*"):
        out.append(name)
        kind = redis_client.type(name)
        if kind == "string":
            out.append(redis_client.get(name))
        elif kind == "zset":
            out += redis_client.zrange(name, 0, -1)
        elif kind == "hash":
            out += [f"{k}={v}" for k, v in redis_client.hgetall(name).items()]
    return "\n".join(out)


def test_generate_with_empty_body(kclient):
    created = gen(kclient)
    key = created["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_\-]{43}", key)  # 32 random bytes
    assert created["token"] == hashlib.sha256(key.encode()).hexdigest()
    assert created["key_name"] == "sk-..." + key[-4:]
    assert created["expires"] is None and created["created_at"].endswith("Z")
    # curl -d '' and no body at all work too
    assert kclient.post("/key/generate", headers=MASTER).status_code == 200


def test_generate_stores_every_field(kclient):
    fields = dict(key_alias="team-a", duration="30d", models=["fake-model"], max_budget=12.5,
                  budget_duration="30d", metadata={"owner": "ana"}, user_id="u1", team_id="t1",
                  rpm_limit=10, tpm_limit=1000, max_parallel_requests=2,
                  allowed_routes=["/v1/*"], blocked=False, tags=["prod"])
    kclient.post("/team/new", headers=MASTER, json={"team_id": "t1"})  # a key's team must exist
    created = gen(kclient, **fields)
    info = kclient.get("/key/info", query_string={"key": created["key"]}, headers=MASTER).get_json()
    for name, value in fields.items():
        assert created[name] == value and info["info"][name] == value, name
    assert info["key"] == created["token"]
    assert created["expires"].endswith("Z")


def test_custom_key(kclient):
    created = gen(kclient, key="sk-my-custom-key-0123456789")
    assert created["key"] == "sk-my-custom-key-0123456789"
    again = kclient.post("/key/generate", headers=MASTER, json={"key": "sk-my-custom-key-0123456789"})
    assert again.status_code == 400 and again.get_json()["error"]["param"] == "key"


@pytest.mark.parametrize("payload, field", [
    ({"duration": "30dx"}, "duration"), ({"duration": "10y"}, "duration"), ({"duration": "0d"}, "duration"),
    ({"duration": 30}, "duration"), ({"duration": ""}, "duration"), ({"budget_duration": "1 day"}, "budget_duration"),
    ({"rpm_limit": -1}, "rpm_limit"), ({"tpm_limit": "10"}, "tpm_limit"), ({"max_parallel_requests": 1.5}, "max_parallel_requests"),
    ({"rpm_limit": True}, "rpm_limit"), ({"max_budget": -0.01}, "max_budget"), ({"max_budget": "5"}, "max_budget"),
    ({"models": "fake-model"}, "models"), ({"models": [1]}, "models[0]"), ({"metadata": []}, "metadata"),
    ({"key_alias": 5}, "key_alias"), ({"key_alias": ""}, "key_alias"), ({"user_id": ["x"]}, "user_id"),
    ({"allowed_routes": ["v1/chat"]}, "allowed_routes[0]"), ({"key": "pk-0123456789abcdefgh"}, "key"),
    ({"key": "sk-short"}, "key"), ({"blocked": "yes"}, "blocked"), ({"tags": [None]}, "tags[0]"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_generate_bad_input_names_the_field(kclient, redis_client, payload, field):
    resp = kclient.post("/key/generate", headers=MASTER, json=payload)
    assert resp.status_code == 400, resp.get_json()
    err = resp.get_json()["error"]
    assert err["param"] == field and field.split("[")[0] in err["message"]
    assert err["type"] == "bad_request_error"
    assert all_redis_text(redis_client) == ""  # nothing written


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_non_object_bodies_are_400(kclient, body):
    resp = kclient.post("/key/generate", headers={**MASTER, "Content-Type": "application/json"}, data=body)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "400"


def test_duplicate_alias_refused(kclient):
    gen(kclient, key_alias="dup")
    resp = kclient.post("/key/generate", headers=MASTER, json={"key_alias": "dup"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "key_alias"


def test_info_by_key_or_token_never_shows_plaintext(kclient):
    created = gen(kclient, key_alias="info-me")
    for ident in (created["key"], created["token"]):
        resp = kclient.get("/key/info", query_string={"key": ident}, headers=MASTER)
        assert resp.status_code == 200
        assert created["key"] not in resp.get_data(as_text=True)
        assert resp.get_json()["info"]["key_alias"] == "info-me"
    resp = kclient.get("/key/info", query_string={"key": "sk-unknown-000000000000"}, headers=MASTER)
    assert resp.status_code == 404 and resp.get_json()["error"]["type"] == "not_found_error"
    assert kclient.get("/key/info", headers=MASTER).get_json() == {"role": "master", "key": None, "info": None}


def test_plaintext_never_stored(kclient, redis_client):
    keys = [gen(kclient, key_alias=f"a{i}", duration="1h")["key"] for i in range(3)]
    stored = all_redis_text(redis_client)
    assert stored  # the records are there...
    for key in keys:
        assert key not in stored and key[3:] not in stored  # ...but no plaintext


def test_list_paginates_and_filters(kclient):
    kclient.post("/team/new", headers=MASTER, json={"team_id": "t"})
    for i in range(5):
        gen(kclient, key_alias=f"k{i}", user_id="u-even" if i % 2 == 0 else "u-odd", team_id="t")
    page1 = kclient.get("/key/list?page=1&size=2", headers=MASTER).get_json()
    page3 = kclient.get("/key/list?page=3&size=2", headers=MASTER).get_json()
    assert (page1["total_count"], page1["total_pages"], page1["current_page"]) == (5, 3, 1)
    assert len(page1["keys"]) == 2 and len(page3["keys"]) == 1
    assert all(re.fullmatch(r"[0-9a-f]{64}", t) for t in page1["keys"])
    evens = kclient.get("/key/list?user_id=u-even&return_full_object=true", headers=MASTER).get_json()
    assert evens["total_count"] == 3 and {k["key_alias"] for k in evens["keys"]} == {"k0", "k2", "k4"}
    one = kclient.get("/key/list?key_alias=k1", headers=MASTER).get_json()
    assert one["total_count"] == 1
    for bad in ("page=0", "size=1000", "page=x", "return_full_object=maybe"):
        assert kclient.get("/key/list?" + bad, headers=MASTER).status_code == 400


def test_list_reads_one_page_of_records_not_every_key(kclient, monkeypatch):
    made = [gen(kclient, user_id="u" if i % 3 == 0 else None)["token"] for i in range(40)]
    store = kclient.application.extensions["gateway"].keystore
    read = []
    original = store._records
    monkeypatch.setattr(store, "_records", lambda tokens: read.extend(tokens) or original(tokens))
    page = kclient.get("/key/list?page=2&size=5", headers=MASTER).get_json()
    assert page["keys"] == made[::-1][5:10] and page["total_count"] == 40
    assert sorted(read) == sorted(page["keys"])  # five records read, not forty
    read.clear()
    mine = kclient.get("/key/list?user_id=u&size=3", headers=MASTER).get_json()
    assert mine["total_count"] == 14 and mine["keys"] == [t for t in made[::-1] if made.index(t) % 3 == 0][:3]
    assert len(read) == 3


def test_list_skips_and_forgets_index_entries_of_vanished_records(kclient, redis_client):
    kept, lost = gen(kclient, user_id="u"), gen(kclient, user_id="u")
    names = RedisNames(redis_client.test_prefix)
    redis_client.delete(names.record(lost["token"]))  # e.g. a write interrupted between index and record
    assert kclient.get("/key/list?user_id=u", headers=MASTER).get_json()["keys"] == [kept["token"]]
    assert redis_client.zrange(names.keys_by_user("u"), 0, -1) == [kept["token"]]


def test_expired_keys_stop_working_and_are_not_listed(kclient, redis_client):
    created = gen(kclient, duration="1s", key_alias="brief")
    auth = {"Authorization": f"Bearer {created['key']}"}
    assert kclient.get("/vllm/v1/models", headers=auth).status_code == 200
    assert wait_until(lambda: kclient.get("/vllm/v1/models", headers=auth).status_code == 401)
    err = kclient.get("/vllm/v1/models", headers=auth).get_json()["error"]
    assert err["type"] == "expired_key" and "expired" in err["message"]
    assert kclient.get("/key/list?key_alias=brief", headers=MASTER).get_json()["total_count"] == 0
    assert redis_client.get(RedisNames(redis_client.test_prefix).record(created["token"])) is None
    # The alias is free again once its key expired.
    assert kclient.post("/key/generate", headers=MASTER, json={"key_alias": "brief"}).status_code == 200


def test_update_fields_alias_and_duration(kclient, redis_client):
    created = gen(kclient, key_alias="before", duration="1h")
    record_key = RedisNames(redis_client.test_prefix).record(created["token"])
    resp = kclient.post("/key/update", headers=MASTER, json={"key": created["key"], "key_alias": "after", "rpm_limit": 5})
    assert resp.status_code == 200 and resp.get_json()["rpm_limit"] == 5
    assert 3500 < redis_client.ttl(record_key) <= 3600  # untouched lifetime
    assert kclient.get("/key/list?key_alias=before", headers=MASTER).get_json()["total_count"] == 0
    resp = kclient.post("/key/update", headers=MASTER, json={"key_alias": "after", "duration": "2h"})
    assert resp.status_code == 200 and 7100 < redis_client.ttl(record_key) <= 7200
    resp = kclient.post("/key/update", headers=MASTER, json={"key": created["token"], "duration": "-1"})
    assert resp.status_code == 200 and resp.get_json()["expires"] is None
    assert redis_client.ttl(record_key) == -1
    assert redis_client.ttl(redis_client.test_prefix + "alias:after") == -1
    # a free alias can be generated again
    assert kclient.post("/key/generate", headers=MASTER, json={"key_alias": "before"}).status_code == 200


@pytest.mark.parametrize("payload, status", [
    ({"key": "sk-nope-nope-nope-nope"}, 404), ({"key_alias": "nobody"}, 404), ({}, 400),
    ({"key": 5}, 400), ({"key": "KEY", "rpm_limit": -5}, 400), ({"key": "KEY", "bogus": 1}, 400),
    ({"key": "KEY", "duration": "forever"}, 400), ({"key": None}, 400),
])
def test_update_bad_input(kclient, payload, status):
    created = gen(kclient, rpm_limit=3)
    payload = {k: (created["key"] if v == "KEY" else v) for k, v in payload.items()}
    resp = kclient.post("/key/update", headers=MASTER, json=payload)
    assert resp.status_code == status, resp.get_json()
    info = kclient.get("/key/info", query_string={"key": created["key"]}, headers=MASTER).get_json()["info"]
    assert info["rpm_limit"] == 3  # nothing changed


def test_delete_by_keys_and_aliases(kclient):
    a, b = gen(kclient), gen(kclient, key_alias="bee")
    resp = kclient.post("/key/delete", headers=MASTER, json={"keys": [a["key"]]})
    assert resp.status_code == 200 and resp.get_json() == {"deleted_keys": [a["key"]]}
    resp = kclient.post("/key/delete", headers=MASTER, json={"key_aliases": ["bee"]})
    assert resp.get_json() == {"deleted_keys": ["bee"]}
    for created in (a, b):
        r = kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {created['key']}"})
        assert r.status_code == 401 and r.get_json()["error"]["message"] == "Invalid API key"
    assert kclient.post("/key/delete", headers=MASTER, json={"keys": [a["key"]]}).status_code == 404
    assert kclient.post("/key/delete", headers=MASTER, json={}).status_code == 400
    assert kclient.post("/key/delete", headers=MASTER, json={"keys": "x"}).status_code == 400


def test_delete_is_all_or_nothing(kclient):
    a = gen(kclient)
    resp = kclient.post("/key/delete", headers=MASTER, json={"keys": [a["key"], "sk-not-a-key-00000000"]})
    assert resp.status_code == 404
    assert kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {a['key']}"}).status_code == 200


def test_regenerate_replaces_the_key(kclient):
    old = gen(kclient, key_alias="rot", rpm_limit=7)
    resp = kclient.post("/key/regenerate", headers=MASTER, json={"key": old["key"]})
    assert resp.status_code == 200
    new = resp.get_json()
    assert new["key"] != old["key"] and new["key_alias"] == "rot" and new["rpm_limit"] == 7
    r = kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {old['key']}"})
    assert r.status_code == 401 and "regenerated" in r.get_json()["error"]["message"]
    assert kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {new['key']}"}).status_code == 200
    assert kclient.get("/key/list?key_alias=rot", headers=MASTER).get_json()["keys"] == [new["token"]]


def test_regenerate_with_grace_period(kclient):
    old = gen(kclient)
    new = kclient.post("/key/regenerate", headers=MASTER, json={"key": old["key"], "grace_period": "1h"}).get_json()
    for key in (old["key"], new["key"]):
        assert kclient.get("/vllm/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    bad = kclient.post("/key/regenerate", headers=MASTER, json={"key": new["key"], "grace_period": "soon"})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "grace_period"


def test_block_and_unblock(kclient):
    created = gen(kclient)
    auth = {"Authorization": f"Bearer {created['key']}"}
    assert kclient.post("/key/block", headers=MASTER, json={"key": created["key"]}).get_json()["blocked"] is True
    r = kclient.get("/vllm/v1/models", headers=auth)
    assert r.status_code == 401 and "blocked" in r.get_json()["error"]["message"]
    assert kclient.post("/key/unblock", headers=MASTER, json={"key": created["key"]}).get_json()["blocked"] is False
    assert kclient.get("/vllm/v1/models", headers=auth).status_code == 200


@pytest.mark.parametrize("route, method", [
    ("/key/generate", "POST"), ("/key/info?key=x", "GET"), ("/key/list", "GET"), ("/key/update", "POST"),
    ("/key/delete", "POST"), ("/key/regenerate", "POST"), ("/key/block", "POST"), ("/key/unblock", "POST"),
])
def test_admin_routes_need_the_master_key(kclient, route, method):
    created = gen(kclient)
    resp = kclient.open(route, method=method, json={}, headers={"Authorization": f"Bearer {created['key']}"})
    assert resp.status_code == 403 and resp.get_json()["error"]["type"] == "permission_error"
    assert kclient.open(route, method=method, json={}).status_code == 401


def test_admin_bodies_are_capped(kclient):
    resp = kclient.post("/key/generate", headers={**MASTER, "Content-Type": "application/json"},
                        data=b'{"metadata": {"x": "' + b"a" * (2 * 1024 * 1024) + b'"}}')
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "413"
