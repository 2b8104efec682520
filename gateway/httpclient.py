"""A lean HTTP/1.1 client for the relay: pooled keep-alive sockets, httptools' C parser.

Why not urllib3 here: py-spy on a worker at concurrency 32 put `urlopen` at 36% of the
worker's own time, most of it in http.client's header parsing (email.parser), connection
checks through several layers and response-object set-up. A relay needs none of the
conveniences: it sends bytes it already has and hands back status, headers and body pieces
as they arrive. httptools (llhttp, the parser uvicorn uses) does the protocol parsing.

Works on gevent-patched sockets (the gunicorn worker) and on plain ones (tests).
"""
from __future__ import annotations

import collections
import select
import socket
import ssl
import time

import httptools


class UpstreamError(Exception):
    """Transport failure. `phase` is 'connect', 'send', 'head' or 'body'."""

    def __init__(self, phase: str, kind: str):
        super().__init__(f"{phase}: {kind}")
        self.phase = phase
        self.kind = kind


class UpstreamTimeout(UpstreamError):
    pass


def _kind(exc: BaseException) -> str:
    """A short, secret-free name for a socket failure."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return "name resolution failed"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, httptools.HttpParserError):
        return "malformed HTTP response"
    return type(exc).__name__


class Response:
    """One response: status, headers, then body pieces as they arrive (chunk framing removed)."""

    __slots__ = ("_pool", "_sock", "_parser", "_pieces", "status", "reason", "headers", "_lower",
                 "_head_done", "complete", "_keep_alive", "_until_close", "_head")

    def __init__(self, pool, sock, head_only: bool):
        self._pool = pool
        self._sock = sock
        self._parser = httptools.HttpResponseParser(self)
        self._pieces: list[bytes] = []
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._lower: dict[str, str] = {}
        self._head_done = False
        self.complete = False
        self._keep_alive = True
        self._until_close = False
        self._head = head_only

    # httptools callbacks -------------------------------------------------------------------
    def on_status(self, reason: bytes):
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes):
        name_s, value_s = name.decode("latin-1"), value.decode("latin-1")
        self.headers.append((name_s, value_s))
        self._lower.setdefault(name_s.lower(), value_s)

    def on_headers_complete(self):
        self.status = self._parser.get_status_code()
        self._head_done = True
        lower = self._lower
        self._keep_alive = (self._parser.should_keep_alive()
                            and "close" not in lower.get("connection", "").lower())
        self._until_close = ("content-length" not in lower
                             and "chunked" not in lower.get("transfer-encoding", "").lower()
                             and self.status >= 200 and self.status not in (204, 304))

    def on_body(self, data: bytes):
        self._pieces.append(data)

    def on_message_complete(self):
        self.complete = True

    # reading -------------------------------------------------------------------------------
    def header(self, name: str, default: str = "") -> str:
        """First value of a header, by lower-case name."""
        return self._lower.get(name, default)

    def _feed(self, phase: str) -> bool:
        """Read once from the socket into the parser; False on a clean end of stream."""
        try:
            data = self._sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise UpstreamTimeout(phase, "timed out") from None
        except OSError as exc:
            raise UpstreamError(phase, _kind(exc)) from None
        if not data:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            raise UpstreamError(phase, _kind(exc)) from None
        return True

    def read_head(self, first_byte_phase: str = "head") -> None:
        while not self._head_done:
            if not self._feed(first_byte_phase):
                raise UpstreamError(first_byte_phase, "connection closed before a response")
            # 1xx informational answers (never expected from vLLM) are skipped.
            if self._head_done and 100 <= self.status < 200:
                self._head_done = False
                self.headers, self._lower = [], {}
        if self._head or self.status in (204, 304):
            self.complete = True

    def pieces(self):
        """Body pieces as they arrive: one per HTTP chunk for chunked bodies."""
        while True:
            if self._pieces:
                pieces, self._pieces = self._pieces, []
                yield from pieces
            if self.complete:
                return
            if not self._feed("body"):
                if self._until_close:
                    self.complete = True
                    self._keep_alive = False
                    return
                raise UpstreamError("body", "connection closed mid-body")

    def read_all(self) -> bytes:
        return b"".join(self.pieces())

    def release(self) -> None:
        """Return the connection to the pool when the exchange ended cleanly, else close it."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.complete and self._keep_alive and not self._pieces:
            self._pool.put(sock)
        else:
            _close(sock)

    def close(self) -> None:
        """Abort: the upstream sees the connection close (vLLM then stops generating)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            _close(sock)


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _dropped(sock) -> bool:
    """An idle pooled connection that is readable has been closed (or spoke out of turn)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class ConnectionPool:
    """Keep-alive connections to one host, most recently used first.

    An idle connection is kept at most `max_idle` seconds: vLLM's server (uvicorn) closes idle
    keep-alive connections after 5 s, and reusing one just as it does so fails the request.
    Old ones are closed as new ones come back, so a burst does not leave hundreds of dead
    sockets (file descriptors) behind.
    """

    def __init__(self, host: str, port: int, *, tls: bool, connect_timeout: float,
                 read_timeout: float, maxsize: int, ca_bundle: str | None = None, max_idle: float = 4.0):
        self.host, self.port = host, port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.maxsize = maxsize
        self.max_idle = max_idle
        self.idle: collections.deque = collections.deque()  # (socket, time it came back)
        self.tls_context = None
        if tls:
            import certifi  # by default the CA bundle requests uses, so both paths trust the same roots

            self.tls_context = ssl.create_default_context(cafile=ca_bundle or certifi.where())

    def _connect(self):
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except (socket.timeout, TimeoutError):
            raise UpstreamTimeout("connect", "timed out") from None
        except OSError as exc:
            raise UpstreamError("connect", _kind(exc)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is not None:
            try:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
            except (ssl.SSLError, OSError) as exc:
                _close(sock)
                raise UpstreamError("connect", f"TLS handshake failed ({type(exc).__name__})") from None
        sock.settimeout(self.read_timeout)
        return sock

    def get(self):
        now = time.monotonic()
        while self.idle:
            sock, since = self.idle.pop()
            if now - since < self.max_idle and not _dropped(sock):
                return sock
            _close(sock)
        return self._connect()

    def put(self, sock) -> None:
        now = time.monotonic()
        idle = self.idle
        while idle and (now - idle[0][1] >= self.max_idle or len(idle) >= self.maxsize):
            _close(idle.popleft()[0])
        idle.append((sock, now))

    def request(self, head: bytes, body: bytes | None, head_only: bool) -> Response:
        """Send a ready request head (and body) and read the response head."""
        sock = self.get()
        try:
            if body and len(body) > 65536:
                sock.sendall(head)
                sock.sendall(body)
            else:
                sock.sendall(head + body if body else head)
        except (socket.timeout, TimeoutError):
            _close(sock)
            raise UpstreamTimeout("send", "timed out") from None
        except OSError as exc:
            _close(sock)
            raise UpstreamError("send", _kind(exc)) from None
        resp = Response(self, sock, head_only)
        try:
            resp.read_head()
        except UpstreamError:
            resp.close()
            raise
        return resp
