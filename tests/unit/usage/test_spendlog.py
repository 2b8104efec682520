"""gateway.usage.spendlog: bounded entries; per-key, per-end-user and request-id indexes that
filtered queries read instead of the global stream; hour/day usage counters with bounded fields."""
import json
import time

import pytest

from gateway.core.errors import GatewayError
from gateway.core.redisnames import RedisNames
from gateway.usage.spendlog import ENTRY_MAX_BYTES, LogLimits, SpendLog, stored_entry

from tests.unit.usage.conftest import DAY, TOKEN_A, TOKEN_B, entry


def spend_log(redis_client, **limits) -> SpendLog:
    return SpendLog(redis_client, RedisNames(redis_client.test_prefix), 1000, limits=LogLimits(**limits))


def write(log: SpendLog, *entries) -> None:
    pipe = log.redis.pipeline(transaction=False)
    log.queue_batch(pipe, list(entries))
    pipe.execute()


def ids(result) -> list[str]:
    return [e["request_id"] for e in result["logs"]]


# -- entries (moved from test_accounting.py) --------------------------------------------------
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


# -- indexes ----------------------------------------------------------------------------------
def test_filtered_queries_read_the_index_not_the_global_stream(redis_client):
    log = spend_log(redis_client)
    write(log, entry(request_id="a1"), entry(request_id="b1", token=TOKEN_B, end_user="eve"),
          entry(request_id="a2", end_user="eve"), entry(request_id="m1", token=None, end_user="eve"))
    redis_client.delete(log.names.spend_log)  # what a filtered query returns now comes from an index
    assert ids(log.query()) == []
    assert ids(log.query(token=TOKEN_A)) == ["a2", "a1"]
    assert ids(log.query(end_user="eve")) == ["m1", "a2", "b1"]
    assert ids(log.query(request_id="b1")) == ["b1"]
    assert ids(log.query(token=TOKEN_A, end_user="eve")) == ["a2"]
    assert ids(log.query(token=TOKEN_B, request_id="a2")) == []


def test_indexes_are_capped_and_expire_after_their_last_write(redis_client):
    log = spend_log(redis_client, key_entries=5, end_user_entries=3, key_ttl=1000, end_user_ttl=100)
    write(log, *[entry(request_id=f"r{i}", end_user="frank") for i in range(12)])
    names = log.names
    assert redis_client.xlen(names.key_log(TOKEN_A)) == 5 and redis_client.llen(names.end_user_log("frank")) == 3
    assert 990 < redis_client.ttl(names.key_log(TOKEN_A)) <= 1000
    assert 90 < redis_client.ttl(names.end_user_log("frank")) <= 100
    assert ids(log.query(token=TOKEN_A, size=10)) == ["r11", "r10", "r9", "r8", "r7"]


def test_requests_sharing_one_request_id_are_all_found(redis_client):
    log = spend_log(redis_client)
    write(log, *[entry(request_id="same", model=f"m{i}") for i in range(6)], entry(request_id="other"))
    assert [e["model"] for e in log.query(request_id="same")["logs"]] == [f"m{i}" for i in range(5, -1, -1)]


def test_request_id_lookups_are_bounded_by_count_not_by_traffic(redis_client):
    log = spend_log(redis_client, request_ids=128)  # two lists of at most 96 entries
    write(log, *[entry(request_id=f"n{i}") for i in range(1000)])
    lists = [n for n in redis_client.scan_iter(match=log.names.prefix + "req:#*")]
    assert len(lists) == 2 and all(redis_client.llen(n) == 96 for n in lists)
    assert all(29 * DAY < redis_client.ttl(n) <= 30 * DAY for n in lists)
    assert all(ids(log.query(request_id=f"n{i}")) == [f"n{i}"] for i in range(872, 1000))
    assert ids(log.query(request_id="n3")) == []


def test_a_request_id_whose_list_expired_is_found_through_the_key_stream(redis_client):
    log = spend_log(redis_client)
    write(log, entry(request_id="old"), entry(request_id="new"))
    redis_client.delete(log._request_list("old"))
    assert ids(log.query(request_id="old")) == []
    assert ids(log.query(request_id="old", token=TOKEN_A)) == ["old"]


def test_an_alias_reads_the_stream_of_the_key_holding_it(redis_client):
    log = spend_log(redis_client)
    redis_client.set(log.names.alias("team-a"), TOKEN_A)
    write(log, entry(request_id="before-alias"), entry(request_id="named", key_alias="team-a"),
          entry(request_id="other", token=TOKEN_B, key_alias="team-b", end_user="gus"),
          entry(request_id="old-owner", token=TOKEN_B, key_alias="team-a", end_user="gus"))
    redis_client.delete(log.names.spend_log)
    assert ids(log.query(key_alias="team-a")) == ["named", "before-alias"]
    # Through another index, entries logged under the alias by another key match too.
    assert ids(log.query(key_alias="team-a", end_user="gus")) == ["old-owner"]
    assert ids(log.query(key_alias="nobody")) == []


def test_combined_filters_read_the_shorter_stream(redis_client, monkeypatch):
    log = spend_log(redis_client)
    write(log, *[entry(request_id=f"k{i}") for i in range(30)], entry(request_id="both", end_user="hal"))
    read = []
    for command in ("xrevrange", "lrange"):
        original = getattr(log.redis, command)
        monkeypatch.setattr(log.redis, command, lambda name, *a, _read=original, **kw: read.append(name) or _read(name, *a, **kw))
    assert ids(log.query(token=TOKEN_A, end_user="hal")) == ["both"]
    assert read == [log.names.end_user_log("hal")]
    write(log, *[entry(request_id=f"h{i}", token=TOKEN_B, end_user="hal") for i in range(40)])
    read.clear()
    assert ids(log.query(token=TOKEN_A, end_user="hal")) == ["both"]
    assert read == [log.names.key_log(TOKEN_A)]


def test_pages_and_time_ranges_on_an_index(redis_client):
    log = spend_log(redis_client)
    write(log, *[entry(request_id=f"p{i}") for i in range(7)])
    page = log.query(token=TOKEN_A, page=2, size=3)
    assert ids(page) == ["p3", "p2", "p1"] and page["has_more"] is True
    last = log.query(token=TOKEN_A, page=3, size=3)
    assert ids(last) == ["p0"] and last["has_more"] is False
    assert ids(log.query(token=TOKEN_A, end=time.time() - 60)) == []
    assert len(log.query(token=TOKEN_A, start=time.time() - 60)["logs"]) == 7
    assert ids(log.query(request_id="p4", end=time.time() - 60)) == []


def test_an_index_turned_off_falls_back_to_the_global_stream(redis_client):
    log = spend_log(redis_client, key_entries=0, request_ids=0)
    write(log, entry(request_id="x1"), entry(request_id="x2", token=TOKEN_B))
    assert not list(redis_client.scan_iter(match=log.names.prefix + "*log:*"))
    assert not list(redis_client.scan_iter(match=log.names.prefix + "req:#*"))
    assert ids(log.query(token=TOKEN_A)) == ["x1"] and ids(log.query(request_id="x2")) == ["x2"]


# -- usage counters ---------------------------------------------------------------------------
HOUR = 3600
T0 = 1_800_000_000 // DAY * DAY  # a UTC midnight


def test_usage_is_counted_per_hour_and_day_by_key_model_and_end_user(redis_client):
    log = spend_log(redis_client)
    write(log, entry(start_time=T0 + 10, end_user="ida"), entry(start_time=T0 + 20, model="big", spend=1.5),
          entry(start_time=T0 + HOUR + 5, token=None, end_user="ida"))
    by_key = log.counters.report("key", "hour", T0, T0 + HOUR + 1)
    assert by_key["buckets"] == ["2027-01-15T00:00:00Z", "2027-01-15T01:00:00Z"]
    series = {s["group"]: s for s in by_key["series"]}
    assert series[TOKEN_A]["requests"] == [2, 0] and series[TOKEN_A]["spend"] == [1_513_000_000, 0]  # nano-dollars
    assert series["master"]["requests"] == [0, 1] and series[TOKEN_A]["total_tokens"] == [16, 0]
    by_model = log.counters.report("model", "day", T0, T0)["series"]
    assert [(s["group"], s["totals"]["requests"]) for s in by_model] == [("big", 1), ("fake-model", 2)]
    by_user = log.counters.report("end_user", "day", T0, T0 + HOUR)["series"]
    assert [(s["group"], s["requests"]) for s in by_user] == [("ida", [2])]


def test_usage_buckets_expire(redis_client):
    log = spend_log(redis_client, hour_buckets_ttl=8 * DAY, day_buckets_ttl=400 * DAY)
    write(log, entry(start_time=T0 + 1))
    assert 8 * DAY - 10 < redis_client.ttl(log.names.usage_bucket("hour", T0)) <= 8 * DAY
    assert 400 * DAY - 10 < redis_client.ttl(log.names.usage_bucket("day", T0)) <= 400 * DAY


def test_a_bucket_counts_at_most_so_many_end_users_and_models(redis_client):
    log = spend_log(redis_client, bucket_end_users=3, bucket_models=2)
    write(log, *[entry(start_time=T0 + i, end_user=f"u{i}", model=f"m{i}") for i in range(10)])
    write(log, entry(start_time=T0 + 50, end_user="u0", model="m1"))  # known ones still count as themselves
    bucket = redis_client.hgetall(log.names.usage_bucket("day", T0))
    assert len([f for f in bucket if f.startswith("u|")]) == 3 and len([f for f in bucket if f.startswith("m|")]) == 2
    users = {s["group"]: s["totals"]["requests"] for s in log.counters.report("end_user", "day", T0, T0)["series"]}
    assert users == {"u0": 2, "u1": 1, "u2": 1, None: 7}
    models = {s["group"]: s["totals"]["requests"] for s in log.counters.report("model", "day", T0, T0)["series"]}
    assert models == {"m0": 1, "m1": 2, None: 8}


def test_a_report_lists_the_top_groups_and_sums_the_rest(redis_client):
    log = spend_log(redis_client)
    write(log, *[entry(start_time=T0, end_user=f"v{i}", spend=float(i)) for i in range(5)])
    series = log.counters.report("end_user", "day", T0, T0, limit=2)["series"]
    assert [(s["group"], s["other"], s["spend"]) for s in series] == [
        ("v4", False, [4 * 10**9]), ("v3", False, [3 * 10**9]), (None, True, [3 * 10**9])]
    assert series[-1]["requests"] == [3]


def test_a_report_range_is_bounded():
    with pytest.raises(GatewayError) as bad:
        SpendLog(None, RedisNames("x:"), 10).counters.report("key", "hour", 0, 3600 * 5000)
    assert bad.value.status == 400
