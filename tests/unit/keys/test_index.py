"""gateway/keys/index.py: alias claims and the listing indexes, on fakeredis."""
import time

import fakeredis

from gateway.core.redisnames import RedisNames
from gateway.keys.index import KeyIndex

NAMES = RedisNames("t:")


def index():
    return KeyIndex(fakeredis.FakeRedis(decode_responses=True), NAMES)


def test_an_alias_belongs_to_its_first_live_claimant():
    keys = index()
    alive = {"a"}
    assert keys.claim_alias("team", "a", None, alive.__contains__) is None
    assert keys.claim_alias("team", "b", None, alive.__contains__) == "a"
    assert keys.alias_owner("team") == "a"
    assert keys.claim_alias("team", "a", time.time() + 60, alive.__contains__) is None  # re-claim: new lifetime
    assert 0 < keys.redis.pttl(NAMES.alias("team")) <= 60_000


def test_a_dead_owners_alias_is_taken_over():
    keys = index()
    keys.claim_alias("team", "gone", None, lambda t: True)
    assert keys.claim_alias("team", "b", None, lambda t: False) is None
    assert keys.alias_owner("team") == "b"


def test_release_only_drops_the_callers_own_claim():
    keys = index()
    keys.claim_alias("team", "a", None, lambda t: True)
    keys.release_alias("team", "b")
    assert keys.alias_owner("team") == "a"
    keys.release_alias("team", "a")
    assert keys.alias_owner("team") is None


def test_pages_are_newest_first_and_expired_keys_are_pruned():
    keys = index()
    now = time.time()
    pipe = keys.redis.pipeline()
    for i in range(5):
        keys.add(pipe, {"token": f"t{i}", "created_epoch": now + i, "user_id": "u" if i % 2 else None,
                        "expires_at": now - 1 if i == 4 else None})
    pipe.execute()
    assert keys.page(NAMES.keys_by_created, 0, 1) == (5, ["t4", "t3"])
    keys.prune_expired(now)
    assert keys.page(NAMES.keys_by_created, 0, 9) == (4, ["t3", "t2", "t1", "t0"])
    assert keys.page(NAMES.keys_by_user("u"), 0, 9) == (2, ["t3", "t1"])


def test_removing_a_key_unlists_it_everywhere():
    keys = index()
    record = {"token": "t", "created_epoch": 1.0, "user_id": "u", "team_id": "x", "expires_at": None}
    pipe = keys.redis.pipeline()
    keys.add(pipe, record)
    keys.remove(pipe, record)
    pipe.execute()
    assert [keys.redis.exists(n) for n in (NAMES.keys_by_created, NAMES.keys_by_expiry,
                                           NAMES.keys_by_user("u"), NAMES.keys_by_team("x"))] == [0, 0, 0, 0]
