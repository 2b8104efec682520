"""Redis refusing the gateway on a real redis-server: a replica after a failover (READONLY) and
a server at maxclients. Virtual keys get 503, the master key is served, accounting is written once
Redis answers again, and the worker logs one line per incident with the setting to fix."""
import requests

from tests.conftest import MASTER, TEST_PRICES, free_port, gateway_environ, wait_until
from tests.e2e.redis_server import own_redis_factory  # noqa: F401 (fixture)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def chat(gw, headers, **extra):
    return requests.post(gw.url + "/vllm/v1/chat/completions", headers=headers, json={**CHAT, **extra}, timeout=10)


def make_key(gw, **fields):
    created = requests.post(gw.url + "/key/generate", headers=MASTER, json=fields).json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def requests_of(gw, created) -> int:
    return requests.get(gw.url + "/key/info", params={"key": created["key"]}, headers=MASTER).json()["info"]["requests"]


def end_user_requests(gw, end_user) -> int | None:
    resp = requests.get(gw.url + "/end_user/info", params={"end_user_id": end_user}, headers=MASTER)
    return resp.json().get("requests")


def log_lines(gw, words: str) -> list[str]:
    """The worker's warnings that start with `words` (an incident's first line names its cause)."""
    return [line for line in gw.stderr.lines if line and line.startswith(words)]


def test_a_read_only_replica_is_an_outage_and_loses_no_accounting(vllm, start_gateway, own_redis_factory):
    server = own_redis_factory()
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=server.url, REDIS_SOCKET_TIMEOUT=0.5,
                                       MODEL_PRICES=TEST_PRICES))
    limited, limited_auth = make_key(gw, rpm_limit=1000)
    plain, plain_auth = make_key(gw)
    admin = server.client()
    admin.replicaof("127.0.0.1", free_port())  # its primary is gone: reads are served, writes refused
    refused = chat(gw, limited_auth)  # admission writes (rpm): refused
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    for _ in range(2):
        assert chat(gw, plain_auth, user="ro-user").status_code == 200  # only reads on its path
        assert chat(gw, MASTER, user="ro-user").status_code == 200
    assert chat(gw, limited_auth).status_code == 503
    admin.replicaof("NO", "ONE")
    # The requests served during the incident are written once Redis takes writes again.
    assert wait_until(lambda: requests_of(gw, plain) == 2, timeout=10)
    assert wait_until(lambda: end_user_requests(gw, "ro-user") == 4, timeout=10)
    assert chat(gw, limited_auth).status_code == 200
    assert len(log_lines(gw, "Redis is a read-only replica (READONLY)")) == 1
    assert "REDIS_URL" in log_lines(gw, "Redis is a read-only replica (READONLY)")[0]
    assert len(log_lines(gw, "Redis answers again")) == 1


def test_a_server_at_maxclients_is_an_outage_named_with_its_setting(vllm, start_gateway, own_redis_factory):
    server = own_redis_factory("--maxclients", "100")
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=server.url, REDIS_SOCKET_TIMEOUT=0.5,
                                       MODEL_PRICES=TEST_PRICES))
    created, auth = make_key(gw)
    served = []  # the key's requests that were answered (and so must be counted)

    def key_chat() -> int:
        status = chat(gw, auth).status_code
        served.extend([status] if status == 200 else [])
        return status

    assert key_chat() == 200
    admin = server.client()
    admin.config_set("maxclients", 1)  # this admin connection is the one allowed
    admin.client_kill_filter(_type="normal", skipme=True)
    # Until the key cache sees its listener drop (up to KEY_CACHE_TTL), the cached key is served.
    assert wait_until(lambda: key_chat() == 503)
    for _ in range(2):
        assert chat(gw, MASTER, user="mc-user").status_code == 200
    assert key_chat() == 503
    admin.config_set("maxclients", 100)
    assert wait_until(lambda: key_chat() == 200, timeout=10)
    assert wait_until(lambda: end_user_requests(gw, "mc-user") == 2, timeout=10)
    assert wait_until(lambda: requests_of(gw, created) == len(served), timeout=10)
    assert requests_of(gw, created) == len(served)
    [line] = log_lines(gw, "Redis refused: max number of clients reached")
    assert "REDIS_POOL_SIZE" in line and "lower" in line
