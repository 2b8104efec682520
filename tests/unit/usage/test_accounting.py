"""gateway.usage.accounting: batches kept through a Redis outage and not retried forever on a bug
(the spend log's own tests are in test_spendlog.py)."""
import time

import pytest
import redis

from gateway.core.redisnames import RedisNames
from gateway.usage.accounting import Accounting

TOKEN_A, TOKEN_B = "a" * 64, "b" * 64
DAY = 86400


def entry(**overrides):
    now = time.time()
    base = {"request_id": "req-1", "token": TOKEN_A, "key_alias": None, "caller": f"key:{TOKEN_A[:12]}",
            "end_user": None, "model": "fake-model", "route": "/v1/chat/completions", "method": "POST",
            "status": 200, "upstream_status": 200, "prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
            "spend": 0.013, "start_time": now - 0.25, "end_time": now, "ttfb_ms": 10.5, "duration_ms": 250.0,
            "stream": False, "estimated": False, "error": None}
    base.update(overrides)
    return base


@pytest.fixture
def accounting(redis_client):
    return Accounting(redis_client, RedisNames(redis_client.test_prefix), {}, 1000, background=False,
                      end_user_ttl=30 * DAY)


def test_an_outage_reply_keeps_the_batch_and_a_bug_drops_it(accounting, monkeypatch):
    def failing_with(exc):
        def execute(self, *args, **kwargs):
            raise exc
        monkeypatch.setattr(type(accounting.redis.pipeline()), "execute", execute)

    failing_with(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    accounting.record(entry(), None)
    assert len(accounting.pending) == 1
    failing_with(redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    accounting.flush()
    assert len(accounting.pending) == 0
