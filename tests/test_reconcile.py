"""Token reconciliation (gateway/relay/reconcile.py): the worker's in-memory tally; the window
script on fakeredis, the real Redis, a Redis Cluster and Sentinel (start, close once across
pollers and instances, void on a vLLM restart or a gap in readings); the poller carrying it
(flush in the round trip it makes anyway); the settings; and the app with ONE replica (no
load-aware routing): /replicas and /metrics after requests through the fake vLLM. Rounds are
driven with tick(): without gevent nothing runs in the background."""
import logging

import fakeredis
import pytest

from gateway.core.config import ConfigError, load_settings
from gateway.core.metrics import Metrics
from gateway.core.redisnames import RedisNames
from gateway.relay.loadpoller import LoadPoller
from gateway.relay.reconcile import Reconciler, Tally, Window
from gateway.usage.tap import Usage
from tests.conftest import MASTER, UPSTREAM_KEY, FakeVLLM, build_app, gateway_environ, wait_until
from tests.test_load_routing import Readings, Replica, dead_redis


@pytest.fixture
def store(redis_client):
    """(client, RedisNames) on fakeredis, the real server, a Redis Cluster and a Sentinel setup
    (tests/conftest.py redis_client), with a prefix of the test's own."""
    return redis_client, RedisNames(redis_client.test_prefix)


def reconciler(names, replicas=("a",), window=1.0, interval=5.0, metrics=None, instance="gw-1"):
    return Reconciler(names, list(replicas), window=window, threshold=0.05, min_tokens=100,
                      interval=interval, timeout=0.5, metrics=metrics, instance_id=instance)


def reading(client, rec, prompt, generation, age=0.0, replica="a"):
    """Hand one vLLM reading, taken `age` seconds ago, to the window script; the window it closed."""
    pipe = client.pipeline(transaction=False)
    assert rec.queue_reading(pipe, replica, {"prompt_tokens_total": prompt, "generation_tokens_total": generation}, age)
    return rec.apply(replica, pipe.execute()[0])


def flush(client, rec):
    pipe = client.pipeline(transaction=False)
    rec.queue_flush(pipe)
    pipe.execute()


def prepared_metrics():
    metrics = Metrics()
    metrics.prepare(replicas=["a"], reconcile=True)
    return metrics


def counter(metrics, replica, outcome):
    return metrics.registry.get_sample_value("vgw_reconcile_windows_total",
                                             {"replica": replica, "outcome": outcome})


# -- the tally and the window's figures ---------------------------------------------------------

def test_the_tally_counts_requests_with_usage_and_gives_back_what_was_not_delivered():
    tally = Tally()
    tally.add("a", 10, 5, False)
    tally.add("a", 3, 7, True)
    tally.add("a", 0, 0, False)  # GET /v1/models, an error answer: nothing to reconcile
    taken = tally.take()
    assert taken == {"a": [13, 12, 2, 1]} and tally.take() == {}
    tally.add("a", 1, 1, False)
    tally.give_back(taken)
    assert tally.take() == {"a": [14, 13, 3, 1]}


def test_drift_is_relative_to_vllm_and_small_windows_are_not_judged():
    window = Window(0, 60, 950, 2000, 10, 4, 1000, 2000, None, "gw-1")
    assert window.drift("prompt") == pytest.approx(-0.05) and window.drift("generation") == 0.0
    assert window.estimated_ratio == 0.4
    assert window.drifting(0.04, 100) == ["prompt"] and window.drifting(0.06, 100) == []
    assert window.drifting(0.04, 5000) == []  # too few tokens to say anything
    counted_only_here = Window(0, 60, 500, 0, 1, 0, 0, 0, None, "gw-1")
    assert counted_only_here.drift("prompt") is None and counted_only_here.drifting(0.05, 100) == ["prompt"]
    void = Window(0, 60, 1, 1, 1, 0, -50, 9, "vllm_restarted", "gw-1")
    assert void.drift("prompt") is None and void.drifting(0.05, 0) == []
    assert Window(0, 60, 0, 0, 0, 0, 0, 0, None, "x").estimated_ratio is None


# -- the window script, on fakeredis and the real Redis ------------------------------------------

def test_a_window_compares_gateway_and_vllm_deltas_and_only_its_closer_judges_it(store, caplog):
    client, names = store
    metrics = prepared_metrics()
    first, second = reconciler(names, metrics=metrics), reconciler(names, metrics=metrics, instance="gw-2")
    first.add("a", Usage("m", 999, 999))  # tallied before the first window: not part of it
    flush(client, first)
    assert reading(client, first, 5000, 9000, age=3.0) is None  # the first reading starts the window
    assert client.hget(names.reconcile_window("a"), "gw_prompt") == "0"
    for rec, prompt, completion, estimated in ((first, 600, 300, False), (second, 400, 100, True)):
        rec.add("a", Usage("m", prompt, completion, estimated))
        flush(client, rec)
    with caplog.at_level(logging.WARNING, logger="gateway"):
        closed = reading(client, second, 6000, 9500, age=1.0)  # 2 s later: past the 1 s window
        assert reading(client, first, 6000, 9500, age=1.5) is None  # older than what Redis holds
        assert reading(client, first, 6001, 9501, age=0.5) is None  # the next window is open
    assert (closed.gateway_prompt, closed.gateway_generation, closed.requests, closed.estimated) == (1000, 400, 2, 1)
    assert (closed.vllm_prompt, closed.vllm_generation, closed.void, closed.closed_by) == (1000, 500, None, "gw-2")
    assert closed.end - closed.start == pytest.approx(2.0, abs=0.1)
    assert closed.drift("prompt") == 0.0 and closed.drift("generation") == pytest.approx(-0.2)
    assert counter(metrics, "a", "drift") == 1.0  # once, by the caller that closed it
    drift_lines = [r.message for r in caplog.records if "token reconciliation" in r.message]
    assert len(drift_lines) == 1 and "400 generation tokens, vLLM 1000 / 500" in drift_lines[0]
    assert "1 of 2 requests' usage estimated (50%)" in drift_lines[0]
    assert first.last["a"] == closed  # every caller sees the last window
    shown = metrics.registry.get_sample_value
    assert shown("vgw_replica_tokens_drift_ratio", {"replica": "a", "kind": "generation"}) == pytest.approx(-0.2)
    assert shown("vgw_replica_usage_estimated_ratio", {"replica": "a"}) == 0.5
    assert client.pttl(names.reconcile_window("a")) > 0 and client.pttl(names.reconcile_last("a")) > 0


def test_a_vllm_restart_voids_the_window_and_the_next_one_starts_from_the_new_counters(store):
    client, names = store
    metrics = prepared_metrics()
    rec = reconciler(names, metrics=metrics)
    reading(client, rec, 5000, 9000, age=3.0)
    reading(client, rec, 40, 20, age=2.5)  # counters went down: vLLM restarted
    closed = reading(client, rec, 90, 70, age=1.5)
    assert closed.void == "vllm_restarted" and closed.drift("prompt") is None
    assert counter(metrics, "a", "void") == 1.0 and counter(metrics, "a", "drift") == 0.0
    rec.add("a", Usage("m", 10, 30))
    flush(client, rec)
    closed = reading(client, rec, 100, 100, age=0.0)
    assert (closed.void, closed.vllm_prompt, closed.vllm_generation) == (None, 10, 30)
    assert closed.drift("prompt") == 0.0 and counter(metrics, "a", "ok") == 1.0


def test_a_gap_in_readings_voids_the_window(store):
    client, names = store
    rec = reconciler(names, window=1.0, interval=0.05)  # readings more than 0.5 s apart: a gap
    reading(client, rec, 100, 100, age=5.0)
    closed = reading(client, rec, 200, 200, age=3.0)
    assert closed.void == "no_readings"


def test_replicas_have_windows_of_their_own(store):
    client, names = store
    rec = reconciler(names, replicas=("a", "b"))
    reading(client, rec, 0, 0, age=2.0, replica="a")
    reading(client, rec, 0, 0, age=2.0, replica="b")
    rec.add("a", Usage("m", 7, 3))
    flush(client, rec)
    assert reading(client, rec, 7, 3, replica="a").gateway_prompt == 7
    assert reading(client, rec, 5, 5, replica="b").gateway_prompt == 0
    windows, now = rec.read_last(client)
    assert windows["a"].vllm_prompt == 7 and windows["b"].vllm_prompt == 5 and now > windows["a"].end


# -- the poller carries it --------------------------------------------------------------------

class Counting(Readings):
    """Readings with vLLM's token counters, which the test moves."""

    def __init__(self):
        super().__init__()
        self.tokens = {"prompt_tokens_total": 0.0, "generation_tokens_total": 0.0}

    def __call__(self, upstream, timeout):
        return {**super().__call__(upstream, timeout), **self.tokens}


def recon_poller(client, names, read, rec, instance="gw-1", worker="w1"):
    return LoadPoller(None, [Replica("a")], client, names, interval=0.05, timeout=0.5, instance_id=instance,
                      worker_id=worker, background=False, read=read, reconciler=rec)


def test_the_poller_flushes_tallies_in_its_round_and_its_lease_holder_closes_windows(store):
    client, names = store
    read = Counting()
    workers = [reconciler(names, window=1.0, interval=0.05) for _ in range(2)]
    pollers = [recon_poller(client, names, read, rec, worker=f"w{i}") for i, rec in enumerate(workers)]
    assert [p.tick() for p in pollers] == [True, False]  # one worker of the instance polls
    assert not client.exists(names.replica_load("a"))  # reconciliation alone publishes no load figures
    workers[1].add("a", Usage("m", 30, 12))  # a request ended in the worker that does not poll
    assert not client.exists(names.reconcile_window("a")) or \
        client.hget(names.reconcile_window("a"), "gw_prompt") == "0"  # memory only until its round
    read.tokens = {"prompt_tokens_total": 30.0, "generation_tokens_total": 12.0}
    pollers[1].tick()
    assert client.hget(names.reconcile_window("a"), "gw_prompt") == "30"
    assert wait_until(lambda: pollers[0].tick() and "a" in workers[0].last, timeout=5)
    window = workers[0].last["a"]
    assert (window.gateway_prompt, window.vllm_prompt, window.gateway_generation, window.vllm_generation) == \
        (30, 30, 12, 12)


def test_redis_down_keeps_the_tally_for_the_next_round():
    names = RedisNames("test-recon-down:")
    rec = reconciler(names)
    polling = recon_poller(dead_redis(), names, Counting(), rec)
    rec.add("a", Usage("m", 5, 6))
    assert polling.tick() is False
    assert rec.tally.take() == {"a": [5, 6, 1, 0]}


# -- settings ---------------------------------------------------------------------------------

def settings(**env):
    return load_settings(gateway_environ("http://vllm:8000", **env))


def test_reconciliation_is_on_by_default_and_polls_slowly_without_routing():
    assert load_settings({"HOSTED_VLLM_API_BASE": "http://vllm:8000", "LITELLM_MASTER_KEY": "sk-" + "k" * 32}).reconcile
    assert not settings().reconcile  # the tests' environment turns it off (tests/conftest.py)
    single = settings(RECONCILE="1")
    assert single.reconcile and not single.routing_polls and single.poll_interval == 5.0
    several = load_settings(gateway_environ("http://a:8000,http://b:8000", RECONCILE="1"))
    assert several.routing_polls and several.poll_interval == 0.25


@pytest.mark.parametrize("env, named", [
    ({"RECONCILE_WINDOW": "0.5"}, "RECONCILE_WINDOW"),
    ({"RECONCILE_WINDOW": "nan"}, "RECONCILE_WINDOW"),
    ({"RECONCILE_DRIFT_THRESHOLD": "0"}, "RECONCILE_DRIFT_THRESHOLD"),
    ({"RECONCILE_MIN_TOKENS": "-1"}, "RECONCILE_MIN_TOKENS"),
    ({"RECONCILE_POLL_INTERVAL": "0.01"}, "RECONCILE_POLL_INTERVAL"),
    ({"RECONCILE": "1", "RECONCILE_WINDOW": "10", "RECONCILE_POLL_INTERVAL": "5"}, "RECONCILE_WINDOW"),
    ({"RECONCILE": "maybe"}, "RECONCILE"),
])
def test_out_of_range_settings_are_refused_in_one_line(env, named):
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    assert str(caught.value).startswith(named) and "\n" not in str(caught.value)


# -- the app with one replica: requests, /replicas, /metrics ----------------------------------

@pytest.fixture(scope="module")
def fake_vllm():
    server = FakeVLLM(["--api-key", UPSTREAM_KEY])  # our own: no other test's tokens in its counters
    yield server
    server.stop()


def one_replica_app(vllm, client, prefix, **env):
    env.setdefault("RECONCILE", 1)
    # The test ticks by hand, with requests in between: a generous read timeout widens the gap
    # between readings that voids a window (3 x interval + 3 x timeout), so a busy machine does not.
    environ = gateway_environ(vllm.url, REDIS_KEY_PREFIX=prefix, RECONCILE_WINDOW=1, RECONCILE_POLL_INTERVAL=0.05,
                              RECONCILE_MIN_TOKENS=1, ROUTING_POLL_TIMEOUT=3, **env)
    return build_app({"environ": environ, "redis": client})


def chat(content, **extra):
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def close_window(gateway):
    """Drive the poller until a window closes with requests in it; that window."""
    poller, reconciler = gateway.replicas.reconcile_poller, gateway.replicas.reconciler
    name = gateway.replicas.replicas[0].name
    before = reconciler.last.get(name)

    def closed():
        poller.tick()
        window = reconciler.last.get(name)
        return window is not None and window != before and window.requests > 0
    assert wait_until(closed, timeout=10)
    return reconciler.last[name]


def test_one_replica_reconciles_without_load_aware_routing(fake_vllm, store):
    client, names = store
    app = one_replica_app(fake_vllm, client, names.prefix)
    gateway = app.extensions["gateway"]
    assert gateway.replicas.poller is None and gateway.replicas.reconcile_poller is not None
    gateway.replicas.reconcile_poller.tick()  # the window starts at the first reading
    http = app.test_client()
    for i in range(3):
        assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat(f"exact {i}")).status_code == 200
    streamed = http.post("/vllm/v1/chat/completions", headers=MASTER,
                         json=chat("exact stream", stream=True, stream_options={"include_usage": True}))
    assert streamed.status_code == 200 and b'"usage"' in streamed.data
    assert http.get("/vllm/v1/models", headers=MASTER).status_code == 200  # no usage: not counted
    assert not client.exists(names.reconcile_window(fake_vllm.url)) or \
        client.hget(names.reconcile_window(fake_vllm.url), "gw_requests") == "0"  # no Redis work per request
    window = close_window(gateway)
    assert (window.requests, window.estimated, window.void) == (4, 0, None)
    assert window.gateway_prompt == window.vllm_prompt > 0 and window.gateway_generation == window.vllm_generation > 0
    assert window.drift("prompt") == 0.0 and window.drift("generation") == 0.0

    # A stream without include_usage is estimated; /replicas and /metrics show the last window.
    estimated = http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat("guess", stream=True))
    assert estimated.status_code == 200
    assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat("exact again")).status_code == 200
    window = close_window(gateway)
    assert (window.requests, window.estimated) == (2, 1)
    body = http.get("/replicas", headers=MASTER).get_json()
    shown = body["replicas"][0]["reconciliation"]
    assert shown["gateway"] == {"prompt_tokens": window.gateway_prompt, "generation_tokens": window.gateway_generation,
                                "requests": 2, "estimated_requests": 1}
    assert shown["vllm"] == {"prompt_tokens": window.vllm_prompt, "generation_tokens": window.vllm_generation}
    assert shown["usage_estimated_ratio"] == 0.5 and shown["void"] is None and shown["age_s"] >= 0
    assert body["reconciliation"]["on"] and body["reconciliation"]["window_s"] == 1.0
    assert body["reconciliation"]["poller"]["this_worker_polls"] is True
    assert body["routing"]["poller"] is None  # routing itself still does not poll one replica
    text = http.get("/metrics", headers=MASTER).get_data(as_text=True)
    assert f'vgw_replica_usage_estimated_ratio{{replica="{fake_vllm.url}"}} 0.5' in text
    assert f'vgw_replica_tokens_drift_ratio{{kind="prompt",replica="{fake_vllm.url}"}}' in text
    assert f'vgw_reconcile_windows_total{{outcome="void",replica="{fake_vllm.url}"}} 0.0' in text


def test_reconciliation_off_tallies_nothing_and_reads_nothing(fake_vllm):
    app = one_replica_app(fake_vllm, fakeredis.FakeRedis(decode_responses=True), "test-recon-off:", RECONCILE=0)
    gateway = app.extensions["gateway"]
    assert gateway.replicas.reconciler is None and gateway.replicas.reconcile_poller is None
    http = app.test_client()
    assert http.post("/vllm/v1/chat/completions", headers=MASTER, json=chat("x")).status_code == 200
    body = http.get("/replicas", headers=MASTER).get_json()
    assert body["reconciliation"] == {"on": False} and body["replicas"][0]["reconciliation"] is None
    assert "vgw_reconcile_windows_total{" not in http.get("/metrics", headers=MASTER).get_data(as_text=True)


def test_with_load_aware_routing_the_routing_poller_carries_reconciliation(fake_vllm):
    other = FakeVLLM(["--api-key", UPSTREAM_KEY])
    try:
        environ = gateway_environ(f"{fake_vllm.url},{other.url}", RECONCILE=1, RECONCILE_WINDOW=1,
                                  ROUTING_STALE_AFTER=30)
        app = build_app({"environ": environ, "redis": fakeredis.FakeRedis(decode_responses=True)})
        replicas = app.extensions["gateway"].replicas
        assert replicas.poller is not None and replicas.reconcile_poller is None
        assert replicas.poller.reconciler is replicas.reconciler and replicas.poller.board is not None
        replicas.poller.tick()
        assert replicas.board.fresh(other.url) is not None  # routing's figures as before
    finally:
        other.stop()



def test_a_worker_hands_its_tally_over_when_it_exits(store):
    client, names = store
    rec = reconciler(names)
    polling = recon_poller(client, names, Counting(), rec)
    rec.add("a", Usage("m", 8, 9, True))
    polling.flush_tally()  # what atexit runs in a gevent worker whose poller started
    assert client.hmget(names.reconcile_window("a"), "gw_prompt", "gw_generation", "gw_requests", "gw_estimated") == \
        ["8", "9", "1", "1"]
