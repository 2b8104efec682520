"""A short-lived in-process cache of virtual-key records, kept honest across workers.

Looking a key up in Redis on every request cost 40% of a worker's throughput (bench). A record
is kept for at most TTL (under one second); every admin change (update, block, delete,
regenerate) evicts the token here and publishes it on a Redis channel that every worker of
every gateway instance listens to, so revocations normally land in milliseconds and at worst
within TTL. Expiry is checked against the record's own deadline on every request.

On a Redis Cluster the channel is a sharded one (SPUBLISH/SSUBSCRIBE): classic pub/sub there
copies every message to every node. The listener subscribes on the node that owns the
channel's slot; when that node fails, the subscription breaks, and the listener subscribes
again (on the promoted node) and clears the cache, since changes published meanwhile are lost.
"""
from __future__ import annotations

import logging
import time

from gateway.core.redisconn import REDIS_ERRORS, incidents, is_cluster

log = logging.getLogger("gateway")

MAX_ENTRIES = 50_000


def publish_changes(client, channel: str, tokens) -> None:
    """Tell every worker (of every instance) to drop these tokens; raises Redis errors."""
    send = client.spublish if is_cluster(client) else client.publish
    for token in tokens:
        send(channel, token)


class KeyCache:
    def __init__(self, client, channel: str, ttl: float):
        self.redis = client
        self.channel = channel
        self.ttl = ttl
        self.entries: dict[str, tuple[float, dict, tuple]] = {}
        self._listening = False
        self.sharded = is_cluster(client)


    def get(self, token: str):
        """(record, budget) when cached and fresh, else None."""
        hit = self.entries.get(token)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            self.entries.pop(token, None)
            return None
        return hit[1], hit[2]

    def put(self, token: str, record: dict, budget: tuple) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()  # crude but bounded; entries live under a second anyway
        self.entries[token] = (time.monotonic() + self.ttl, record, budget)

    def evict(self, tokens) -> None:
        """Drop tokens from this worker's cache (the key store publishes them for the others)."""
        for token in tokens:
            self.entries.pop(token, None)

    def listen_in_background(self) -> None:
        """On a gevent worker: evict what other workers publish (started once, after fork)."""
        if self._listening:
            return
        self._listening = True
        import gevent

        gevent.spawn(self._listen_forever)

    def _listen_forever(self) -> None:
        import gevent

        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                for token in self._messages(pubsub):
                    self.entries.pop(token, None)
            except REDIS_ERRORS as exc:  # an outage: logged once per incident, not every second
                incidents.report(exc, "The key cache listener reconnects every second.")
            except Exception as exc:
                log.warning("key cache listener reconnecting (%s)", type(exc).__name__)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass
            self.entries.clear()
            gevent.sleep(1.0)

    def _messages(self, pubsub):
        """The tokens published on the channel, until the subscription breaks (raises)."""
        if self.sharded:
            pubsub.ssubscribe(self.channel)
            self.entries.clear()  # anything published while we were not listening is lost
            while True:
                message = pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=5.0)
                if message and message.get("type") == "smessage":
                    yield message["data"]
        pubsub.subscribe(self.channel)
        self.entries.clear()
        for message in pubsub.listen():
            if message.get("type") == "message":
                yield message["data"]
