"""gateway/relay/upstream.py, its pure parts: probe verdicts, failure names, wire headers."""
from __future__ import annotations

import pytest
from urllib3.util import SKIP_HEADER

from gateway.relay.upstream import _wire_headers, failure_kind, probe_verdict

# --- probe_verdict -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_probe_refused_with_a_key_blames_the_key(status):
    ok, detail = probe_verdict("", "/v1/models", status, has_key=True)
    assert ok is False
    assert "refused the gateway's upstream key" in detail
    assert f"HTTP {status} on /v1/models" in detail
    assert "HOSTED_VLLM_API_KEY" in detail


@pytest.mark.parametrize("status", [401, 403])
def test_probe_refused_without_a_key_asks_for_one(status):
    ok, detail = probe_verdict("", "/v1/models", status, has_key=False)
    assert ok is False
    assert "requires a key" in detail
    assert "set HOSTED_VLLM_API_KEY" in detail


@pytest.mark.parametrize("base_path", ["/v1", "/v1/", "/api/v1"])
def test_probe_404_with_a_base_ending_in_v1_hints_at_the_root(base_path):
    ok, detail = probe_verdict(base_path, "/health", 404, has_key=True)
    assert ok is False
    assert "HOSTED_VLLM_API_BASE" in detail
    assert "without /v1" in detail


@pytest.mark.parametrize("base_path", ["", "/", "/api", "/xv1", "/v1beta"])
def test_probe_404_with_another_base_has_no_v1_hint(base_path):
    ok, detail = probe_verdict(base_path, "/health", 404, has_key=False)
    assert ok is False
    assert "HTTP 404 on /health" in detail
    assert "without /v1" not in detail


@pytest.mark.parametrize("status", [500, 502, 503, 504, 301, 302])
def test_probe_other_failures_name_the_status_and_path(status):
    assert probe_verdict("", "/health", status, has_key=True) == (False, f"HTTP {status} on /health")


@pytest.mark.parametrize("status", [200, 204])
def test_probe_success_is_ok(status):
    assert probe_verdict("/v1", "/v1/models", status, has_key=False) == (True, f"HTTP {status}")


# --- failure_kind ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind", [
    ("[Errno 111] Connection refused", "connection refused"),
    ("Failed to resolve 'vllm' ([Errno -2] Name or service not known)", "name resolution failed"),
    ("[Errno 8] nodename nor servname provided", "name resolution failed"),
    ("Temporary failure in name resolution", "name resolution failed"),
    ("Read timed out. (read timeout=5)", "timed out"),
    ("Connection reset by peer", "connection reset"),
    ("got more than 100 headers", "response head too large"),
    ("LineTooLong: header line", "response head too large"),
    ("RemoteDisconnected('Remote end closed connection without response')", "connection closed without a response"),
])
def test_failure_kind_names_common_transport_failures(text, kind):
    assert failure_kind(ConnectionError(text)) == kind


def test_failure_kind_falls_back_to_the_exception_type_not_its_text():
    assert failure_kind(OSError("secret-token-in-url something odd")) == "OSError"


# --- _wire_headers -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "GET", "DELETE"])
def test_wire_headers_content_length_is_the_body_length(method):
    assert _wire_headers({}, b"hello", method)["Content-Length"] == "5"


def test_wire_headers_content_length_replaces_a_stale_value():
    assert _wire_headers({"content-length": "99"}, b"abc", "POST")["Content-Length"] == "3"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
@pytest.mark.parametrize("body", [None, b""])
def test_wire_headers_body_method_without_body_sends_zero(method, body):
    assert _wire_headers({}, body, method)["Content-Length"] == "0"


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_wire_headers_bodyless_method_gets_no_content_length(method):
    assert "Content-Length" not in _wire_headers({}, None, method)


def test_wire_headers_suppress_urllib3_defaults_when_absent():
    out = _wire_headers({"Accept": "application/json"}, None, "GET")
    assert out["User-Agent"] is SKIP_HEADER
    assert out["Accept-Encoding"] is SKIP_HEADER
    assert out["Accept"] == "application/json"


def test_wire_headers_keep_the_callers_user_agent_and_accept_encoding():
    out = _wire_headers({"user-agent": "openai-python/1.0", "Accept-Encoding": "gzip"}, None, "GET")
    assert out["User-Agent"] == "openai-python/1.0"
    assert out["Accept-Encoding"] == "gzip"


def test_wire_headers_do_not_modify_the_callers_dict():
    headers = {"X-A": "1"}
    _wire_headers(headers, b"x", "POST")
    assert headers == {"X-A": "1"}
