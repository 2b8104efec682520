"""A key and the copies it was regenerated from are one logical key (issue 12, point 1).

After /key/regenerate with a grace period the old key keeps working for a while; block, update
and delete addressed to any copy (or the alias) reach every live copy, and info/list show the
old copy as superseded with its true expiry. On fakeredis and on the real Redis.
"""
import time

import pytest

from gateway.core.redisconn import is_cluster
from gateway.core.redisnames import RedisNames
from gateway.keys.store import KeyStore
from tests.conftest import MASTER
from tests.test_keys import gen

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def works(client, key) -> bool:
    status = client.get("/vllm/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
    assert status in (200, 401), status
    return status == 200


def regen(client, key, grace="1h", **extra):
    resp = client.post("/key/regenerate", headers=MASTER, json={"key": key, "grace_period": grace, **extra})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def info(client, key) -> dict:
    resp = client.get("/key/info", headers=MASTER, query_string={"key": key})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["info"]


@pytest.fixture
def rotated(kclient):
    """(old, new): a key with alias 'rot' regenerated with a one-hour grace period."""
    old = gen(kclient, key_alias="rot", rpm_limit=7)
    new = regen(kclient, old["key"])
    assert works(kclient, old["key"]) and works(kclient, new["key"])
    return old, new


@pytest.mark.parametrize("address", ["alias", "new", "old"])
def test_block_reaches_the_copy_in_its_grace_period(kclient, rotated, address):
    old, new = rotated
    target = {"alias": {"key_alias": "rot"}, "new": {"key": new["key"]}, "old": {"key": old["key"]}}[address]
    assert kclient.post("/key/block", headers=MASTER, json=target).status_code == 200
    assert not works(kclient, old["key"]) and not works(kclient, new["key"])
    assert info(kclient, old["token"])["blocked"] is True
    assert kclient.post("/key/unblock", headers=MASTER, json=target).status_code == 200
    assert works(kclient, old["key"]) and works(kclient, new["key"])


def test_update_reaches_the_copy(kclient, rotated):
    old, new = rotated
    resp = kclient.post("/key/update", headers=MASTER, json={"key_alias": "rot", "models": ["other-model"]})
    assert resp.status_code == 200
    chat = kclient.post("/vllm/v1/chat/completions", headers={"Authorization": f"Bearer {old['key']}"}, json=CHAT)
    assert chat.status_code == 403 and chat.get_json()["error"]["type"] == "key_model_access_denied"
    assert info(kclient, old["token"])["models"] == ["other-model"]


def test_a_shorter_duration_on_the_head_cuts_the_copys_grace(kclient, rotated):
    old, new = rotated
    assert kclient.post("/key/update", headers=MASTER, json={"key": new["key"], "duration": "10m"}).status_code == 200
    head, copy = info(kclient, new["token"]), info(kclient, old["token"])
    assert copy["expires"] == head["expires"]
    assert head["previous_tokens"] == [{"token": old["token"], "expires": head["expires"]}]


@pytest.mark.parametrize("address", ["alias", "old"])
def test_delete_reaches_the_copy(kclient, redis_client, rotated, address):
    old, new = rotated
    body = {"key_aliases": ["rot"]} if address == "alias" else {"keys": [old["key"]]}
    assert kclient.post("/key/delete", headers=MASTER, json=body).status_code == 200
    assert not works(kclient, old["key"]) and not works(kclient, new["key"])
    assert kclient.get("/key/list", headers=MASTER).get_json()["keys"] == []
    assert not list(redis_client.scan_iter(match=redis_client.test_prefix + "key:*"))


def test_info_and_list_show_the_superseded_copy_with_its_true_expiry(kclient, rotated):
    old, new = rotated
    copy = info(kclient, old["key"])
    assert copy["status"] == "superseded" and copy["superseded_by"] == new["token"]
    assert copy["expires"] is not None
    assert 3590 <= time.mktime(time.strptime(copy["expires"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime()) <= 3601
    head = info(kclient, new["key"])
    assert head["expires"] is None and "status" not in head
    assert head["previous_tokens"] == [{"token": old["token"], "expires": copy["expires"]}]
    listed = kclient.get("/key/list?key_alias=rot&return_full_object=true", headers=MASTER).get_json()["keys"]
    assert {(k["token"], k.get("status")) for k in listed} == {(new["token"], None), (old["token"], "superseded")}


def test_a_chain_of_regenerations_keeps_every_live_copy_reachable(kclient):
    a = gen(kclient, key_alias="chain")
    b = regen(kclient, a["key"], "1h")
    c = regen(kclient, b["key"], "2h")
    assert all(works(kclient, k["key"]) for k in (a, b, c))
    assert info(kclient, a["key"])["superseded_by"] == c["token"]
    assert {p["token"] for p in info(kclient, c["key"])["previous_tokens"]} == {a["token"], b["token"]}
    # Addressed by the oldest copy, the block reaches the head and the middle copy too.
    assert kclient.post("/key/block", headers=MASTER, json={"key": a["key"]}).status_code == 200
    assert not any(works(kclient, k["key"]) for k in (a, b, c))


def test_regenerating_without_grace_ends_every_old_copy(kclient):
    a = gen(kclient, key_alias="now")
    b = regen(kclient, a["key"], "1h")
    c = regen(kclient, b["key"], None)
    assert not works(kclient, a["key"]) and not works(kclient, b["key"]) and works(kclient, c["key"])
    assert "previous_tokens" not in info(kclient, c["key"]) or info(kclient, c["key"])["previous_tokens"] == []


def test_the_copy_spends_the_heads_budget(kclient, rotated):
    old, new = rotated
    assert kclient.post("/vllm/v1/chat/completions", headers={"Authorization": f"Bearer {old['key']}"},
                        json=CHAT).status_code == 200
    assert info(kclient, new["token"])["spend"] > 0


def test_every_affected_token_is_evicted_and_published(redis_client):
    """Each worker caches records for up to KEY_CACHE_TTL: a block must evict the old copy too."""
    names = RedisNames(redis_client.test_prefix)
    store = KeyStore(redis_client, names, cache_ttl=30, cache=True)
    store.cache.listen_in_background = lambda: None  # no gevent here; the publish is read below
    old = store.generate({"key_alias": "cached"}, caller="master")
    new = store.regenerate(store.find(key=old["key"]), 3600, caller="master")
    assert store.authenticate(old["key"]).token == new["token"]  # cached now
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    sharded = is_cluster(redis_client)  # a cluster publishes on a sharded channel
    pubsub.ssubscribe(names.key_changes) if sharded else pubsub.subscribe(names.key_changes)
    store.update(store.find(alias="cached"), {"blocked": True}, caller="master", action="block")
    published = set()
    deadline = time.monotonic() + 5
    while len(published) < 2 and time.monotonic() < deadline:
        message = (pubsub.get_sharded_message(timeout=1) if sharded else pubsub.get_message(timeout=1))
        if message:
            published.add(message["data"])
    pubsub.close()
    assert published == {old["token"], new["token"]}
    with pytest.raises(Exception, match="blocked"):
        store.authenticate(old["key"])


def test_a_concurrent_update_within_the_same_second_is_not_lost(redis_client):
    """Another admin's update landing between this update's read and its write makes this one
    start again, even within one second (records carry updated_at to the second only)."""
    store = KeyStore(redis_client, RedisNames(redis_client.test_prefix), cache=False)
    created = store.generate({"key_alias": "race"}, caller="master")
    index, raced = store._index, []

    def index_then_race(record, before=None):
        index(record, before)
        if not raced:
            raced.append(True)
            store.update(store.find(key=created["key"]), {"rpm_limit": 7}, caller="other-admin")

    store._index = index_then_race
    store.update(store.find(key=created["key"]), {"tpm_limit": 9}, caller="master")
    final = store.find(key=created["key"])
    assert raced and (final["rpm_limit"], final["tpm_limit"]) == (7, 9)
