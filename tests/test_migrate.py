"""The migration command: a keyspace of the earlier layout (untagged records, one `keys` index)
moved in place and copied to another server, with no key, alias or cent of spend lost."""
import json
import logging
import os
import subprocess
import sys

import pytest

from gateway.core.redisnames import RedisNames
from gateway.keys.migrate import Migration, total_spend
from tests.conftest import (MASTER, ROOT, TEST_PRICES, _purge, build_app, gateway_environ, gateway_redis,
                            topology_environ)
from tests.e2e.redis_server import own_redis_factory  # noqa: F401 (fixture)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def old_layout(client, prefix, vllm_url, keys=5):
    """Keys made and used by a gateway, then stored under the names the earlier layout used."""
    app = build_app({"environ": gateway_environ(vllm_url, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES),
                     "redis": client})
    web = app.test_client()
    made = []
    for i in range(keys):
        created = web.post("/key/generate", headers=MASTER,
                           json={"key_alias": f"k{i}", "user_id": f"u{i % 2}", "max_budget": 10,
                                 **({"duration": "1h"} if i % 2 else {})}).get_json()
        for _ in range(i + 1):
            auth = {"Authorization": f"Bearer {created['key']}"}
            assert web.post("/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200
        made.append(created)
    names = RedisNames(prefix)
    for name in (names.keys_by_created, names.keys_by_expiry, names.keys_by_user("u0"), names.keys_by_user("u1")):
        client.delete(name)
    for created in made:
        token = created["token"]
        client.rename(names.record(token), f"{prefix}key:{token}")
        if client.exists(names.gone(token)):
            client.rename(names.gone(token), f"{prefix}gone:{token}")
        client.zadd(f"{prefix}keys", {token: json.loads(client.get(f"{prefix}key:{token}"))["expires_at"] or "+inf"})
    return made, web


def check_served(web, made):
    for i, created in enumerate(made):
        info = web.get("/key/info", query_string={"key": created["key"]}, headers=MASTER).get_json()["info"]
        assert info["requests"] == i + 1 and info["key_alias"] == f"k{i}"
        auth = {"Authorization": f"Bearer {created['key']}"}
        assert web.get("/vllm/v1/models", headers=auth).status_code == 200
    listed = web.get("/key/list?size=100", headers=MASTER).get_json()
    assert listed["total_count"] == len(made)
    assert web.get("/key/list?user_id=u1", headers=MASTER).get_json()["total_count"] == len(made) // 2
    assert web.get("/key/list?key_alias=k3", headers=MASTER).get_json()["keys"] == [made[3]["token"]]


def test_in_place_migration_keeps_every_key_alias_and_cent(real_redis_prefix, vllm, caplog):
    client, prefix = real_redis_prefix
    made, web = old_layout(client, prefix, vllm.url)
    spend = total_spend(client, RedisNames(prefix))
    # Before: the keys are invisible to this version, and a starting worker says what to run.
    assert web.get("/vllm/v1/models", headers={"Authorization": f"Bearer {made[0]['key']}"}).status_code == 401
    with caplog.at_level(logging.WARNING, logger="gateway"):
        build_app({"environ": gateway_environ(vllm.url, REDIS_KEY_PREFIX=prefix), "redis": client})
    assert "python -m gateway.keys.migrate" in caplog.text

    assert Migration(client, client, prefix).run(dry_run=True)
    assert client.exists(f"{prefix}key:{made[0]['token']}")  # a dry run changes nothing

    assert Migration(client, client, prefix).run()
    check_served(web, made)
    assert total_spend(client, RedisNames(prefix)) == pytest.approx(spend) and spend > 0
    assert not client.exists(f"{prefix}keys")
    assert 3500 < client.ttl(RedisNames(prefix).record(made[1]["token"])) <= 3600  # lifetimes kept

    again = Migration(client, client, prefix)
    assert again.run() and again.moved == 0  # a second run finds nothing to move
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        build_app({"environ": gateway_environ(vllm.url, REDIS_KEY_PREFIX=prefix), "redis": client})
    assert "migrate" not in caplog.text


@pytest.mark.parametrize("target_kind", ["single node", "cluster"])
def test_copy_to_another_server_through_the_command(real_redis_prefix, vllm, own_redis_factory, request,
                                                     target_kind):
    client, prefix = real_redis_prefix
    made, _ = old_layout(client, prefix, vllm.url, keys=4)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    if target_kind == "cluster":  # a sharded target: every name lands in its own slot
        cluster = request.getfixturevalue("shared_cluster")
        env.update(topology_environ(cluster))
        moved = gateway_redis(cluster)
    else:
        target = own_redis_factory()
        env["REDIS_URL"] = target.url
        moved = target.client()
    env["REDIS_KEY_PREFIX"] = prefix
    done = subprocess.run([sys.executable, "-m", "gateway.keys.migrate", "--from", _url(client)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check: 4 keys on the source, 4 on the target" in done.stdout
    request.addfinalizer(lambda: _purge(moved, prefix))

    app = build_app({"environ": gateway_environ(vllm.url, REDIS_KEY_PREFIX=prefix), "redis": moved})
    check_served(app.test_client(), made)
    assert total_spend(moved, RedisNames(prefix)) == pytest.approx(total_spend(client, RedisNames(prefix)))
    record = json.loads(moved.get(RedisNames(prefix).record(made[0]["token"])))
    assert record["key_alias"] == "k0"


def _url(client) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
