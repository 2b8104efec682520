"""Every reply a broken, misconfigured or overloaded Redis gives is an outage, not a 500:
virtual keys get 503, the master key is still served, accounting stays queued, and each worker
logs one line per incident naming the cause and the setting to fix. Replies only a gateway bug
can cause (WRONGTYPE, a Lua error) stay a 500 and are not retried forever.

The gateway talks to tests.resp_server.ErrorRedis with its real redis-py client (make_redis)."""
import logging

import pytest

from gateway.core import redisconn
from gateway.core.config import load_settings
from gateway.core.redisconn import make_redis
from tests.conftest import MASTER, build_app, gateway_environ
from tests.resp_server import ErrorRedis

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
VIRTUAL = {"Authorization": "Bearer sk-some-virtual-key-0123456789"}

# (server reply, sent at accept?, words the log line must contain)
OUTAGES = [
    ("ERR max number of clients reached", True, ["max number of clients", "REDIS_POOL_SIZE"]),
    ("MOVED 3999 127.0.0.1:6381", False, ["cluster", "REDIS_URL"]),
    ("READONLY You can't write against a read only replica.", False, ["read-only replica", "REDIS_URL"]),
    ("LOADING Redis is loading the dataset in memory", False, ["LOADING"]),
    ("NOAUTH Authentication required.", False, ["credentials", "REDIS_URL"]),
    ("WRONGPASS invalid username-password pair or user is disabled.", False, ["credentials", "REDIS_URL"]),
    ("OOM command not allowed when used memory > 'maxmemory'.", False, ["out of memory", "SPEND_LOG_MAX_ENTRIES"]),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist", False, ["MISCONF"]),
    ("BUSY Redis is busy running a script.", False, ["BUSY"]),
    ("CLUSTERDOWN The cluster is down", False, ["cluster"]),
    ("NOPERM this user has no permissions to run the 'evalsha' command", False, ["NOPERM", "ACL"]),
]


@pytest.fixture(autouse=True)
def fresh_incident():
    redisconn.incidents.cause = None
    yield
    redisconn.incidents.cause = None


def app_on(server: ErrorRedis, vllm):
    env = gateway_environ(vllm.url, REDIS_URL=server.url, REDIS_SOCKET_TIMEOUT=0.5)
    return build_app({"environ": env, "redis": make_redis(load_settings(env))})


def incident_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "gateway" and "budget" not in r.getMessage()]


@pytest.mark.parametrize("reply,at_accept,words", OUTAGES, ids=[o[0].split()[0] + ("-accept" if o[1] else "")
                                                                  for o in OUTAGES])
def test_redis_outage_reply_is_503_for_keys_and_served_for_master(vllm, caplog, reply, at_accept, words):
    server = ErrorRedis(reply, on_connect=at_accept)
    try:
        app = app_on(server, vllm)
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="gateway"):
            for _ in range(3):
                refused = client.post("/vllm/v1/chat/completions", headers=VIRTUAL, json=CHAT)
                assert refused.status_code == 503, refused.get_data(as_text=True)
                assert refused.get_json()["error"]["type"] == "service_unavailable"
                assert client.post("/vllm/v1/chat/completions", headers=MASTER, json=CHAT).status_code == 200
        lines = incident_lines(caplog)
        assert len(lines) == 1, lines  # one line per incident, not one per request
        for word in words:
            assert word in lines[0]
        # Nothing was dropped: the master key's three requests wait in the queue for Redis.
        assert len(app.extensions["gateway"].accounting.pending) == 3
    finally:
        server.close()


@pytest.mark.parametrize("reply", ["WRONGTYPE Operation against a key holding the wrong kind of value",
                                   "ERR user_script:1: Script attempted to access nonexistent global variable"])
def test_a_reply_only_a_bug_causes_stays_a_500_and_is_not_retried_forever(vllm, caplog, reply):
    server = ErrorRedis(reply)
    try:
        app = app_on(server, vllm)
        client = app.test_client()
        resp = client.post("/vllm/v1/chat/completions", headers=VIRTUAL, json=CHAT)
        assert resp.status_code == 500
        assert client.post("/vllm/v1/chat/completions", headers=MASTER, json=CHAT).status_code == 200
        assert len(app.extensions["gateway"].accounting.pending) == 0
        assert any("accounting failed" in r.getMessage() for r in caplog.records)
    finally:
        server.close()
