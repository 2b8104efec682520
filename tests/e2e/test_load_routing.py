"""Load-aware routing through a real gunicorn gateway (2 gevent workers, the real Redis) in front
of three scripted vLLMs whose /metrics say what each test sets (tests/scripted_vllm.py): a
replica with a deep queue or a full KV cache gets nothing while another has room; stale figures
fail open; with every replica saturated requests wait and go when figures clear, a full queue
answers 503 with Retry-After, a caller hanging up leaves the queue; a session stays on one
replica across both workers."""
import json
import re
import socket
import threading

import pytest
import requests

from tests.conftest import MASTER, MASTER_KEY, GatewayServer, gateway_environ, real_redis_available, \
    real_redis_namespace, wait_until
from tests.scripted_vllm import ScriptedReplica

MAX_WAITING = 20
QUEUE_MAX = 2  # per worker


@pytest.fixture(scope="module")
def replicas():
    started = [ScriptedReplica() for _ in range(3)]
    yield started
    for replica in started:
        replica.stop()


@pytest.fixture(scope="module")
def gateway(replicas):
    if not real_redis_available():
        pytest.skip("needs the real Redis (two workers share the figures through it)")
    with real_redis_namespace("routing") as (_, prefix):
        server = GatewayServer(gateway_environ(
            ",".join(r.url for r in replicas), REDIS_URL="redis://127.0.0.1:6379/0", REDIS_KEY_PREFIX=prefix,
            ROUTING_POLL_INTERVAL=0.05, ROUTING_POLL_TIMEOUT=0.3, ROUTING_STALE_AFTER=0.5,
            ROUTING_MAX_WAITING=MAX_WAITING, ROUTING_QUEUE_MAX=QUEUE_MAX, ROUTING_QUEUE_TIMEOUT=20,
            # a session stays put however fast this test sends (override rule: tests/unit/relay/test_choice.py)
            ROUTING_AFFINITY_SLACK=100), workers=2)
        try:
            yield server
        finally:
            server.stop()


def replicas_view(gw) -> dict:
    return requests.get(gw.url + "/replicas", headers={**MASTER, "Connection": "close"}, timeout=10).json()


def wait_seen(gw, predicate, timeout=10.0) -> bool:
    """True once both workers answered /replicas with `predicate(body)` true (each worker holds its
    own copy of the shared figures)."""
    latest = {}

    def both():
        body = replicas_view(gw)
        latest[body["routing"]["poller"]["worker"]] = predicate(body)
        return len(latest) == 2 and all(latest.values())
    return wait_until(both, timeout)


@pytest.fixture
def idle(gateway, replicas):
    """The gateway, once both workers see every replica idle (fresh figures, nothing waiting)."""
    for replica in replicas:
        replica.set()
    assert wait_seen(gateway, lambda body: all(r["load"]["fresh"] and r["load"]["waiting"] == 0
                                               and r["load"]["kv_cache_usage"] == 0 for r in body["replicas"]))
    return gateway


def saturate(gateway, replicas, **figures):
    for replica in replicas:
        replica.set(**figures)
    assert wait_seen(gateway, lambda body: all(r["load"]["fresh"] and r["load"]["saturated"] for r in body["replicas"]))


def post(gw, body, headers=None, timeout=30):
    return requests.post(gw.url + "/vllm/v1/chat/completions", json=body, timeout=timeout,
                         headers={**MASTER, "Connection": "close", **(headers or {})})


def chat(content):
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}]}


def metric(gw, name, **labels) -> float:
    text = requests.get(gw.url + "/metrics", headers={**MASTER, "Connection": "close"}, timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}(?:\{{{re.escape(wanted)}\}})? (\S+)$", text, re.M) if wanted else \
        re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def counts(replicas, marks):
    return [len(r.inference(m)) for r, m in zip(replicas, marks)]


def test_one_worker_of_the_instance_polls_and_both_hold_the_figures(idle, replicas):
    polls = {}

    def both_seen():
        body = replicas_view(idle)
        routing = body["routing"]["poller"]
        polls[routing["worker"]] = (routing["this_worker_polls"], routing["instance"],
                                    all(r["load"]["fresh"] for r in body["replicas"]))
        return len(polls) == 2
    assert wait_until(both_seen, 10)
    assert sorted(holder for holder, _, _ in polls.values()) == [False, True]
    assert len({instance for _, instance, _ in polls.values()}) == 1
    assert all(fresh for _, _, fresh in polls.values())


# -- choice ---------------------------------------------------------------------------------------

def test_a_deep_queue_or_a_full_kv_cache_gets_nothing_while_another_replica_is_free(idle, replicas):
    a, b, c = replicas
    a.set(waiting=30)   # past ROUTING_MAX_WAITING: saturated
    c.set(kv=0.99)      # past ROUTING_MAX_KV: saturated
    assert wait_seen(idle, lambda body: body["replicas"][0]["load"]["saturated"] == "queue"
                     and body["replicas"][2]["load"]["saturated"] == "kv")
    marks = [r.mark() for r in replicas]
    for i in range(12):
        assert post(idle, chat(f"question {i}")).status_code == 200
    assert counts(replicas, marks) == [0, 12, 0]


def test_a_busier_replica_gets_nothing_while_others_are_idle(idle, replicas):
    """Not saturated, only busier: the score decides (requests without a prompt: no affinity)."""
    a, b, c = replicas
    a.set(waiting=15, running=30, kv=0.6)
    assert wait_seen(idle, lambda body: body["replicas"][0]["load"]["waiting"] == 15
                     and body["replicas"][0]["load"]["saturated"] is None)
    marks = [r.mark() for r in replicas]
    for _ in range(10):
        assert post(idle, {"model": "fake-model", "max_tokens": 1}).status_code == 200
    got = counts(replicas, marks)
    assert got[0] == 0 and got[1] + got[2] == 10


def test_stale_figures_fail_open_to_least_in_flight(idle, replicas):
    a, b, c = replicas
    a.set(waiting=30)  # a deep queue ...
    assert wait_seen(idle, lambda body: body["replicas"][0]["load"]["saturated"] == "queue")
    for replica in replicas:
        replica.set(metrics_status=500, waiting=30)  # ... then nobody can read any replica's /metrics
    assert wait_seen(idle, lambda body: not any(r["load"]["fresh"] for r in body["replicas"]))
    marks = [r.mark() for r in replicas]
    for i in range(9):
        assert post(idle, chat(f"stale {i}")).status_code == 200
    assert all(n >= 1 for n in counts(replicas, marks)), counts(replicas, marks)  # a included


# -- admission control -------------------------------------------------------------------------------

def test_with_every_replica_saturated_requests_wait_and_go_when_figures_clear(idle, replicas):
    a, b, c = replicas
    saturate(idle, replicas, waiting=25)
    marks = [r.mark() for r in replicas]
    results = []
    callers = [threading.Thread(target=lambda i=i: results.append(
        post(idle, chat(f"wait {i}"), {"X-Request-Id": f"queued-{i}"}).status_code)) for i in range(2)]
    for caller in callers:
        caller.start()
    assert wait_until(lambda: metric(idle, "vgw_admission_queue_length") == 2, 10)
    assert counts(replicas, marks) == [0, 0, 0] and results == []  # nothing piled onto vLLM
    b.set()  # b has room again
    for caller in callers:
        caller.join(20)
    assert results == [200, 200]
    assert counts(replicas, marks) == [0, 2, 0]
    assert metric(idle, "vgw_admission_queue_length") == 0
    assert metric(idle, "vgw_admission_wait_seconds_count") >= 2
    assert wait_until(lambda: len([x for x in idle.access_lines() if x["request_id"].startswith("queued-")]) == 2, 5)
    assert all(x["queued_ms"] > 0 and x["replica"] == b.url and x["route"] == "affinity"
               for x in idle.access_lines() if x["request_id"].startswith("queued-"))


def test_a_full_queue_answers_503_with_retry_after(idle, replicas):
    saturate(idle, replicas, kv=0.97)
    shed_before = metric(idle, "vgw_admission_shed_total", reason="queue_full")
    results = []
    lock = threading.Lock()

    def call(i):
        resp = post(idle, chat(f"full {i}"))
        with lock:
            results.append((resp.status_code, resp.headers.get("Retry-After"), resp.text))

    callers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for caller in callers:
        caller.start()
    # two workers with ROUTING_QUEUE_MAX 2 each: at most 4 wait, the others are refused at once
    assert wait_until(lambda: len(results) >= 4 and metric(idle, "vgw_admission_queue_length") == 8 - len(results), 10)
    refused = list(results)
    assert all(status == 503 and retry == "2" and "queue is full" in json.loads(text)["error"]["message"]
               for status, retry, text in refused)
    assert metric(idle, "vgw_admission_shed_total", reason="queue_full") - shed_before == len(refused)
    for replica in replicas:
        replica.set()
    for caller in callers:
        caller.join(20)
    assert sorted(status for status, _, _ in results) == [200] * (8 - len(refused)) + [503] * len(refused)


def test_a_caller_hanging_up_while_queued_leaves_the_queue(idle, replicas):
    saturate(idle, replicas, waiting=25)
    marks = [r.mark() for r in replicas]
    gone_before = metric(idle, "vgw_admission_shed_total", reason="client_gone")
    body = json.dumps(chat("leaving")).encode()
    sock = socket.create_connection(("127.0.0.1", idle.port), timeout=10)
    sock.sendall(b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                 + f"Authorization: Bearer {MASTER_KEY}\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert wait_until(lambda: metric(idle, "vgw_admission_queue_length") == 1, 10)
    sock.close()
    assert wait_until(lambda: metric(idle, "vgw_admission_queue_length") == 0, 5)
    assert metric(idle, "vgw_admission_shed_total", reason="client_gone") == gone_before + 1
    assert counts(replicas, marks) == [0, 0, 0]


# -- affinity -------------------------------------------------------------------------------------------

def test_a_session_stays_on_one_replica_across_both_workers(idle, replicas):
    marks = [r.mark() for r in replicas]
    ids = []

    def call(batch):
        for i in range(4):
            request_id = f"pin-{batch}-{i}"
            ids.append(request_id)
            assert post(idle, chat(f"turn {batch}-{i}"), {"X-Session-Id": "conversation-7",
                                                           "X-Request-Id": request_id}).status_code == 200

    callers = [threading.Thread(target=call, args=(n,)) for n in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    got = counts(replicas, marks)
    assert sorted(got) == [0, 0, 16], got
    assert wait_until(lambda: len([line for line in idle.access_lines() if line["request_id"] in ids]) == 16, 5)
    lines = [line for line in idle.access_lines() if line["request_id"] in ids]
    assert len({line["worker"] for line in lines}) == 2  # both workers sent the conversation to the same replica
    assert {(line["replica"], line["route"]) for line in lines} == {(replicas[got.index(16)].url, "affinity")}

    # other sessions spread over the replicas; a conversation's later turns follow its first
    marks = [r.mark() for r in replicas]
    for n in range(12):
        assert post(idle, chat("hi"), {"X-Session-Id": f"session-{n}"}).status_code == 200
    assert sum(1 for count in counts(replicas, marks) if count) >= 2
    marks = [r.mark() for r in replicas]
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a KV cache?"}]
    for turn in range(4):
        assert post(idle, {"model": "fake-model", "messages": history}).status_code == 200
        history += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"more {turn}"}]
    assert sorted(counts(replicas, marks)) == [0, 0, 4]
