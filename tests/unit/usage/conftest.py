"""What the usage tests share: a finished request's accounting entry, and Accounting on the
`redis_client` under test (written at once, no background flusher)."""
import time

import pytest

from gateway.core.redisnames import RedisNames
from gateway.usage.accounting import Accounting

TOKEN_A, TOKEN_B = "a" * 64, "b" * 64
DAY = 86400


def entry(**overrides) -> dict:
    """A finished request as the relay hands it to accounting (3 + 5 tokens, 0.013)."""
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
