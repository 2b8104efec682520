"""Admission control: when every replica is saturated, requests wait here instead of piling
onto vLLM, served fairly across keys.

The queue is per worker and bounded (ROUTING_QUEUE_MAX requests). A request enters it only
when a request must not go out now: the queue already holds others (a new arrival never
overtakes them), or `has_room()` says every healthy replica is saturated
(gateway/relay/choice.py). Waiting requests are let out when there is room again:

- fairly: one FIFO per key (a virtual key's token; the master key is one key of its own),
  served round-robin, one request per key per turn, so one key flooding the queue delays its
  own requests, not the others';
- one at a time: the request let out is counted on its replica when it is sent (its
  `pump()` call then lets the next out if there is still room), so a replica that frees one
  place does not receive the whole queue at once;
- on every refresh of the figures (the poller's round), every local request's end and every
  send.

A request waits ROUTING_QUEUE_TIMEOUT at most, then 503 with Retry-After; a full queue is a 503
with Retry-After at once. A caller hanging up while queued leaves the queue at once (499). All
three are GatewayErrors raised inside the exchange, so its error path gives back everything the
request held (parallel slot, budget reservation) and accounts for it.
"""
from __future__ import annotations

import collections
import threading
import time

from gateway.core.errors import GatewayError
from gateway.core.runtime import gevent_patched
from gateway.relay.disconnect import CallerGone, interrupt_wait_on_hang_up

SHED_REASONS = ("queue_full", "timeout", "client_gone")
RETRY_AFTER_SECONDS = 2


class _Waiter:
    __slots__ = ("key", "event", "released")

    def __init__(self, key: str, event):
        self.key = key
        self.event = event
        self.released = False


class Admission:
    """The per-worker bounded, fair queue in front of the replicas."""

    def __init__(self, has_room, *, max_waiting: int, timeout: float, metrics=None,
                 retry_after: int = RETRY_AFTER_SECONDS):
        self.has_room = has_room
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.metrics = metrics
        self.retry_after = retry_after
        self.queues: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self.length = 0   # requests waiting in `queues`
        self._lock = threading.RLock()
        if gevent_patched():
            from gevent.event import Event
            self._event = Event
        else:
            self._event = threading.Event

    def enter(self, key: str, client_socket=None) -> float:
        """Return when the request may go to a replica (the seconds it waited), or raise a 503
        (queue full, waited too long) or 499 (the caller hung up meanwhile)."""
        with self._lock:
            if not self.length and self.has_room():
                return 0.0
            if self.length >= self.max_waiting:
                self._shed("queue_full")
                raise GatewayError(503, f"every vLLM replica is saturated and this gateway's queue is full "
                                        f"({self.max_waiting} requests); retry shortly",
                                   headers={"Retry-After": str(self.retry_after)})
            waiter = _Waiter(key, self._event())
            self.queues.setdefault(key, collections.deque()).append(waiter)
            self.length += 1
            self._gauge(1)
        started = time.monotonic()
        stop_watching = interrupt_wait_on_hang_up(client_socket)
        try:
            self.pump()  # room may have come meanwhile (or the queue was only non-empty)
            released = waiter.event.wait(self.timeout)
        except CallerGone:
            if not self._leave(waiter):
                self.pump()  # it had just been let out: its place goes to the next
            self._observe(time.monotonic() - started)
            self._shed("client_gone")
            raise GatewayError(499, "client disconnected while queued for a vLLM replica") from None
        finally:
            if stop_watching is not None:
                stop_watching()
        waited = time.monotonic() - started
        self._observe(waited)
        if not released and self._leave(waiter):
            self._shed("timeout")
            raise GatewayError(503, f"every vLLM replica stayed saturated for {self.timeout:g}s while this "
                                    "request was queued; retry shortly",
                               headers={"Retry-After": str(self.retry_after)})
        return waited

    def pump(self) -> None:
        """Let the next waiting request out if a replica has room (round-robin over keys)."""
        if not self.length:
            return
        with self._lock:
            if not self.length or not self.has_room():
                return
            waiter = self._next()
            if waiter is None:
                return
            waiter.released = True
            self.length -= 1
            self._gauge(-1)
        waiter.event.set()

    def _next(self):
        """The first waiter of the key whose turn it is; that key goes to the back."""
        if not self.queues:
            return None
        key, queue = next(iter(self.queues.items()))
        waiter = queue.popleft()
        if queue:
            self.queues.move_to_end(key)
        else:
            del self.queues[key]
        return waiter

    def _leave(self, waiter: _Waiter) -> bool:
        """Take a waiter that gives up (timeout, caller gone) out of its queue; False when it
        had been let out already (just before it gave up)."""
        with self._lock:
            if waiter.released:
                return False
            queue = self.queues.get(waiter.key)
            if queue is not None:
                queue.remove(waiter)
                if not queue:
                    del self.queues[waiter.key]
            self.length -= 1
            self._gauge(-1)
            return True

    def _observe(self, waited: float) -> None:
        if self.metrics is not None:
            self.metrics.admission_wait.observe(waited)

    def _shed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_shed(reason).inc()

    def _gauge(self, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.admission_queue.inc(delta)
