"""Killing Redis's master under traffic, on real gunicorn gateways (issue 13).

Sentinel (1 master + 1 replica + 3 Sentinels) and a Redis Cluster (3 primaries + 3 replicas) are
started by the tests (tests/redis_topologies.py), each test with its own, since each kills a node.
What must hold: virtual keys recover within 10 s of the promotion without a gateway restart, the
master key is served throughout, and accounting loses nothing (the key's spend-log entries and
request count equal the requests it was admitted for). The outage a virtual-key client sees is
printed (run with -s) for the README's figures.
"""
from __future__ import annotations

import threading
import time

import pytest
import redis
import redis.sentinel
import requests

from gateway.core.redisconn import is_cluster
from gateway.keys.auth import hash_key
from tests.conftest import MASTER, TEST_PRICES, gateway_environ, gateway_redis, topology_environ, wait_until
from tests.redis_topologies import poll

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
RECOVERY_SECONDS = 10


class Traffic:
    """One caller sending requests back to back on its own thread, recording (time, status)."""

    def __init__(self, url: str, headers: dict):
        self.url = url
        self.headers = headers
        self.results: list[tuple[float, int]] = []
        self.ids: dict[str, int] = {}  # the gateway's X-Request-Id -> status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        with requests.Session() as http:
            while not self._stop.is_set():
                try:
                    resp = http.post(self.url + "/vllm/v1/chat/completions", headers=self.headers, json=CHAT,
                                     timeout=15)
                    status = resp.status_code
                    self.ids[resp.headers.get("x-request-id", "")] = status
                except requests.RequestException:
                    status = 0  # the gateway itself failed to answer: never expected
                self.results.append((time.monotonic(), status))

    def served_since(self, moment: float) -> int:
        return sum(1 for t, status in self.results if t > moment and status == 200)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def statuses(self) -> set[int]:
        return {status for _t, status in self.results}

    def admitted(self) -> int:
        return sum(1 for _t, status in self.results if status == 200)

    def outage(self) -> tuple[float, float | None]:
        """(seconds from the first failed answer to the first success after the last failure,
        moment of that recovery)."""
        failed = [t for t, status in self.results if status != 200]
        if not failed:
            return 0.0, None
        recovered = next((t for t, status in self.results if t > failed[-1] and status == 200), None)
        return (recovered or failed[-1]) - failed[0], recovered


def make_key(gw) -> tuple[dict, dict]:
    created = requests.post(gw.url + "/key/generate", headers=MASTER, json={"rpm_limit": 100_000}, timeout=10)
    assert created.status_code == 200, created.text
    created = created.json()
    return created, {"Authorization": f"Bearer {created['key']}"}


def spend_log(gw, key: str) -> list[tuple[str, int]]:
    """(request id, status) of the key's spend-log entries (paging through /spend/logs)."""
    entries, page = [], 1
    while True:
        body = requests.get(gw.url + "/spend/logs", headers=MASTER, params={"key": key, "size": 500, "page": page},
                            timeout=10).json()
        entries += [(entry["request_id"], entry["status"]) for entry in body["logs"]]
        if not body["has_more"]:
            return entries
        page += 1


def key_requests(gw, key: str) -> int | None:
    resp = requests.get(gw.url + "/key/info", params={"key": key}, headers=MASTER, timeout=10)
    return resp.json()["info"]["requests"] if resp.status_code == 200 else None


def accounting_of(gw, key: str, answered: dict) -> dict:
    """What Redis holds for the key, compared with what its caller was answered. Every request
    that got past authentication is logged with its status (a 503 from the limiter too)."""
    entries = spend_log(gw, key)
    ids = [request_id for request_id, _status in entries]
    return {"served_and_logged": sum(1 for i, status in entries if status == 200 and answered.get(i) == 200),
            "logged_twice": sorted({i for i in ids if ids.count(i) > 1}),
            "logged_otherwise": sorted(f"{i}: logged {status}, answered {answered.get(i)}"
                                       for i, status in entries if answered.get(i) != status),
            "requests_counter_matches_log": key_requests(gw, key) == len(entries)}


def run_failover(gw, auth, kill, wait_promoted, label: str):
    """Traffic on a virtual key and on the master key while `kill()` takes the master down;
    returns (virtual-key traffic, master-key traffic, moment of promotion) once the key has been
    served again for a while after the promotion."""
    virtual, master = Traffic(gw.url, auth), Traffic(gw.url, MASTER)
    try:
        poll(lambda: virtual.served_since(0) >= 20 and master.served_since(0) >= 20, 20, "traffic flowing")
        killed_at = time.monotonic()
        old = kill()
        wait_promoted(old)
        promoted_at = time.monotonic()
        # Recovered: 20 virtual-key requests served after the promotion (or give up past the limit).
        try:
            poll(lambda: virtual.served_since(promoted_at) >= 20, RECOVERY_SECONDS + 5,
                 "virtual key served again after the promotion")
        except TimeoutError:
            pass
    finally:
        virtual.stop()
        master.stop()
    outage, recovered_at = virtual.outage()
    print(f"\n{label}: master killed, promoted after {promoted_at - killed_at:.1f} s; virtual-key outage "
          f"{outage:.2f} s, recovered {0 if recovered_at is None else recovered_at - promoted_at:+.2f} s from the "
          f"promotion; {virtual.admitted()} virtual-key and {master.admitted()} master-key requests served")
    return virtual, master, promoted_at


def assert_recovered_and_nothing_lost(gw, virtual, master, created, promoted_at):
    assert master.statuses() == {200}, "the master key must be served throughout"
    assert virtual.statuses() <= {200, 503}, virtual.statuses()
    failed_after = [t for t, status in virtual.results if status != 200 and t > promoted_at + RECOVERY_SECONDS]
    assert not failed_after, f"virtual key still refused {len(failed_after)} times > {RECOVERY_SECONDS} s after promotion"
    assert virtual.served_since(promoted_at) >= 20
    # Accounting queued what Redis could not take during the outage and flushed it after.
    admitted = virtual.admitted()
    expected = {"served_and_logged": admitted, "logged_twice": [], "logged_otherwise": [],
                "requests_counter_matches_log": True}
    assert wait_until(lambda: accounting_of(gw, created["key"], virtual.ids) == expected, timeout=20), \
        (accounting_of(gw, created["key"], virtual.ids), expected)


def start_on(start_gateway, vllm, topology):
    return start_gateway(gateway_environ(vllm.url, MODEL_PRICES=TEST_PRICES, REDIS_SOCKET_TIMEOUT=0.5,
                                         **topology_environ(topology)), workers=2)


def test_sentinel_failover_under_traffic_recovers_and_loses_no_accounting(vllm, start_gateway, own_sentinel):
    gw = start_on(start_gateway, vllm, own_sentinel)
    created, auth = make_key(gw)
    virtual, master, promoted_at = run_failover(gw, auth, own_sentinel.kill_master, own_sentinel.wait_promoted,
                                                "Sentinel")
    assert_recovered_and_nothing_lost(gw, virtual, master, created, promoted_at)
    ready = requests.get(gw.url + "/health/readiness", headers=MASTER, timeout=10).json()
    new_master = own_sentinel.current_master()
    assert ready["dependencies"]["keystore"]["detail"] == f"PONG from master {new_master.address}"


def test_a_returning_old_master_gets_no_gateway_connection(vllm, start_gateway, own_sentinel):
    """Sentinel no longer names it, so the gateway never connects to it, even before Sentinel
    turns it into a replica (it comes back believing it is still the master)."""
    gw = start_on(start_gateway, vllm, own_sentinel)
    created, auth = make_key(gw)
    old = own_sentinel.kill_master()
    new = own_sentinel.wait_promoted(old)
    old.start()  # same port, empty data set, role master until Sentinel reconfigures it
    seen_as_master = []
    virtual = Traffic(gw.url, auth)
    try:
        def demoted():
            info = old.client(socket_timeout=0.5).info("replication")
            names = [c.get("name", "") for c in old.client(socket_timeout=0.5).client_list()]
            if info["role"] == "master":
                seen_as_master.append(names)
            return info["role"] == "slave" and virtual.served_since(0) >= 20
        poll(demoted, 30, "the old master turned into a replica")
    finally:
        virtual.stop()
    assert seen_as_master, "the old master was never seen as a master (the test saw no window)"
    assert not any(name.startswith("vgw-worker-") for names in seen_as_master for name in names)
    assert virtual.statuses() == {200}
    assert own_sentinel.current_master() is new


def test_cluster_failover_under_traffic_recovers_and_loses_no_accounting(vllm, start_gateway, own_cluster):
    gw = start_on(start_gateway, vllm, own_cluster)
    created, auth = make_key(gw)

    def kill_the_keys_primary():
        # The primary owning the slot of the key's hash tag (its record, spend and limits).
        node = own_cluster.primary_for(f"{{{hash_key(created['key'])}}}")
        own_cluster.kill_primary(node)
        return node

    virtual, master, promoted_at = run_failover(gw, auth, kill_the_keys_primary, own_cluster.wait_promoted, "Cluster")
    assert_recovered_and_nothing_lost(gw, virtual, master, created, promoted_at)
    ready = requests.get(gw.url + "/health/readiness", timeout=10).json()
    assert ready["dependencies"]["keystore"] == {"status": "up"}


def test_readiness_shows_a_failing_cluster_as_down(vllm, start_gateway, own_cluster):
    """A primary dead with its replica too: cluster_state:fail, and readiness says so (state only
    in public, the cluster's own words for the master key)."""
    gw = start_on(start_gateway, vllm, own_cluster)
    assert requests.get(gw.url + "/health/readiness", timeout=10).status_code == 200
    victim = own_cluster.primaries()[0]
    replicas = [n for n in own_cluster.live_nodes() if n is not victim
                and n.client().info("replication").get("master_port") == victim.port]
    for node in [*replicas, victim]:
        node.kill()

    seen = []

    def down():
        resp = requests.get(gw.url + "/health/readiness", headers=MASTER, timeout=10)
        seen.append((resp.status_code, resp.text[:300]))
        return resp.json() if resp.status_code == 503 else None  # (a Response of 503 is falsy)
    try:
        body = poll(down, 20, "readiness 503")
    except TimeoutError:
        raise AssertionError(f"readiness never said down; last answer {seen[-1:]}\n{gw.stderr.text()[-3000:]}")
    detail = body["dependencies"]["keystore"]["detail"]
    assert detail.startswith("cluster_state:fail") or detail in ("ConnectionError", "ClusterDownError"), detail
    public = requests.get(gw.url + "/health/readiness", timeout=10).json()
    assert public["dependencies"]["keystore"] == {"status": "down"}


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_readiness_names_the_topology_for_the_master_key_only(kind, vllm, start_gateway, request):
    topology = request.getfixturevalue(f"shared_{kind}")
    gw = start_on(start_gateway, vllm, topology)
    detail = requests.get(gw.url + "/health/readiness", headers=MASTER, timeout=10).json()
    keystore = detail["dependencies"]["keystore"]
    assert keystore["status"] == "up"
    expected = "PONG from master 127.0.0.1:" if kind == "sentinel" else "cluster_state:ok, 3 primaries"
    assert keystore["detail"].startswith(expected)
    public = requests.get(gw.url + "/health/readiness", timeout=10).json()
    assert public["dependencies"]["keystore"] == {"status": "up"}


# -- the clients make_redis builds for each topology -------------------------------------------------
def test_the_sentinel_pool_is_bounded_and_waits(shared_sentinel):
    """redis-py's own Sentinel pool is unbounded; the gateway's keeps REDIS_POOL_SIZE and waits
    REDIS_POOL_TIMEOUT for a free connection, as on one node."""
    client = gateway_redis(shared_sentinel, REDIS_POOL_SIZE=2, REDIS_POOL_TIMEOUT=0.3)
    pool = client.connection_pool
    taken = [pool.get_connection(), pool.get_connection()]
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        pool.get_connection()
    assert 0.25 < time.monotonic() - started < 2
    for connection in taken:
        pool.release(connection)
    assert client.ping() and taken[0].port == shared_sentinel.current_master().port
    assert type(taken[0]._parser).__name__.startswith("OutageAware")
    client.close()


def test_the_cluster_client_bounds_each_nodes_pool_and_maps_outage_replies(shared_cluster):
    client = gateway_redis(shared_cluster, REDIS_POOL_SIZE=3, REDIS_POOL_TIMEOUT=0.3)
    assert is_cluster(client) and client.ping()
    for node in client.get_primaries():
        pool = node.redis_connection.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 3
        connection = pool.get_connection()
        assert type(connection._parser).__name__.startswith("OutageAware")
        pool.release(connection)
    client.close()


def test_cluster_replies_are_explained_as_a_cluster_failing_over_not_a_wrong_setting():
    from gateway.core.redisconn import ConnectionBudget, classify

    on_cluster = ConnectionBudget(8, 2, 2.0, "cluster")
    cause, fix = classify(redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"), on_cluster)
    assert "failing over" in cause and "needs one Redis" not in fix
    cause, fix = classify(redis.exceptions.ClusterDownError("CLUSTERDOWN"), ConnectionBudget(8, 2, 2.0))
    assert "REDIS_CLUSTER=1" in fix
    assert "to each cluster node" in on_cluster.describe()
    cause, _fix = classify(redis.sentinel.MasterNotFoundError("No master found for 'mymaster'"),
                           ConnectionBudget(8, 2, 2.0, "sentinel"))
    assert "Sentinel" in cause


def test_a_cluster_with_no_node_answering_is_an_outage_not_a_bug(own_cluster):
    """redis-py raises a bare RedisClusterException when no node answers (a 500 for the gateway, and
    a worker that cannot boot): the gateway's client makes it an outage, before and after start."""
    from gateway.core.redisconn import REDIS_ERRORS, check_health

    running = gateway_redis(own_cluster)
    for node in own_cluster.nodes:
        node.kill()
    with pytest.raises(REDIS_ERRORS):
        running.get("some-key")
    booting = gateway_redis(own_cluster)  # a worker starting now still starts
    assert is_cluster(booting)
    assert check_health(booting) == (False, "ClusterUnreachable")
    for node in own_cluster.nodes:
        node.start()
    own_cluster.wait_healthy()
    assert booting.set("k{1}", "v") and running.get("k{1}") == "v"
    assert check_health(booting)[0] is True


def test_revocations_reach_every_worker_after_the_channels_primary_failed_over(vllm, start_gateway, own_cluster):
    """Key changes travel on a sharded channel that lives on one primary. When it dies, each
    worker's listener must subscribe again on the promoted replica: with a 30 s key cache, only
    that (or the cache being cleared when it does) stops a blocked key within seconds."""
    gw = start_gateway(gateway_environ(vllm.url, KEY_CACHE_TTL=30, REDIS_SOCKET_TIMEOUT=0.5,
                                       **topology_environ(own_cluster)), workers=2)
    created, auth = make_key(gw)
    node = own_cluster.primary_for("vgw:key-changes")
    own_cluster.kill_primary(node)
    own_cluster.wait_promoted(node)

    def served(status: int, times: int = 20) -> bool:
        return all(requests.get(gw.url + "/vllm/v1/models", headers=auth, timeout=10).status_code == status
                   for _ in range(times))

    assert wait_until(lambda: served(200), timeout=RECOVERY_SECONDS)  # cached again in the workers
    blocked = requests.post(gw.url + "/key/block", headers=MASTER, json={"key": created["key"]}, timeout=10)
    assert blocked.status_code == 200
    assert wait_until(lambda: served(401), timeout=RECOVERY_SECONDS)  # well within the 30 s cache
