"""Virtual keys across real gunicorn workers and restarts, on the real Redis."""
import time

import requests

from tests.conftest import MASTER, REAL_REDIS_URL, gateway_environ


def gen(url, **fields):
    resp = requests.post(url + "/key/generate", headers=MASTER, json=fields, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_keys_survive_a_gateway_restart(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix)
    first = start_gateway(env)
    created = gen(first.url, key_alias="survivor")
    first.stop()
    second = start_gateway(env)
    resp = requests.get(second.url + "/vllm/v1/models", headers={"Authorization": f"Bearer {created['key']}"})
    assert resp.status_code == 200


def test_two_workers_share_keys_and_revocation(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix)
    gw = start_gateway(env, workers=2)
    created = gen(gw.url)
    auth = {"Authorization": f"Bearer {created['key']}"}

    def call_until_both_workers(tag, expected_status):
        """Concurrent bursts on fresh connections until both workers have answered (bounded)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(i):
            return requests.get(gw.url + "/vllm/v1/models", timeout=10,
                                headers={**auth, "X-Request-Id": f"{tag}-{i}", "Connection": "close",
                                         "x-fake-delay-ms": "20"}).status_code

        sent, statuses = 0, []
        with ThreadPoolExecutor(16) as pool:
            for _ in range(30):
                statuses += list(pool.map(one, range(sent, sent + 32)))
                sent += 32
                gw.stdout.wait_for(f'"request_id":"{tag}-{sent - 1}"')
                lines = [line for line in gw.access_lines() if line["request_id"].startswith(tag + "-")]
                if len({line["worker"] for line in lines}) == 2 and len(lines) == sent:
                    break
        workers = {line["worker"] for line in gw.access_lines() if line["request_id"].startswith(tag + "-")}
        assert len(workers) == 2, "both workers should have answered"
        assert set(statuses) == {expected_status}

    call_until_both_workers("before", 200)
    assert requests.post(gw.url + "/key/block", headers=MASTER, json={"key": created["token"]}).status_code == 200
    # The promise is "on every worker within one second" (workers cache records for under a
    # second and evict on a published change): from one second on, every worker refuses.
    time.sleep(1.0)
    call_until_both_workers("after", 401)
    text = gw.stdout.text() + gw.stderr.text()
    assert created["key"] not in text and created["key"][3:] not in text


def test_revocation_reaches_every_worker_through_the_change_channel(vllm, start_gateway, real_redis_prefix):
    """With a 60 s cache only the published change can make a worker refuse a blocked key."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import wait_until

    _, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                                       KEY_CACHE_TTL=60), workers=2)
    created = gen(gw.url)
    auth = {"Authorization": f"Bearer {created['key']}", "Connection": "close"}

    def burst():
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda _: requests.get(gw.url + "/vllm/v1/models", headers=auth, timeout=10).status_code,
                                 range(64)))

    assert set(burst()) == {200}  # records are now cached in the workers that served them
    assert requests.post(gw.url + "/key/block", headers=MASTER, json={"key": created["token"]}).status_code == 200
    assert wait_until(lambda: set(burst()) == {401}, timeout=5)
    assert set(burst()) == {401}
