"""gateway.usage.limits: refunds, releases that survive a Redis error, the lease renewer."""
import time

import fakeredis
import pytest
import redis

from gateway.core.redisnames import RedisNames
from gateway.usage.accounting import Accounting
from gateway.usage.limits import RateLimiter

TOKEN = "t" * 64
LIMITED = {"rpm_limit": 10, "max_parallel_requests": 2}


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
def limiter(server):
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    return RateLimiter(client, RedisNames("u:"), lease_seconds=120)


def rpm_count(limiter):
    return int(limiter.redis.get(limiter.names.rpm(TOKEN, int(time.time() // 60))) or 0)


def leases(limiter):
    return limiter.redis.zcard(limiter.names.parallel(TOKEN))


def test_refund_gives_back_the_rpm_count_and_the_lease(limiter):
    slots = [limiter.acquire(TOKEN, LIMITED, f"r{i}") for i in range(2)]
    assert (rpm_count(limiter), leases(limiter)) == (2, 2)
    limiter.refund(slots[0])
    assert (rpm_count(limiter), leases(limiter)) == (1, 1)
    limiter.refund(slots[0])  # idempotent
    assert (rpm_count(limiter), leases(limiter)) == (1, 1)
    assert slots[0].request_id not in limiter.leases.held  # the renewer lets it go


def test_refund_never_creates_a_window_that_is_gone(limiter):
    slot = limiter.acquire(TOKEN, {"rpm_limit": 5}, "r")
    window = slot.rpm_name
    limiter.redis.delete(window)  # the minute ended and its counter expired
    limiter.refund(slot)
    assert not limiter.redis.exists(window)


def test_refund_and_release_during_an_outage_are_written_with_the_next_batch(limiter, server):
    accounting = Accounting(limiter.redis, limiter.names, {}, 100, limiter, background=False)
    refunded, released = limiter.acquire(TOKEN, LIMITED, "a"), limiter.acquire(TOKEN, LIMITED, "b")
    server.connected = False
    limiter.refund(refunded)   # never raises
    limiter.release(released)
    assert len(limiter.deferred) == 2
    server.connected = True
    assert (rpm_count(limiter), leases(limiter)) == (2, 2)  # nothing reached Redis yet
    accounting.flush()
    assert (rpm_count(limiter), leases(limiter)) == (1, 0)  # no slot leaked
    assert not limiter.deferred


def test_a_lost_acquire_reply_does_not_leak_its_lease(limiter, monkeypatch):
    from gateway.core.errors import GatewayError

    def taken_then_lost(keys, args, client=None):
        limiter.redis.zadd(keys[2], {args[4]: args[5]})  # the script ran; its reply was lost
        raise redis.exceptions.TimeoutError("Timeout reading from socket")
    monkeypatch.setattr(limiter, "_acquire", taken_then_lost)
    with pytest.raises(GatewayError) as refused:
        limiter.acquire(TOKEN, LIMITED, "lost")
    assert refused.value.status == 503
    assert leases(limiter) == 1
    Accounting(limiter.redis, limiter.names, {}, 100, limiter, background=False).flush()
    assert leases(limiter) == 0


def test_renewal_extends_held_leases_and_never_revives_a_released_one(limiter):
    kept, gone = limiter.acquire(TOKEN, LIMITED, "kept"), limiter.acquire(TOKEN, LIMITED, "gone")
    name = limiter.names.parallel(TOKEN)
    before = limiter.redis.zscore(name, kept.request_id)
    limiter.redis.expire(name, 5)
    limiter.release(gone)
    time.sleep(0.01)
    limiter.leases.renew([kept.request_id, gone.request_id])
    assert limiter.redis.zscore(name, kept.request_id) > before
    assert limiter.redis.zscore(name, gone.request_id) is None
    assert limiter.redis.ttl(name) > 100  # the set itself outlives the lease again


def test_the_renewer_keeps_a_silent_request_admitted_past_its_lease():
    from gateway.core.errors import GatewayError

    limiter = RateLimiter(fakeredis.FakeRedis(decode_responses=True), RedisNames("u:"), lease_seconds=0.4)
    slot = limiter.acquire(TOKEN, {"max_parallel_requests": 1}, "silent")
    deadline = time.monotonic() + 1.2  # three leases long, and no chunk renews anything
    while time.monotonic() < deadline:
        with pytest.raises(GatewayError):
            limiter.acquire(TOKEN, {"max_parallel_requests": 1}, "second")
        time.sleep(0.1)
    limiter.release(slot)
    limiter.acquire(TOKEN, {"max_parallel_requests": 1}, "second")
