"""Load-aware routing, in process: the poller lease (one worker of an instance polls), the
figures shared through Redis (newest reading wins, stale ones ignored), failing open, and the
app's routing, admission queue, readiness and /replicas on scripted replicas (tests/scripted_vllm.py).
Rounds are driven with tick(): without gevent nothing runs in the background."""
import logging
import re
import time
import uuid

import fakeredis
import pytest
import redis as redis_lib

from gateway.core.redisnames import RedisNames
from gateway.relay.loadpoller import LoadBoard, LoadPoller
from gateway.relay.vllmload import LoadUnreadable
from tests.conftest import MASTER, REAL_REDIS_URL, _purge, build_app, free_port, gateway_environ, \
    real_redis_available, wait_until
from tests.scripted_vllm import ScriptedReplica

INTERVAL = 0.05  # the lease lasts 3 intervals: 150 ms


class Replica:
    def __init__(self, name):
        self.name = name
        self.upstream = name  # what `read` is given


class Readings:
    """A stand-in for vllmload.read_load: figures per replica name, and who read what."""

    def __init__(self, **per_replica):
        self.figures = per_replica
        self.calls = []

    def __call__(self, upstream, timeout):
        self.calls.append(upstream)
        found = self.figures.get(upstream)
        if isinstance(found, Exception):
            raise found
        return {"requests_waiting": 0.0, "requests_running": 0.0, "kv_cache_usage": 0.0,
                "preemptions_total": 0.0, "prefix_cache_hits_total": None, "prefix_cache_queries_total": None,
                **(found or {})}


@pytest.fixture(params=["fakeredis", "redis"])
def store(request):
    """(client, RedisNames) with a prefix of the test's own, on fakeredis or the real server."""
    if request.param == "redis":
        if not real_redis_available():
            pytest.skip(f"no Redis at {REAL_REDIS_URL}")
        client = redis_lib.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    else:
        client = fakeredis.FakeRedis(decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    yield client, RedisNames(prefix)
    _purge(client, prefix)


def dead_redis():
    """A client of a port nothing listens on, without redis-py's default retries (seconds each)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis_lib.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2, decode_responses=True,
                           retry=Retry(NoBackoff(), 0))


def poller(client, names, read, *, instance="gw-1", worker="w1", replicas=("a", "b"), stale_after=1.0, **kw):
    board = LoadBoard(names, list(replicas), stale_after)
    return LoadPoller(board, [Replica(n) for n in replicas], client, names, interval=INTERVAL, timeout=0.5,
                      instance_id=instance, worker_id=worker, background=False, read=read, **kw)


# -- one poller per instance -----------------------------------------------------------------

def test_only_one_worker_of_an_instance_polls_and_another_takes_over(store):
    client, names = store
    read = Readings()
    first, second = poller(client, names, read, worker="w1"), poller(client, names, read, worker="w2")
    for _ in range(5):
        first.tick()
        second.tick()
    assert (first.polls, second.polls) == (5, 0)
    assert first.holder and not second.holder
    assert client.get(names.poller_lease("gw-1")) == "w1"
    assert 0 < client.pttl(names.poller_lease("gw-1")) <= 150
    # both workers hold the figures, whoever read them
    assert second.board.fresh("a") is not None and second.board.fresh("a").by == "gw-1"
    # the holder stops (its worker died): the lease lapses and the other worker takes over
    assert wait_until(lambda: second.tick(), 2)
    assert second.polls >= 1 and client.get(names.poller_lease("gw-1")) == "w2"
    first.tick()
    assert not first.holder  # the old holder does not take it back while the new one renews


def test_two_instances_both_poll_and_the_newest_reading_wins(store):
    client, names = store
    one = poller(client, names, Readings(a={"requests_waiting": 1.0}), instance="gw-1")
    two = poller(client, names, Readings(a={"requests_waiting": 2.0}), instance="gw-2")
    assert one.tick() and two.tick()  # each instance has its own lease
    key = names.replica_load("a")
    assert client.hget(key, "by") == "gw-2" and client.hget(key, "waiting") == "2.0"
    assert 0 < client.pttl(key) <= 3000  # figures expire by themselves (3 x ROUTING_STALE_AFTER)
    one.tick()
    assert client.hget(key, "by") == "gw-1"
    # a reading older than the one held (taken before it, published after) does not overwrite it
    stored = float(client.hget(key, "read_at"))
    two._publish({"a": ({"requests_waiting": 9.0}, time.monotonic() - 5)})
    assert client.hget(key, "by") == "gw-1" and float(client.hget(key, "read_at")) == stored


def test_figures_are_shared_with_their_age_and_stale_ones_are_ignored(redis_client):
    """On every topology (fakeredis, one node, Redis Cluster, Sentinel): the lease, the reads of
    every replica and the publish cross hash slots within one pipeline."""
    names = RedisNames(redis_client.test_prefix)
    holder = poller(redis_client, names, Readings(a={"requests_waiting": 3.0, "kv_cache_usage": 0.5}),
                    stale_after=0.3)
    other = poller(redis_client, names, Readings(), worker="w2", stale_after=0.3)
    assert holder.tick() and not other.tick()
    figures = other.board.fresh("a")
    assert figures is not None and (figures.waiting, figures.kv, figures.running) == (3.0, 0.5, 0.0)
    assert figures.age() < 0.3 and figures.by == "gw-1"
    assert other.board.fresh("b").waiting == 0.0
    # nobody polls any more: the figures age past ROUTING_STALE_AFTER and are not used
    assert wait_until(lambda: other.board.fresh("a") is None, 2)
    assert other.board.figures["a"].age() > 0.3


def test_unreadable_metrics_are_not_published_and_logged_once(store, caplog):
    client, names = store
    read = Readings(b=LoadUnreadable("HTTP 404 on /metrics"))
    polling = poller(client, names, read)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        for _ in range(3):
            polling.tick()
    assert client.exists(names.replica_load("a")) and not client.exists(names.replica_load("b"))
    assert polling.board.fresh("b") is None and polling.unreadable("b") == "HTTP 404 on /metrics"
    assert sum("cannot be read" in r.message for r in caplog.records) == 1
    read.figures["b"] = {}
    with caplog.at_level(logging.WARNING, logger="gateway"):
        polling.tick()
    assert polling.board.fresh("b") is not None
    assert any("can be read again" in r.message for r in caplog.records)


def test_a_slow_read_is_published_the_next_round_and_never_read_twice_at_once(store):
    client, names = store

    class Slow(Readings):
        started = []

        def __call__(self, upstream, timeout):
            self.started.append(upstream)
            if upstream == "b":
                time.sleep(0.3)  # longer than an interval (0.05 s): the round does not wait for it
            return super().__call__(upstream, timeout)

    read = Slow()
    polling = poller(client, names, read)
    started = time.monotonic()
    polling.tick()
    assert time.monotonic() - started < 0.25
    assert polling.board.fresh("a") is not None and "b" not in polling.board.figures
    polling.tick()
    assert read.started.count("b") == 1  # still running: not started again
    assert wait_until(lambda: polling.tick() and polling.board.fresh("b") is not None, 2)
    assert polling.board.fresh("b").age() < 0.5


def test_preemptions_per_second(store):
    client, names = store
    read = Readings(a={"preemptions_total": 10.0})
    polling = poller(client, names, read)
    polling.tick()
    assert polling.board.fresh("a").preemption_rate is None  # nothing measured yet
    baseline_total, baseline_at = polling._baseline["a"]
    polling._baseline["a"] = (baseline_total, baseline_at - 2.0)  # as if read two seconds ago
    read.figures["a"] = {"preemptions_total": 16.0}
    polling.tick()
    assert polling.board.fresh("a").preemption_rate == pytest.approx(3.0, rel=0.05)


def test_decode_rate_is_tokens_per_second_per_running_request_smoothed(store):
    client, names = store
    read = Readings(a={"generation_tokens_total": 1000.0, "requests_running": 4.0})
    polling = poller(client, names, read)
    polling.tick()
    assert polling.board.fresh("a").decode_rate is None  # nothing measured yet

    def one_second_later(generated, running):
        window = polling._decode["a"]
        window[1] -= 1.0  # the window began a second earlier
        read.figures["a"] = {"generation_tokens_total": generated, "requests_running": running}
        polling.tick()
        return polling.board.fresh("a").decode_rate

    # 240 tokens in 1 s while 4 ran: 60 a request; then 20 a request, averaged in at 0.3
    assert one_second_later(1240.0, 4.0) == pytest.approx(60.0, rel=0.01)
    assert one_second_later(1320.0, 4.0) == pytest.approx(60.0 + 0.3 * (20.0 - 60.0), rel=0.01)
    # idle (nothing running): says nothing about speed, the rate is kept
    assert one_second_later(1320.0, 0.0) == pytest.approx(48.0, rel=0.01)


def test_redis_down_fails_open_never_fails(caplog):
    names = RedisNames("test-down:")
    dead = dead_redis()
    polling = poller(dead, names, Readings())
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert polling.tick() is False
        assert polling.tick() is False
    assert polling.board.fresh("a") is None and polling.polls == 0
    assert sum("Redis" in r.message for r in caplog.records) <= 1  # once per incident


# -- the app, in process ----------------------------------------------------------------------------

@pytest.fixture
def scripted():
    replicas = [ScriptedReplica() for _ in range(3)]
    yield replicas
    for replica in replicas:
        replica.stop()


def routing_app(replicas, client=None, prefix="test-routing:", **settings):
    settings.setdefault("ROUTING_STALE_AFTER", 30)  # figures stay fresh unless a test says otherwise
    env = gateway_environ(",".join(r.url for r in replicas), REDIS_KEY_PREFIX=prefix, **settings)
    return build_app({"environ": env, "redis": client or fakeredis.FakeRedis(decode_responses=True)})


def chat(content="hello", **extra):
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def test_requests_go_where_vllm_has_room_and_the_choice_is_counted(scripted):
    a, b, c = scripted
    a.set(waiting=30)      # a deep queue: saturated
    c.set(kv=0.99)         # KV cache full: saturated
    app = routing_app(scripted)
    gateway = app.extensions["gateway"]
    gateway.replicas.poller.tick()
    http = app.test_client()
    for i in range(6):
        assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat(f"q{i}")).status_code == 200
    assert (len(a.inference()), len(b.inference()), len(c.inference())) == (0, 6, 0)
    text = http.get("/metrics", headers=MASTER).get_data(as_text=True)
    assert f'vgw_route_decisions_total{{reason="affinity",replica="{b.url}"}} 6.0' in text
    assert f'vgw_route_decisions_total{{reason="score",replica="{a.url}"}} 0.0' in text  # created at 0
    assert f'vgw_replica_load{{figure="waiting",replica="{a.url}"}} 30.0' in text
    assert f'vgw_replica_load{{figure="kv",replica="{c.url}"}} 0.99' in text


def test_replicas_and_readiness_show_each_replica_s_figures_and_age(scripted):
    a, b, c = scripted
    a.set(waiting=30, running=4)
    app = routing_app(scripted)
    app.extensions["gateway"].replicas.poller.tick()
    http = app.test_client()
    body = http.get("/replicas", headers=MASTER).get_json()
    load = body["replicas"][0]["load"]
    assert (load["waiting"], load["running"], load["kv_cache_usage"], load["fresh"], load["saturated"]) == \
        (30.0, 4.0, 0.0, True, "queue")
    assert 0 <= load["age_s"] < 5 and load["read_by"]
    assert body["replicas"][0]["vllm"]["requests_waiting"] == 30.0  # the live read stays beside it
    assert body["routing"]["load_aware"] and body["routing"]["queue"]["max"] == 256
    assert body["routing"]["poller"]["this_worker_polls"] is True
    ready = http.get("/health/readiness", headers=MASTER).get_json()
    assert ready["dependencies"]["upstream"]["replicas"][0]["load"]["waiting"] == 30.0
    public = http.get("/health/readiness").get_json()
    assert public["dependencies"]["upstream"]["replicas"] == [{"status": "up"}] * 3  # states only


def test_without_fresh_figures_requests_are_served_least_in_flight(scripted):
    a, b, c = scripted
    for replica in scripted:
        replica.set(waiting=30)
    app = routing_app(scripted, ROUTING_STALE_AFTER=0.2, ROUTING_POLL_INTERVAL=0.05)
    app.extensions["gateway"].replicas.poller.tick()
    board = app.extensions["gateway"].replicas.board
    assert wait_until(lambda: board.fresh(a.url) is None, 2)  # nobody polls: stale
    http = app.test_client()
    for i in range(6):
        assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat(f"q{i}")).status_code == 200
    assert [len(r.inference()) for r in scripted] == [2, 2, 2]  # in turn (nothing stays in flight)


def test_one_replica_needs_no_polling_unless_admission_control_is_asked_for(scripted):
    single = routing_app(scripted[:1])
    assert single.extensions["gateway"].replicas.poller is None and single.extensions["gateway"].admission is None
    asked = routing_app(scripted[:1], ROUTING_ADMISSION=1)
    assert asked.extensions["gateway"].replicas.poller is not None and asked.extensions["gateway"].admission
    several_off = routing_app(scripted, ROUTING_LOAD_AWARE=0)
    assert several_off.extensions["gateway"].replicas.poller is None
    assert several_off.extensions["gateway"].replicas.load_aware is False


@pytest.mark.parametrize("where", ["fakeredis", "redis"])
def test_a_request_that_waited_too_long_gives_back_its_parallel_slot(scripted, where):
    if where == "redis" and not real_redis_available():
        pytest.skip(f"no Redis at {REAL_REDIS_URL}")
    client = redis_lib.Redis.from_url(REAL_REDIS_URL, decode_responses=True) if where == "redis" \
        else fakeredis.FakeRedis(decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    try:
        for replica in scripted:
            replica.set(kv=0.97)
        app = routing_app(scripted, client, prefix, ROUTING_QUEUE_TIMEOUT=0.3)
        gateway = app.extensions["gateway"]
        gateway.replicas.poller.tick()
        http = app.test_client()
        key = http.post("/key/generate", headers=MASTER, json={"max_parallel_requests": 1}).get_json()
        auth = {"Authorization": f"Bearer {key['key']}"}
        started = time.monotonic()
        refused = http.post("/vllm/v1/chat/completions", headers=auth, json=chat())
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
        assert time.monotonic() - started >= 0.3
        assert "saturated" in refused.get_json()["error"]["message"]
        assert all(not r.inference() for r in scripted)
        assert client.zcard(gateway.limiter.names.parallel(key["token"])) == 0  # the slot is free again
        for replica in scripted:
            replica.set()
        gateway.replicas.poller.tick()
        assert http.post("/vllm/v1/chat/completions", headers=auth, json=chat()).status_code == 200
        assert gateway.admission.length == 0
    finally:
        _purge(client, prefix)


def test_get_requests_never_wait(scripted):
    for replica in scripted:
        replica.set(waiting=30)
    app = routing_app(scripted, ROUTING_QUEUE_TIMEOUT=5)
    app.extensions["gateway"].replicas.poller.tick()
    started = time.monotonic()
    assert app.test_client().get("/vllm/v1/models", headers=MASTER).status_code == 200
    assert time.monotonic() - started < 2


def test_redis_down_the_app_serves_least_in_flight_and_lets_queued_requests_go(scripted):
    """Figures that cannot be refreshed go stale: requests are routed as without figures, and
    requests waiting for room are let out (the gate fails open), never failed."""
    import threading

    for replica in scripted:
        replica.set(waiting=30)
    app = routing_app(scripted, ROUTING_STALE_AFTER=0.3, ROUTING_POLL_INTERVAL=0.05)
    gateway = app.extensions["gateway"]
    gateway.replicas.poller.tick()
    results = []
    waiting = threading.Thread(target=lambda: results.append(
        app.test_client().post("/vllm/v1/chat/completions", headers=MASTER, json=chat("queued")).status_code))
    waiting.start()
    assert wait_until(lambda: gateway.admission.length == 1, 5)
    gateway.replicas.poller.redis = dead_redis()
    assert wait_until(lambda: gateway.replicas.board.fresh(scripted[0].url) is None, 2)
    assert gateway.replicas.poller.tick() is False  # Redis refuses: the round pumps the queue anyway
    waiting.join(5)
    assert results == [200] and gateway.admission.length == 0
    http = app.test_client()
    for i in range(3):
        assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat(f"q{i}")).status_code == 200
    assert sum(len(r.inference()) for r in scripted) == 4
    text = http.get("/metrics", headers=MASTER).get_data(as_text=True)
    assert sum(float(v) for v in re.findall(r'vgw_route_decisions_total\{reason="fail_open",[^}]*\} (\S+)', text)) == 4
