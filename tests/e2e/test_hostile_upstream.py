"""Hostile or broken upstreams, each played by a raw-socket server the test scripts
(tests/hostile_upstream.py), in front of ONE real gunicorn gevent gateway.

Every assertion is about what a client of the gateway sees (status, headers, body bytes,
whether its connection stays open) or what the upstream saw on the wire (which connection
each request came on) — never about the gateway's internals. The client is a raw socket so
that nothing on the client side (header count limits, keep-alive handling, retries) hides
what the gateway actually sent.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY, GatewayServer, gateway_environ, sent_for
from tests.hostile_upstream import (
    HostileUpstream,
    informational,
    ok_response,
    response,
)

CHAT_PATH = "/vllm/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD_TIMEOUT = 2.0   # UPSTREAM_HEAD_TIMEOUT given to the gateway
READ_TIMEOUT = 3.0   # UPSTREAM_READ_TIMEOUT given to the gateway
RSS_LIMIT_KB = 200 * 1024


# -- a raw HTTP/1.1 client ----------------------------------------------------------------------

class Reply:
    def __init__(self, status, reason, headers, body, head_bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.head_bytes = head_bytes

    def header(self, name: str):
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Reply {self.status} {self.reason} headers={len(self.headers)} body={self.body[:200]!r}>"


class Client:
    """One client connection to the gateway; several requests may go over it (keep-alive)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, method: str, path: str, body: bytes = b"", request_id: str | None = None, headers=()):
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {MASTER_KEY}"]
        if request_id:
            lines.append(f"X-Request-Id: {request_id}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _more(self, what: str) -> bytes:
        try:
            data = self.sock.recv(1024 * 1024)
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"the gateway sent nothing more within {self.sock.gettimeout()}s "
                                 f"while we waited for {what} (have {len(self.buf)} bytes: {self.buf[:200]!r})") from None
        except ConnectionResetError:
            raise AssertionError(f"the gateway reset the connection while we waited for {what}") from None
        if not data:
            raise AssertionError(f"the gateway closed the connection while we waited for {what} "
                                 f"(have {len(self.buf)} bytes: {self.buf[:200]!r})")
        return data

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._more("a response head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), f"not an HTTP response (client connection desynced?): {head[:200]!r}"
        lines = head.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ", 2)
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep, f"malformed header line from the gateway: {line[:200]!r}"
            headers.append((name.strip(), value.strip()))
        return status, reason, headers, head

    def read_response(self, method: str = "POST") -> Reply:
        while True:
            status, reason, headers, head = self.read_head()
            if not 100 <= status < 200:
                break
        reply = Reply(status, reason, headers, b"", head)
        if method == "HEAD" or status in (204, 304):
            return reply
        if "chunked" in (reply.header("transfer-encoding") or "").lower():
            reply.body = self._read_chunked()
        elif reply.header("content-length") is not None:
            length = int(reply.header("content-length"))
            while len(self.buf) < length:
                self.buf += self._more(f"the rest of a {length}-byte body")
            reply.body, self.buf = self.buf[:length], self.buf[length:]
        else:
            reply.body = self.read_to_eof()[0]
        return reply

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                self.buf += self._more("a chunk size")
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self.buf += self._more("a chunk")
            body += self.buf[:size]
            self.buf = self.buf[size + 2:]
            if size == 0:
                return body

    def read_to_eof(self):
        """(every byte until the gateway closes, True) or (bytes so far, False) on timeout."""
        data, self.buf = self.buf, b""
        while True:
            try:
                more = self.sock.recv(1024 * 1024)
            except (socket.timeout, TimeoutError):
                return data, False
            except ConnectionResetError:
                return data, True
            if not more:
                return data, True
            data += more

    def request(self, method: str, path: str, body: bytes = b"", request_id: str | None = None) -> Reply:
        self.send(method, path, body, request_id)
        return self.read_response(method)


def attempt(call):
    """The call's result, or the AssertionError text when it failed (to report it together
    with later checks)."""
    try:
        return call()
    except AssertionError as exc:
        return f"{exc}"


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def echo_body(request) -> bytes:
    """A body unique to the request: it names the request id the gateway forwarded."""
    return json.dumps({"echo": request.header("x-request-id")}).encode()


def echoes(body: bytes, request_id: str) -> bool:
    """The body is the echo of the request the caller sent with X-Request-Id `request_id`."""
    try:
        return sent_for(json.loads(body)["echo"], request_id)
    except (ValueError, KeyError, TypeError):
        return False


def echo_script(conn, request):
    conn.send(ok_response(echo_body(request)))


def assert_error_envelope(reply: Reply, statuses=(502,)):
    assert reply.status in statuses, f"expected {statuses}, got {reply!r}"
    try:
        payload = reply.json()
    except ValueError:
        raise AssertionError(f"the error is not the gateway's JSON envelope: {reply!r}") from None
    assert isinstance(payload, dict) and isinstance(payload.get("error"), dict), \
        f"the error is not the gateway's JSON envelope: {reply!r}"
    assert payload["error"].get("message"), reply


def worker_memory_kb(gw: GatewayServer) -> dict:
    """VmRSS and VmHWM (peak RSS) of the gateway's one worker, read from /proc."""
    pids = gw.worker_pids_seen()
    assert len(pids) == 1, f"the gateway's worker was replaced (crashed?): pids {sorted(pids)}"
    pid = pids.pop()
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile():
    server = HostileUpstream(echo_script).start()
    yield server
    server.stop()
    assert server.threads_alive == 0, "the hostile upstream left threads running"


@pytest.fixture(scope="module")
def gateway_server(hostile):
    env = gateway_environ(hostile.url, UPSTREAM_READ_TIMEOUT=READ_TIMEOUT, UPSTREAM_HEAD_TIMEOUT=HEAD_TIMEOUT)
    gw = GatewayServer(env, workers=1, args=("--no-control-socket",))
    yield gw
    gw.stop()


@pytest.fixture
def upstream(hostile, gateway_server):
    """The hostile upstream, with no live connection and no records, answering with echo_script."""
    hostile.reset(echo_script)
    yield hostile
    errors = list(hostile.script_errors)
    hostile.reset(echo_script)  # closes whatever this test left hanging
    assert not errors, f"the upstream script raised: {errors}"


@pytest.fixture
def gw(gateway_server, upstream):
    assert gateway_server.proc.poll() is None, "the gateway is not running:\n" + gateway_server.stderr.text()
    return gateway_server


# -- a. interim 1xx answers -------------------------------------------------------------------

INTERIMS = {
    "103": informational(103, "Early Hints", [("Link", "</style.css>; rel=preload; as=style")]),
    "100": informational(100, "Continue"),
}


@pytest.mark.parametrize("writes", ["one_write", "two_writes", "three_writes"])
@pytest.mark.parametrize("interim", ["103", "100"])
def test_interim_1xx_then_final_answer_is_relayed_without_desync(gw, upstream, interim, writes):
    def script(conn, request):
        final = ok_response(echo_body(request), [("x-final", "yes")])
        if writes == "one_write":
            conn.send(INTERIMS[interim] + final)
        elif writes == "two_writes":
            conn.send(INTERIMS[interim])
            conn.sleep(0.05)
            conn.send(final)
        else:  # interim, final head, final body: each its own write
            head, body = final.split(b"\r\n\r\n", 1)
            conn.send(INTERIMS[interim])
            conn.sleep(0.05)
            conn.send(head + b"\r\n\r\n")
            conn.sleep(0.05)
            conn.send(body)

    upstream.script = script
    with Client(gw.port) as client:
        for turn in range(2):  # the second request on the same client connection must work too
            rid = new_id(f"interim{interim}-{turn}")
            reply = client.request("POST", CHAT_PATH, CHAT_BODY, rid)
            assert reply.status == 200, f"turn {turn}: {reply!r}"
            assert reply.header("x-final") == "yes", f"turn {turn}: final headers missing: {reply.headers}"
            assert echoes(reply.body, rid), f"turn {turn}: wrong body {reply.body!r}"


# -- b. oversized response heads ----------------------------------------------------------------

def many_header_lines():
    return [(f"X-Filler-{i}", "v" * 20) for i in range(200)]


def one_huge_line():
    return [("X-Huge", "h" * (100 * 1024))]


def eight_mib_of_headers():
    return [(f"X-Bulk-{i}", "b" * 4096) for i in range(2048)]


@pytest.mark.parametrize("make_headers", [many_header_lines, one_huge_line, eight_mib_of_headers],
                         ids=["200_lines", "one_100KiB_line", "8MiB"])
def test_oversized_response_head_is_502_and_memory_stays_bounded(gw, upstream, make_headers):
    head_headers = [("Content-Type", "application/json"), *make_headers()]

    def script(conn, request):
        conn.send(response(200, "OK", head_headers, b'{"ok":true}'))
        return False

    upstream.script = script
    with Client(gw.port, timeout=20) as client:
        reply = client.request("POST", CHAT_PATH, CHAT_BODY, new_id("bighead"))
    problems = []
    envelope = attempt(lambda: assert_error_envelope(reply, (502,)))
    if envelope is not None:
        problems.append(envelope)
    memory = worker_memory_kb(gw)
    if not (memory["VmRSS"] < RSS_LIMIT_KB and memory["VmHWM"] < RSS_LIMIT_KB):
        problems.append(f"worker memory too high: {memory} kB (limit {RSS_LIMIT_KB} kB)")
    assert not problems, "\n".join(problems) + f"\n(worker memory: {memory} kB)"


# -- c. a head that never ends ------------------------------------------------------------------

def test_trickled_endless_head_is_answered_within_the_head_timeout(gw, upstream):
    def script(conn, request):
        conn.send(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while conn.sleep(0.2) and conn.send(b"a"):
            pass
        return False

    upstream.script = script
    start = time.monotonic()
    with Client(gw.port, timeout=10) as client:
        reply = client.request("POST", CHAT_PATH, CHAT_BODY, new_id("trickle"))
    elapsed = time.monotonic() - start
    assert_error_envelope(reply, (502, 504))
    assert HEAD_TIMEOUT * 0.9 <= elapsed <= 6.0, f"answered after {elapsed:.2f}s (head timeout {HEAD_TIMEOUT}s)"


# -- d. bytes after a complete response ----------------------------------------------------------

@pytest.mark.parametrize("stray_delay", [0.0, 0.1], ids=["same_write", "100ms_later"])
def test_stray_bytes_after_a_response_never_reach_the_next_caller(gw, upstream, stray_delay):
    stray_sent = threading.Event()
    stray = response(200, "OK", [("Content-Type", "application/json"), ("x-stray", "yes")], b'{"stray":true}')

    def script(conn, request):
        good = ok_response(echo_body(request))
        if stray_sent.is_set():
            conn.send(good)
        elif stray_delay == 0:
            conn.send(good + stray)
            stray_sent.set()
        else:
            conn.send(good)
            conn.sleep(stray_delay)
            conn.send(stray)
            stray_sent.set()

    upstream.script = script
    first_id, second_id = new_id("stray-first"), new_id("stray-second")
    problems = []
    with Client(gw.port) as client:
        first = attempt(lambda: client.request("POST", CHAT_PATH, CHAT_BODY, first_id))
    if not (isinstance(first, Reply) and first.status == 200 and echoes(first.body, first_id)):
        problems.append(f"first caller did not get its own answer: {first!r}")
    assert stray_sent.wait(5), "the upstream script never sent the stray bytes"
    time.sleep(0.3)  # the scenario: the next caller comes a little later
    with Client(gw.port) as client:
        second = attempt(lambda: client.request("POST", CHAT_PATH, CHAT_BODY, second_id))
    if not (isinstance(second, Reply) and second.status == 200 and second.header("x-stray") is None
            and echoes(second.body, second_id)):
        problems.append(f"next caller did not get its own answer: {second!r}")
    seen = upstream.wait_requests(2)
    # Stray bytes still waiting on the connection when the next request comes: it is dropped.
    # (Sent in the same write, they were read into the first response's buffer and discarded
    # with it; reusing the connection is then safe, and the check above shows nothing leaked.)
    if stray_delay and seen[1][0] == seen[0][0]:
        problems.append(f"the connection that sent stray bytes (upstream connection {seen[0][0]}) "
                        "was reused for the next request")
    assert not problems, "\n".join(problems)


# -- e. a body shorter than its Content-Length ---------------------------------------------------

def test_truncated_body_closes_the_callers_connection(gw, upstream):
    truncated_sent = threading.Event()

    def script(conn, request):
        if not truncated_sent.is_set():
            truncated_sent.set()
            conn.send(response(200, "OK", [("Content-Type", "application/octet-stream")],
                               b"x" * 300_000, content_length=1_000_000))
            return False
        conn.send(ok_response(echo_body(request)))

    upstream.script = script
    with Client(gw.port, timeout=3.0) as client:
        client.send("POST", CHAT_PATH, CHAT_BODY, new_id("short"))
        status, _, headers, _ = client.read_head()
        start = time.monotonic()
        body, got_eof = client.read_to_eof()
        waited = time.monotonic() - start
    assert status == 200, f"status {status}"
    assert len(body) < 1_000_000, f"the caller got {len(body)} body bytes for a 300,000-byte truncated body"
    assert got_eof, (f"the gateway left the caller's connection open after {len(body)} of 1,000,000 bytes "
                     f"(no EOF within 3s): the caller would hang")
    assert waited < 2.0, f"EOF came only after {waited:.2f}s"
    rid = new_id("after-short")
    with Client(gw.port) as client:
        reply = client.request("POST", CHAT_PATH, CHAT_BODY, rid)
    assert reply.status == 200 and echoes(reply.body, rid), f"next request: {reply!r}"


# -- f. a HEAD answer with a body ----------------------------------------------------------------

@pytest.mark.parametrize("body_delay", [0.0, 0.05], ids=["same_write", "50ms_later"])
def test_head_answer_with_a_body_does_not_leak_into_later_answers(gw, upstream, body_delay):
    hello_sent = threading.Event()

    def script(conn, request):
        if request.method == "HEAD":
            head = response(200, "OK", [("Content-Type", "text/plain")], b"", content_length=5)
            if body_delay == 0:
                conn.send(head + b"hello")
            else:
                conn.send(head)
                conn.sleep(body_delay)
                conn.send(b"hello")
            hello_sent.set()
            return None
        conn.send(ok_response(echo_body(request)))

    upstream.script = script
    with Client(gw.port) as client:
        head_reply = client.request("HEAD", "/vllm/x", request_id=new_id("head"))
        assert head_reply.status == 200, f"HEAD: {head_reply!r}"
        assert hello_sent.wait(5), "the upstream script never sent the HEAD body"
        time.sleep(0.3)  # the scenario: the next request comes a little later
        rid = new_id("after-head")
        # Same client connection: a body relayed for HEAD would show up before this answer.
        reply = client.request("GET", "/vllm/x", request_id=rid)
    assert reply.status == 200, f"request after HEAD: {reply!r}"
    assert echoes(reply.body, rid), f"request after HEAD got {reply.body!r}"


# -- g. Connection: close from upstream ----------------------------------------------------------

def test_upstream_connection_close_does_not_close_the_callers_connection(gw, upstream):
    def script(conn, request):
        conn.send(ok_response(echo_body(request), [("Connection", "close")]))
        return False

    upstream.script = script
    with Client(gw.port) as client:
        for turn in range(2):
            rid = new_id(f"connclose-{turn}")
            reply = client.request("POST", CHAT_PATH, CHAT_BODY, rid)
            assert reply.status == 200 and echoes(reply.body, rid), f"turn {turn}: {reply!r}"
            assert "close" not in ",".join(reply.all("connection")).lower(), \
                f"turn {turn}: the caller was told Connection: close: {reply.headers}"
    seen = upstream.wait_requests(2)
    assert seen[0][0] != seen[1][0]


# -- i. upstream secrets and internal addresses ---------------------------------------------------

def test_headers_echoing_the_upstream_key_never_reach_the_caller(gw, upstream):
    def script(conn, request):
        conn.send(ok_response(echo_body(request), [("X-Debug-Auth", request.header("authorization")),
                                                   ("X-Upstream-Key", UPSTREAM_KEY), ("X-Kept", "yes")]))

    upstream.script = script
    with Client(gw.port) as client:
        reply = client.request("POST", CHAT_PATH, CHAT_BODY, new_id("echo-key"))
    assert reply.status == 200 and reply.all("x-kept") == ["yes"]
    assert UPSTREAM_KEY.encode() not in reply.head_bytes + reply.body, f"the upstream key reached the caller: {reply.headers}"
    assert not reply.all("x-debug-auth") and not reply.all("x-upstream-key")


@pytest.mark.parametrize("location,expected", [
    ("{origin}/v1/models?x=1", "/vllm/v1/models?x=1"),   # vLLM's internal address, absolute
    ("/v1/responses/resp_1", "/vllm/v1/responses/resp_1"),  # absolute path on vLLM
    ("https://docs.vllm.ai/en/latest/", "https://docs.vllm.ai/en/latest/"),  # elsewhere: unchanged
    ("models", "models"),                                   # relative: resolves under /vllm already
])
def test_redirects_name_the_gateway_never_vllms_internal_address(gw, upstream, location, expected):
    target = location.format(origin=upstream.url)

    def script(conn, request):
        conn.send(response(307, "Temporary Redirect", [("Location", target), ("Content-Location", target)],
                           b"", content_length=0))

    upstream.script = script
    with Client(gw.port) as client:
        reply = client.request("GET", "/vllm/v1/models/", request_id=new_id("redirect"))
    assert reply.status == 307, reply
    assert reply.all("location") == [expected] and reply.all("content-location") == [expected]
    assert upstream.url.split("//")[1].encode() not in reply.head_bytes


# -- h. idle keep-alive closed by upstream at 5 s ------------------------------------------------

GAPS = [4.5, 5.0, 5.5, 6.0, 4.8, 5.2, 4.9, 5.8, 5.1, 4.6, 5.4]


def test_upstream_closing_idle_connections_at_5s_never_fails_a_request(gw, upstream):
    upstream.reset(echo_script, idle_timeout=5.0)  # like uvicorn's keep-alive timeout
    outcomes = []

    def call(tag):
        rid = new_id(tag)
        with Client(gw.port) as client:
            reply = attempt(lambda: client.request("POST", CHAT_PATH, CHAT_BODY, rid))
        if isinstance(reply, Reply):
            outcomes.append((tag, reply.status, echoes(reply.body, rid)))
        else:
            outcomes.append((tag, reply, False))

    call("idle-first")
    for i, gap in enumerate(GAPS):
        time.sleep(gap)  # the scenario: requests 4.5-6 s apart
        call(f"idle-{i}-after-{gap}s")
    failed = [o for o in outcomes if o[1] != 200 or not o[2]]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed}"
    assert sum(1 for o in outcomes if o[1] == 502) == 0
