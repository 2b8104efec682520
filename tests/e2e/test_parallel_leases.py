"""max_parallel_requests holds for requests that stay silent longer than the lease (a long
prefill): the worker's renewer keeps their slots, chunks or not. Real gunicorn, real Redis."""
import time

import requests

from tests.conftest import MASTER, REAL_REDIS_URL, gateway_environ, open_raw_stream, wait_until

LEASE = 1.0


def test_silent_requests_keep_their_slots_past_the_lease(vllm, start_gateway, real_redis_prefix):
    client, prefix = real_redis_prefix
    gw = start_gateway(gateway_environ(vllm.url, REDIS_URL=REAL_REDIS_URL, REDIS_KEY_PREFIX=prefix,
                                       PARALLEL_SLOT_LEASE_SECONDS=LEASE))
    created = requests.post(gw.url + "/key/generate", headers=MASTER, json={"max_parallel_requests": 2}).json()
    auth = {"Authorization": f"Bearer {created['key']}"}
    leases = prefix + "rl:{" + created["token"] + "}:parallel"
    # Two streams send one event, then nothing for 6 s (six leases long).
    streams = [open_raw_stream(gw.port, f"quiet-{i}", key=created["key"], chunks=3, delay_ms=6000)[0]
               for i in range(2)]
    try:
        taken = dict(client.zrange(leases, 0, -1, withscores=True))
        assert len(taken) == 2
        # The renewer extended both leases without a chunk ...
        assert wait_until(lambda: all((client.zscore(leases, m) or 0) > s for m, s in taken.items()), timeout=LEASE)
        # ... and keeps doing so: for three lease lengths, a third request is refused.
        until = time.monotonic() + 3 * LEASE
        while time.monotonic() < until:
            third = requests.get(gw.url + "/vllm/v1/models", headers=auth)
            assert third.status_code == 429, "a silent request lost its parallel slot"
            time.sleep(LEASE / 5)
        assert client.zcard(leases) == 2
    finally:
        for s in streams:
            s.close()
    # The callers left: their slots come back at once, not after a lease.
    assert wait_until(lambda: requests.get(gw.url + "/vllm/v1/models", headers=auth).status_code == 200,
                      timeout=LEASE)
    assert wait_until(lambda: client.zcard(leases) == 0, timeout=LEASE)
