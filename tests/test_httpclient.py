"""The relay's HTTP client against a scripted raw server: framings, reuse, failures, TLS."""
import socket
import ssl
import subprocess
import threading

import pytest

from gateway.httpclient import ConnectionPool, UpstreamError, UpstreamTimeout

HEAD = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSE = object()
HOLD = object()


class ScriptedServer:
    """Accepts connections; for each request answers the next scripted reply (raw bytes).

    A reply of None closes the connection without answering; a CLOSE element in a reply closes
    it after the parts before it. Counts connections accepted."""

    def __init__(self, replies, tls_context=None):
        self.replies = list(replies)
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.tls_context = tls_context
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls_context is not None:
                try:
                    conn = self.tls_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        buf = b""
        while self.replies:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    conn.close()
                    return
                buf += data
            buf = buf.split(b"\r\n\r\n", 1)[1]
            reply = self.replies.pop(0)
            if reply is None:
                conn.close()
                return
            for part in reply if isinstance(reply, list) else [reply]:
                if part is CLOSE:
                    conn.close()
                    return
                if part is HOLD:
                    threading.Event().wait(5)  # keep the connection open, silent
                    continue
                conn.sendall(part)
        conn.close()


def pool_for(server, read_timeout=5.0, **kw):
    return ConnectionPool("127.0.0.1", server.port, tls=False, connect_timeout=2, read_timeout=read_timeout,
                          maxsize=4, **kw)


def test_content_length_body_and_keep_alive_reuse():
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"] * 2)
    pool = pool_for(server)
    for _ in range(2):
        resp = pool.request(HEAD, None, head_only=False)
        assert (resp.status, resp.reason) == (200, "OK")
        assert [v for k, v in resp.headers if k == "X-A"] == ["1", "2"]
        assert resp.read_all() == b"hello"
        resp.release()
    assert server.connections == 1


def test_chunked_body_yields_each_chunk():
    server = ScriptedServer([[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                              b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]])
    resp = pool_for(server).request(HEAD, None, head_only=False)
    assert resp.header("transfer-encoding") == "chunked" and list(resp.pieces()) == [b"hello", b" world"]
    assert resp.complete


def test_close_delimited_body_ends_at_eof_and_is_not_reused():
    server = ScriptedServer([[b"HTTP/1.0 200 OK\r\n\r\n", b"abc", b"def", CLOSE]])
    pool = pool_for(server)
    resp = pool.request(HEAD, None, head_only=False)
    assert resp.read_all() == b"abcdef"
    resp.release()
    assert len(pool.idle) == 0


def test_head_and_204_have_no_body():
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"])
    pool = pool_for(server)
    resp = pool.request(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n", None, head_only=True)
    assert resp.status == 200 and resp.read_all() == b""
    resp.release()
    resp = pool.request(HEAD, None, head_only=False)
    assert resp.status == 204 and resp.read_all() == b""
    resp.release()
    assert server.connections == 1


def test_stale_pooled_connection_is_replaced():
    server = ScriptedServer([[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], None,
                             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    pool = pool_for(server)
    resp = pool.request(HEAD, None, head_only=False)
    assert resp.read_all() == b"ok"
    resp.release()
    # The server's connection thread answers the next request with None (close) ... but the client
    # only finds out when it reuses the socket; prove the first reuse fails cleanly, then recovers.
    with pytest.raises(UpstreamError):
        pool.request(HEAD, None, head_only=False)
    resp = pool.request(HEAD, None, head_only=False)
    assert resp.read_all() == b"ok"


def test_closed_mid_body_is_an_error():
    server = ScriptedServer([[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", CLOSE]])
    resp = pool_for(server).request(HEAD, None, head_only=False)
    with pytest.raises(UpstreamError) as err:
        resp.read_all()
    assert err.value.phase == "body"


def test_garbage_is_a_protocol_error():
    server = ScriptedServer([b"NOT HTTP AT ALL\r\n\r\n"])
    with pytest.raises(UpstreamError) as err:
        pool_for(server).request(HEAD, None, head_only=False)
    assert err.value.kind == "malformed HTTP response"


def test_read_timeout_and_refused_connection():
    server = ScriptedServer([[b"HTTP/1.1 200 OK\r\n", HOLD]])  # never finishes the head
    with pytest.raises(UpstreamTimeout) as err:
        pool_for(server, read_timeout=0.2).request(HEAD, None, head_only=False)
    assert err.value.phase == "head"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = ConnectionPool("127.0.0.1", port, tls=False, connect_timeout=1, read_timeout=1, maxsize=1)
    with pytest.raises(UpstreamError) as err:
        refused.request(HEAD, None, head_only=False)
    assert (err.value.phase, err.value.kind) == ("connect", "connection refused")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls_verified_against_the_configured_bundle(cert):
    cert_file, key_file = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2, tls_context=ctx)
    trusted = ConnectionPool("localhost", server.port, tls=True, connect_timeout=2, read_timeout=2, maxsize=1,
                             ca_bundle=str(cert_file))
    resp = trusted.request(HEAD, None, head_only=False)
    assert resp.read_all() == b"ok"
    untrusted = ConnectionPool("localhost", server.port, tls=True, connect_timeout=2, read_timeout=2, maxsize=1)
    with pytest.raises(UpstreamError) as err:
        untrusted.request(HEAD, None, head_only=False)
    assert "TLS handshake failed" in err.value.kind


def test_idle_connections_are_not_kept_past_max_idle():
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 3)
    pool = pool_for(server, max_idle=0.0)
    for _ in range(2):
        resp = pool.request(HEAD, None, head_only=False)
        assert resp.read_all() == b"ok"
        resp.release()
    # max_idle 0: every returned connection is already too old to reuse, so each request connects anew
    assert server.connections == 2 and len(pool.idle) == 1
