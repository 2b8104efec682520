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
