"""Virtual keys across real gunicorn workers and restarts, on the real Redis."""
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
    # No cache: the very next request on either worker sees the revocation.
    call_until_both_workers("after", 401)
    text = gw.stdout.text() + gw.stderr.text()
    assert created["key"] not in text and created["key"][3:] not in text
