"""Notice a client that hangs up while vLLM is silent (a long prefill, a slow tool call).

A WSGI app normally learns of a disconnect only when its next write fails, which during a
silence can be minutes of GPU time for nobody. On a gevent worker a small greenlet waits on the
client socket instead: end-of-stream there means the client left, and the upstream connection
is closed at once so vLLM aborts the request (LiteLLM #30244).
"""
from __future__ import annotations

import socket

from gateway.core.runtime import gevent_patched


def watch(client_socket, on_gone):
    """Start watching; returns the greenlet (kill it when the response ends), or None."""
    if client_socket is None or not gevent_patched():
        return None
    import gevent

    def wait_for_eof():
        try:
            data = client_socket.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:  # data instead would be the client's next (pipelined) request: not a hang-up
            on_gone()

    return gevent.spawn(wait_for_eof)


class CallerGone(Exception):
    """The caller hung up while the gateway waited for vLLM's answer."""


def interrupt_wait_on_hang_up(client_socket):
    """While the request waits for vLLM's response head (a long prefill can take minutes):
    if the caller hangs up, raise CallerGone where the request waits, so its upstream
    connection is closed and vLLM aborts at once. Returns `stop()`, to call as soon as the
    head arrived (before anything else can run), or None off gevent.

    An io watcher on the caller's socket, not a greenlet: it costs a few microseconds per
    request, and its callback only peeks (a pipelined next request is data, not a hang-up).
    """
    if client_socket is None or not gevent_patched():
        return None
    import gevent

    waiter = gevent.getcurrent()
    raw = getattr(client_socket, "_sock", client_socket)  # gevent's socket wraps the real one
    watcher = gevent.get_hub().loop.io(client_socket.fileno(), 1)  # 1: readable

    def readable():
        try:
            data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        watcher.stop()
        if not data:
            waiter.throw(CallerGone())  # runs in the hub, like gevent.Timeout's callback

    watcher.start(readable)

    def stop():
        watcher.stop()
        watcher.close()
    return stop
