"""A scripted raw-socket HTTP "server" on loopback, for tests of hostile or broken upstreams.

Each accepted connection gets a thread that reads one HTTP request per turn (head, then a
Content-Length body) and hands it to the current `script(conn, request)`, which writes
whatever raw bytes it likes through `conn`. The script's return value decides what happens
next on that connection:

    None / True  keep the connection and read the next request (keep-alive)
    False        close the connection

While waiting for the next request the server closes a connection that stays idle longer
than `idle_timeout` seconds (None: wait forever), as uvicorn does after 5 s.

`script` can be swapped at any time (`server.script = ...`); `reset()` also closes every live
connection (waking any script that sleeps through `conn.sleep`) and forgets what was
recorded, so one test's leftovers cannot leak into the next. `stop()` closes every socket and
joins every thread.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

MAX_REQUEST_HEAD = 1024 * 1024


def response(status: int = 200, reason: str = "OK", headers=(), body: bytes = b"",
             content_length: int | None = None) -> bytes:
    """Raw bytes of one HTTP/1.1 response. `content_length` defaults to len(body); pass -1 to
    send no Content-Length header at all."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
    if content_length is None:
        content_length = len(body)
    if content_length >= 0:
        lines.append(f"Content-Length: {content_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body


def ok_response(body: bytes = b'{"ok":true}', extra_headers=(), content_type: str = "application/json") -> bytes:
    """A complete `200 OK` with a JSON (by default) body and a correct Content-Length."""
    return response(200, "OK", [("Content-Type", content_type), *extra_headers], body)


def informational(status: int, reason: str, headers=()) -> bytes:
    """An interim 1xx response (100 Continue, 103 Early Hints): head only, no body."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"] + [f"{n}: {v}\r\n" for n, v in headers] + ["\r\n"]
    return "".join(lines).encode("latin-1")


@dataclass
class Request:
    """One request as received: its raw head (bytes up to and including the blank line) and body."""

    conn_number: int
    head: bytes
    body: bytes

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def method(self) -> str:
        return self.request_line.split(" ", 1)[0]

    @property
    def path(self) -> str:
        parts = self.request_line.split(" ")
        return parts[1] if len(parts) > 1 else ""

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


class Conn:
    """One accepted connection, as a script sees it."""

    def __init__(self, server: "HostileUpstream", sock: socket.socket, number: int):
        self.server = server
        self.sock = sock
        self.number = number
        self.requests_served = 0
        self.closed = threading.Event()  # set when the test harness (or the script) closed it
        self._buffer = b""
        self._lock = threading.Lock()

    # for scripts --------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Write bytes; False when the peer is gone or the connection was closed."""
        if self.closed.is_set():
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def sleep(self, seconds: float) -> bool:
        """Sleep as part of a scenario; returns False early when the connection is being closed."""
        return not self.closed.wait(seconds)

    def close(self) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def peer_closed(self, timeout: float) -> bool:
        """Wait up to `timeout` for the peer to close its side (EOF or reset); True if it did.
        Unread request bytes that arrive meanwhile are kept for the next turn."""
        deadline = time.monotonic() + timeout
        while not self.closed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(min(remaining, 0.2))
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return True
            if not data:
                return True
            self._buffer += data
        return True

    # for the server -----------------------------------------------------------------------
    def _recv(self, idle_timeout: float | None, first: bool) -> bytes:
        """One recv. Waits at most `idle_timeout` for the first byte of a request (then b'')."""
        deadline = None if not first or idle_timeout is None else time.monotonic() + idle_timeout
        while True:
            if self.closed.is_set():
                return b""
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                return b""  # idle too long: close, like uvicorn's keep-alive timeout
            self.sock.settimeout(wait)
            try:
                return self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return b""

    def read_request(self, idle_timeout: float | None) -> Request | None:
        """The next request on this connection, or None when it ended (EOF, idle, closed)."""
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > MAX_REQUEST_HEAD:
                return None
            data = self._recv(idle_timeout, first=not self._buffer)
            if not data:
                return None
            self._buffer += data
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            data = self._recv(None, first=False)
            if not data:
                return None
            rest += data
        body, self._buffer = rest[:length], rest[length:]
        return Request(self.number, head, body)


def default_script(conn: Conn, request: Request):
    conn.send(ok_response())


@dataclass
class _Records:
    requests: list = field(default_factory=list)  # (connection number, request head as str)
    objects: list = field(default_factory=list)   # the Request objects, same order


class HostileUpstream:
    """The scripted server. Use as a context manager or call start()/stop()."""

    def __init__(self, script=default_script):
        self.script = script
        self.idle_timeout: float | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._numbers = itertools.count(1)
        self._cond = threading.Condition()
        self._records = _Records()
        self._conns: dict[int, tuple[Conn, threading.Thread]] = {}
        self.connections = 0          # accepted since the last reset()
        self.script_errors: list[str] = []
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="hostile-accept", daemon=True)

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> "HostileUpstream":
        self._accept_thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        """Close the listener and every connection; join every thread."""
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        if self._accept_thread.is_alive():
            self._accept_thread.join(5)
        self._close_all()

    def reset(self, script=None, idle_timeout: float | None = None) -> None:
        """Close live connections (their threads are joined), forget records, set the script."""
        self._close_all()
        with self._cond:
            self._records = _Records()
            self.connections = 0
            self.script_errors = []
        self.script = script or default_script
        self.idle_timeout = idle_timeout

    def _close_all(self) -> None:
        with self._cond:
            live = list(self._conns.values())
        for conn, _ in live:
            conn.close()
        for _, thread in live:
            thread.join(10)
        with self._cond:
            for conn, thread in live:
                if not thread.is_alive():
                    self._conns.pop(conn.number, None)

    @property
    def threads_alive(self) -> int:
        with self._cond:
            return sum(1 for _, t in self._conns.values() if t.is_alive()) + int(self._accept_thread.is_alive())

    # records ------------------------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[int, str]]:
        """(connection number, request head) for every request received since the last reset."""
        with self._cond:
            return list(self._records.requests)

    @property
    def request_objects(self) -> list[Request]:
        with self._cond:
            return list(self._records.objects)

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[tuple[int, str]]:
        """Block until at least `count` requests were received; returns the records."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._records.requests) >= count, timeout):
                raise TimeoutError(f"upstream saw {len(self._records.requests)} requests, expected {count}")
            return list(self._records.requests)

    # internals ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping.is_set():
                sock.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock, next(self._numbers))
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"hostile-conn-{conn.number}",
                                      daemon=True)
            with self._cond:
                # drop finished connections' entries as we go
                for number in [n for n, (c, t) in self._conns.items() if not t.is_alive()]:
                    del self._conns[number]
                self._conns[conn.number] = (conn, thread)
                self.connections += 1
            thread.start()

    def _serve(self, conn: Conn) -> None:
        try:
            while not conn.closed.is_set():
                request = conn.read_request(self.idle_timeout)
                if request is None:
                    return
                with self._cond:
                    self._records.requests.append((conn.number, request.head.decode("latin-1")))
                    self._records.objects.append(request)
                    self._cond.notify_all()
                script = self.script
                try:
                    keep = script(conn, request)
                except Exception as exc:  # a broken script must show up in the test, not vanish
                    with self._cond:
                        self.script_errors.append(f"{type(exc).__name__}: {exc}")
                    return
                conn.requests_served += 1
                if keep is False:
                    return
        finally:
            conn.close()
