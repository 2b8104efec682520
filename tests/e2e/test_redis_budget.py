"""The connection budget: the default settings fit a 20-connection Redis (small managed plans) at
the default worker count. 100 concurrent clients on 2 workers get no 503, leak no parallel slot,
and the gateway never holds more connections than it announced at start."""
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import MASTER, gateway_environ, wait_until
from tests.e2e.redis_server import own_redis_factory  # noqa: F401 (fixture)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
CLIENTS, EACH = 100, 5


def test_100_clients_on_a_20_connection_redis_get_no_503_and_leak_no_slot(vllm, start_gateway, own_redis_factory):
    server = own_redis_factory("--maxclients", "20")
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=server.url), workers=2)
    # The budget is announced at start, by each worker.
    gw.stderr.wait_for(r"Redis connection budget: 2 workers × REDIS_POOL_SIZE 8 = 16 connections")
    created = requests.post(gw.url + "/key/generate", headers=MASTER,
                            json={"max_parallel_requests": 1000, "rpm_limit": 100_000}).json()
    headers = {"Authorization": f"Bearer {created['key']}", "x-fake-delay-ms": "20"}
    admin = server.client()
    peak, done = [0], threading.Event()

    def watch_connections():
        while not done.is_set():
            peak[0] = max(peak[0], admin.info("clients")["connected_clients"] - 1)  # less this one
            done.wait(0.02)

    def client(i):
        with requests.Session() as session:
            return [session.post(gw.url + "/vllm/v1/chat/completions", headers=headers, json=CHAT,
                                 timeout=30).status_code for _ in range(EACH)]

    watcher = threading.Thread(target=watch_connections)
    watcher.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for batch in pool.map(client, range(CLIENTS)) for s in batch]
    finally:
        done.set()
        watcher.join()
    assert statuses.count(200) == CLIENTS * EACH, {s: statuses.count(s) for s in set(statuses)}
    leases = admin.zcard("vgw:rl:{" + created["token"] + "}:parallel")
    assert leases == 0 or wait_until(lambda: admin.zcard("vgw:rl:{" + created["token"] + "}:parallel") == 0)
    assert peak[0] <= 16, f"the gateway held {peak[0]} connections"
