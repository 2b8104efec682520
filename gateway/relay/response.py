"""vLLM's answer on its way back to the caller: headers, and the body as a generator.

The body is relayed raw (`decode_content=False`), so `Content-Encoding` and `Content-Length`
stay true to it (LiteLLM #25624). A chunked answer is relayed one HTTP chunk at a time, so each
SSE event goes out as soon as vLLM sent it; any other body as its bytes arrive.
"""
from __future__ import annotations

import http.client
import socket
import time

from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.http import is_hop_by_hop_header

from gateway.core.errors import GatewayError
from gateway.relay.disconnect import watch

# A non-stream body up to this size is read whole, so the reply goes out in one write.
SMALL_BODY = 256 * 1024
READ_SIZE = 64 * 1024
# What reading vLLM's body raises when it breaks: urllib3's errors, a socket error, a read on a
# file already closed (ValueError), http.client's own.
BODY_ERRORS = (Urllib3Error, OSError, ValueError, http.client.HTTPException)


_LOCATIONS = ("location", "content-location")


def response_headers(resp, upstream) -> list[tuple[str, str]]:
    """vLLM's headers, duplicates and order kept, minus hop-by-hop ones (and those named in
    Connection) and its X-Request-Id (the gateway sets its own). Nothing of vLLM's secrets goes
    out: a header holding the upstream key is dropped, and a Location naming vLLM's internal
    address is rewritten to the gateway's /vllm path."""
    raw = resp.raw.headers
    connection = raw.get("connection")
    named = {t.strip().lower() for t in connection.split(",")} if connection else ()
    secret = upstream.api_key
    out = []
    for name, value in raw.iteritems():
        lower = name.lower()
        if is_hop_by_hop_header(name) or lower in named or lower == "x-request-id":
            continue
        if secret and secret in value:
            continue
        if lower in _LOCATIONS:
            value = upstream.public_location(value)
            if value is None:
                continue
        out.append((name, value))
    if raw.get("content-type", "").startswith("text/event-stream"):
        out.append(("X-Accel-Buffering", "no"))  # nginx would otherwise buffer the SSE stream
    return out


def read_small_body(resp, method: str) -> bytes | None:
    """The whole body when it is short and of known length (or a HEAD answer), else None."""
    raw = resp.raw
    if method != "HEAD":
        length = raw.headers.get("content-length", "")
        if raw.chunked or not length.isdigit() or int(length) > SMALL_BODY:
            return None
    try:
        return raw.read(decode_content=False)
    except BODY_ERRORS:
        resp.close()
        raise GatewayError(502, "vLLM's response broke off before its end", kind="stream_broken") from None


class RelayedBody:
    """Iterates vLLM's body as it arrives; `close()` (from the response's close callbacks)
    releases or closes the upstream connection and runs `on_close` exactly once.

    Closing is not left to the generator's `finally`: a server may close a body it never
    iterated (HEAD, a caller gone before the first byte), and then that would never run.
    `observer.on_chunk` sees each chunk after it was handed to the server, so looking at it
    never delays it.
    """

    def __init__(self, resp, record, observer=None, client_socket=None, on_close=None):
        self.resp = resp
        self.record = record
        self.observer = observer
        self.client_socket = client_socket
        self.on_close = on_close
        self.complete = False
        self.closed = False
        self.client_gone = False
        self.watcher = watch(client_socket, self._client_gone)

    def _client_gone(self):
        self.client_gone = True
        # Wakes the relay loop blocked on vLLM's socket (urllib3's documented way to interrupt a
        # read); the loop then ends and close() closes the connection, so vLLM sees it close.
        try:
            self.resp.raw.shutdown()
        except (RuntimeError, ValueError, OSError):
            pass  # the body is complete or the response already closed

    def _pieces(self):
        raw = self.resp.raw
        if raw.chunked:
            return raw.read_chunked(None, decode_content=False)
        return iter(lambda: raw.read1(READ_SIZE, decode_content=False), b"")

    def __iter__(self):
        record = self.record
        try:
            for chunk in self._pieces():
                if record.ttfb is None:
                    record.ttfb = time.monotonic()
                record.bytes_out += len(chunk)
                yield chunk
                if self.observer is not None:
                    self.observer.on_chunk(chunk)
            self.complete = True
        except BODY_ERRORS as exc:
            # The head is gone already: say why in the log, and make sure the caller can tell.
            record.error = "client disconnected" if self.client_gone else f"upstream stream broke: {type(exc).__name__}"
            if not self.client_gone:
                self._cut_caller_connection()

    def _cut_caller_connection(self):
        """A body that ends short of its Content-Length must not end as if it were complete:
        the caller's connection is closed, so the caller sees the truncation and nothing is
        read from that connection as the start of the next answer."""
        if self.resp.raw.headers.get("content-length") and self.client_socket is not None:
            try:
                self.client_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.kill()  # before gunicorn reads the next request from the same socket
        if not self.complete and self.record.error is None:
            self.record.error = "client disconnected"
        # A finished body has already put its connection back in the pool; an unfinished one
        # is closed, so vLLM aborts the generation (LiteLLM #30244).
        self.resp.close()
        if self.on_close is not None:
            self.on_close()
