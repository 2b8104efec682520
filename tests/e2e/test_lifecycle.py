"""Shutdown, worker restarts and crashes, several gateway instances: real gunicorn, real Redis."""
import json
import os
import signal
import socket
import time

import pytest
import requests

from tests.conftest import (
    MASTER,
    REAL_REDIS_URL,
    TEST_PRICES,
    gateway_environ,
    open_raw_stream,
    wait_until,
)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def read_rest(s, received: bytes) -> bytes:
    while True:
        data = s.recv(65536)
        if not data:
            return received
        received += data


def test_sigterm_lets_open_streams_finish(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix), workers=2)
    streams = [open_raw_stream(gw.port, f"term-{i}", chunks=40) for i in range(5)]
    gw.proc.send_signal(signal.SIGTERM)
    gw.stderr.wait_for("Handling signal: term")
    bodies = [read_rest(s, received) for s, received in streams]
    for s, _ in streams:
        s.close()
    for body in bodies:
        assert body.count(b"data: ") == 40 + 3 and body.rstrip().endswith(b"0")  # every event, then the last chunk
        assert b"data: [DONE]" in body
    assert gw.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
    lines = {line["request_id"]: line for line in gw.access_lines()}
    assert all(lines[f"term-{i}"]["error"] is None for i in range(5))
    # The accounting queued in the workers reached Redis before they exited.
    logged = {json.loads(fields["e"])["request_id"] for _, fields in client.xrange(prefix + "spendlog")}
    assert {f"term-{i}" for i in range(5)} <= logged


def test_worker_restarts_leak_no_slot_and_no_redis_connection(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix),
                       workers=1, args=["--max-requests", "7", "--max-requests-jitter", "0"])
    key = requests.post(gw.url + "/key/generate", headers=MASTER, json={"max_parallel_requests": 1}).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    statuses = []
    deadline = time.monotonic() + 30
    # gunicorn replaces the worker about a second after its 7th request: keep going until it has
    # been replaced three times (bounded).
    while len(gw.worker_pids_seen()) < 4 and time.monotonic() < deadline:
        statuses.append(requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code)
    assert len(gw.worker_pids_seen()) >= 4
    assert set(statuses) == {200}  # a leaked slot would turn the rest into 429s
    ours = gw.worker_pids_seen()
    connected = {int(c["name"].rsplit("-", 1)[1]) for c in client.client_list()
                 if c["name"].startswith("vgw-worker-")} & ours
    alive = {pid for pid in ours if os.path.exists(f"/proc/{pid}")}
    assert connected and connected <= alive, f"Redis connections of dead workers still open: {connected - alive}"


def test_crashed_worker_slot_expires(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                                       PARALLEL_SLOT_LEASE_SECONDS=2), workers=1)
    key = requests.post(gw.url + "/key/generate", headers=MASTER, json={"max_parallel_requests": 1}).json()["key"]
    s, _ = open_raw_stream(gw.port, "crash-1", key=key, chunks=1000)
    worker = next(iter(gw.worker_pids_seen()))
    os.kill(worker, signal.SIGKILL)          # the worker dies holding the only slot
    s.close()
    auth = {"Authorization": f"Bearer {key}"}
    # The replacement worker refuses while the dead worker's lease lasts, then serves.
    assert wait_until(lambda: requests.get(gw.url + "/vllm/v1/models", headers=auth).status_code == 200, timeout=10)


def test_two_instances_share_keys_revocations_limits_budgets_and_spend(vllm, start_gateway, real_redis_prefix):
    _, prefix = real_redis_prefix
    env = gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix, MODEL_PRICES=TEST_PRICES)
    a, b = start_gateway(env), start_gateway(env)
    created = requests.post(a.url + "/key/generate", headers=MASTER,
                            json={"key_alias": "shared", "rpm_limit": 6, "max_budget": 0.05}).json()
    auth = {"Authorization": f"Bearer {created['key']}"}
    # keys and spend: used on both, counted once in one place
    for gw in (a, b, a, b):
        assert requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth, json=CHAT).status_code == 200

    def info(gw):
        return requests.get(gw.url + "/key/info", params={"key": created["key"]}, headers=MASTER).json()["info"]

    assert wait_until(lambda: info(b)["requests"] == 4)
    assert info(a)["spend"] == pytest.approx(4 * 0.013) and info(a)["total_tokens"] == 32
    # budget: 0.052 spent of 0.05 -> refused on both instances
    for gw in (a, b):
        assert wait_until(lambda gw=gw: requests.post(gw.url + "/vllm/v1/chat/completions", headers=auth,
                                                      json=CHAT).status_code == 400)
    # limits: the rpm window is shared (4 admitted + 2 more = 6, then 429 everywhere)
    requests.post(a.url + "/key/update", headers=MASTER, json={"key": created["key"], "max_budget": 100})
    seen = [requests.get(gw.url + "/vllm/v1/models", headers=auth).status_code for gw in (a, b, a, b)]
    assert seen.count(429) >= 2 and seen.count(200) <= 2
    # revocation on one instance is honoured by the other within a second
    assert requests.post(a.url + "/key/block", headers=MASTER, json={"key": created["key"]}).status_code == 200
    assert wait_until(lambda: requests.get(b.url + "/vllm/v1/models", headers=auth).status_code == 401, timeout=1.5)
