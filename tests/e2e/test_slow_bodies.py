"""Request bodies that arrive too slowly or with broken chunked framing, through real gunicorn."""
import json
import socket
import time

import pytest
import requests

from tests.conftest import MASTER, MASTER_KEY, gateway_environ

CHAT = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD = (f"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
        "Content-Type: application/json\r\n")


def read_until_closed(sock, timeout=5.0) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it stays open)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece


def read_one_response(sock, timeout=5.0) -> bytes:
    """One response (head and Content-Length body), whether or not the connection stays open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.fixture
def slow_gateway(vllm, start_gateway):
    return start_gateway(gateway_environ(vllm.url, REQUEST_BODY_TIMEOUT="1", MAX_REQUEST_BODY_BYTES="1000"))


def test_a_body_trickled_past_the_timeout_is_408_and_the_connection_closed(slow_gateway):
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + f"Content-Length: {len(CHAT)}\r\n\r\n".encode())
        started = time.monotonic()
        for byte in CHAT[:3]:  # a few bytes, then silence: the rest never comes in time
            sock.sendall(bytes([byte]))
        response = read_until_closed(sock)
        elapsed = time.monotonic() - started
    status, body = status_and_body(response)
    assert status == 408
    assert body["error"]["message"] == "request body not received within 1s"
    assert 0.9 <= elapsed < 3


def test_a_body_trickled_byte_by_byte_is_cut_at_the_timeout(slow_gateway):
    """Each byte arrives well within any per-read timeout; the whole body never in 1 s."""
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + f"Content-Length: {len(CHAT)}\r\n\r\n".encode())
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        for byte in CHAT:
            sock.sendall(bytes([byte]))
            try:
                response = sock.recv(65536)
            except socket.timeout:
                continue
            break
        response += read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert status_and_body(response)[0] == 408
    assert 0.9 <= elapsed < 3


def test_an_ordinary_body_is_unaffected_by_the_timeout(slow_gateway):
    resp = requests.post(slow_gateway.url + "/vllm/v1/chat/completions", data=CHAT,
                         headers={**MASTER, "Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 200


MALFORMED_CHUNKED = {
    "bad chunk size line": b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk size line without end": b"1" * 10000,
    "missing CRLF after the chunk": b"3\r\nabcXY3\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", MALFORMED_CHUNKED.values(), ids=MALFORMED_CHUNKED.keys())
def test_malformed_chunked_body_is_400_not_500(slow_gateway, body):
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        response = read_until_closed(sock)
    status, payload = status_and_body(response)
    assert status == 400
    assert payload["error"]["message"].startswith("the request body could not be read")
    assert "Traceback" not in slow_gateway.stderr.text()


def test_chunked_body_ending_before_its_last_chunk_is_400(slow_gateway):
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab")
        sock.shutdown(socket.SHUT_WR)  # the caller's body ends mid-chunk
        response = read_until_closed(sock)
    status, payload = status_and_body(response)
    assert status == 400
    assert "ended before its last chunk" in payload["error"]["message"]
    assert "Traceback" not in slow_gateway.stderr.text()


def test_chunk_size_overflow_waits_no_longer_than_the_timeout(slow_gateway):
    """gunicorn takes a 128-bit chunk size at its word and waits for the data: the body
    deadline ends the wait (a 413 would need the size, which gunicorn does not expose)."""
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + b"F" * 32 + b"\r\nabc\r\n0\r\n\r\n")
        response = read_until_closed(sock)
    assert status_and_body(response)[0] == 408
    assert "Traceback" not in slow_gateway.stderr.text()


def test_chunk_larger_than_the_body_limit_is_413(slow_gateway):
    host, port = slow_gateway.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(HEAD.encode() + b"Transfer-Encoding: chunked\r\n\r\n100000\r\n" + b"x" * 70000)
        response = read_one_response(sock)
    assert status_and_body(response)[0] == 413
