"""gateway.usage.accounting: bounded spend-log entries, end-user stats per key with a lifetime,
batches kept through a Redis outage and not retried forever on a bug."""
import json
import time

import pytest
import redis

from gateway.core.redisnames import RedisNames
from gateway.usage.accounting import Accounting
from gateway.usage.spendlog import ENTRY_MAX_BYTES, stored_entry

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


def test_a_stored_entry_keeps_only_what_cannot_be_derived():
    stored = json.loads(stored_entry(entry()))
    assert not {"total_tokens", "end_time", "caller", "key_alias", "end_user", "error"} & stored.keys()
    assert len(stored_entry(entry())) < 400


def test_caller_chosen_strings_cannot_grow_an_entry_past_its_cap():
    huge = entry(route="/v1/" + "x" * 50_000, error="e" * 50_000, end_user="𝔘" * 256, model="m" * 256,
                 key_alias="k" * 256)
    text = stored_entry(huge)
    assert len(text.encode()) <= ENTRY_MAX_BYTES
    assert json.loads(text)["request_id"] == "req-1"


def test_the_log_reads_back_every_field_including_the_derived_ones(accounting):
    written = entry(end_user="alice", key_alias="team-a", caller="key:team-a")
    accounting.record(written, None)
    [read] = accounting.log.query()["logs"]
    for name, value in written.items():
        assert read[name] == (pytest.approx(value) if isinstance(value, float) else value), name


def test_end_user_stats_are_per_key_and_summed(accounting):
    accounting.record(entry(end_user="alice"), {"token": TOKEN_A})
    accounting.record(entry(end_user="alice"), {"token": TOKEN_A})
    accounting.record(entry(end_user="alice", token=TOKEN_B, spend=0.5), {"token": TOKEN_B})
    accounting.record(entry(end_user="alice", token=None), None)  # the master key
    totals = accounting.log.end_user_totals("alice")
    assert totals["requests"] == 4 and totals["total_tokens"] == 32
    assert totals["spend"] == pytest.approx(3 * 0.013 + 0.5)
    assert {k: v["requests"] for k, v in totals["keys"].items()} == {TOKEN_A: 2, TOKEN_B: 1, "master": 1}
    assert accounting.log.end_user_totals("bob") is None


def test_end_user_stats_expire_after_their_last_request(accounting, redis_client):
    accounting.record(entry(end_user="carol"), {"token": TOKEN_A})
    names = accounting.names
    for name in (names.end_user_stats(TOKEN_A, "carol"), names.end_user_keys("carol")):
        assert 29 * DAY < redis_client.ttl(name) <= 30 * DAY


def test_an_index_entry_older_than_the_lifetime_is_not_reported(accounting, redis_client):
    accounting.record(entry(end_user="dan"), {"token": TOKEN_A})
    index = accounting.names.end_user_keys("dan")
    redis_client.zadd(index, {TOKEN_B: time.time() - 31 * DAY})  # a key whose stats have expired
    assert set(accounting.log.end_user_totals("dan")["keys"]) == {TOKEN_A}
    assert redis_client.zscore(index, TOKEN_B) is None


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
