"""gunicorn's gevent worker with a cap on connections per client address.

A worker serves at most `worker_connections` connections at once; past that it stops
accepting and everyone waits. Slow clients (a head sent half, a body one byte every few
seconds) each hold a connection until a deadline ends it (the keep-alive timeout for heads,
REQUEST_BODY_TIMEOUT for bodies), so one client address opening thousands of them could
take every slot. This worker closes a new connection at once when its address already holds
MAX_CONNECTIONS_PER_CLIENT of them (default: half of worker_connections; 0 turns it off),
so others keep being served. Behind a proxy every connection comes from the proxy's address:
raise the cap, or set 0, there (README, "Slow clients").

Loaded by gunicorn from gunicorn.conf.py (`worker_class`), so like gunicorn's own gevent
worker it is imported in the master: nothing here may import requests or open sockets.
"""
from __future__ import annotations

import collections
import os

from gunicorn.workers.ggevent import GeventWorker


def connection_cap(worker_connections: int, environ=os.environ) -> int:
    """Connections one client address may hold per worker (0: no cap)."""
    raw = environ.get("MAX_CONNECTIONS_PER_CLIENT", "").strip()
    if not raw:
        return max(worker_connections // 2, 1)
    if not raw.isascii() or not raw.isdigit():
        raise ValueError(f"MAX_CONNECTIONS_PER_CLIENT must be a whole number (0: no cap), got {raw!r}")
    return int(raw)


class CappedGeventWorker(GeventWorker):
    """GeventWorker, plus the per-address cap (`handle` runs once per accepted connection)."""

    def init_process(self):
        self.client_cap = connection_cap(self.worker_connections)
        self.per_client = collections.Counter()
        super().init_process()

    def handle(self, listener, client, addr):
        address = addr[0] if isinstance(addr, tuple) else None  # None: a unix socket
        if address is None or not self.client_cap:
            return super().handle(listener, client, addr)
        if self.per_client[address] >= self.client_cap:
            client.close()  # frees the slot at once; the client sees the connection closed
            return None
        self.per_client[address] += 1
        try:
            return super().handle(listener, client, addr)
        finally:
            self.per_client[address] -= 1
            if not self.per_client[address]:
                del self.per_client[address]
