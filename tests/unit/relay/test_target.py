"""gateway/relay/target.py: the target path, headers and body sent to vLLM, from the WSGI environ."""
from __future__ import annotations

import io

import pytest

from gateway.core.errors import GatewayError
from gateway.relay.target import forward_headers, raw_target, read_body, vllm_target


def target(raw: str) -> tuple[str, str]:
    return vllm_target({"RAW_URI": raw})


def refused(fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        fn(*args)
    return err.value


# --- raw_target --------------------------------------------------------------------------------

def test_raw_target_prefers_raw_uri():
    environ = {"RAW_URI": "/vllm/v1/a%2Fb?x=%20", "REQUEST_URI": "/other", "PATH_INFO": "/vllm/v1/a/b"}
    assert raw_target(environ) == "/vllm/v1/a%2Fb?x=%20"


def test_raw_target_falls_back_to_request_uri():
    assert raw_target({"REQUEST_URI": "/vllm/v1/a%2Fb?q=1", "PATH_INFO": "/vllm/v1/a/b"}) == "/vllm/v1/a%2Fb?q=1"


def test_raw_target_empty_raw_uri_falls_back_to_request_uri():
    assert raw_target({"RAW_URI": "", "REQUEST_URI": "/vllm/x"}) == "/vllm/x"


@pytest.mark.parametrize("environ, expected", [
    ({"PATH_INFO": "/vllm/v1/models", "QUERY_STRING": ""}, "/vllm/v1/models"),
    ({"PATH_INFO": "/vllm/v1/models", "QUERY_STRING": "a=1&b=2"}, "/vllm/v1/models?a=1&b=2"),
    ({"SCRIPT_NAME": "/vllm", "PATH_INFO": "/v1/models"}, "/vllm/v1/models"),
    ({"PATH_INFO": "/vllm/a b"}, "/vllm/a%20b"),           # unsafe byte encoded
    ({"PATH_INFO": "/vllm/a?b"}, "/vllm/a%3Fb"),           # a decoded '?' stays in the path
    ({"PATH_INFO": "/vllm/a#b"}, "/vllm/a%23b"),
    ({"PATH_INFO": "/vllm/caf\xe9"}, "/vllm/caf%E9"),      # WSGI latin-1 string, byte 0xE9
    ({"PATH_INFO": "/vllm/models%41"}, "/vllm/models%2541"),  # a decoded '%' is a literal one
])
def test_raw_target_rebuilt_from_path_info_and_query_string(environ, expected):
    assert raw_target(environ) == expected


@pytest.mark.parametrize("raw, expected", [
    ("http://gw.example/vllm/v1/models?x=1", "/vllm/v1/models?x=1"),
    ("https://gw.example:8443/vllm/v1/models", "/vllm/v1/models"),
    ("http://gw.example", "/"),
    ("*", "/"),
])
def test_raw_target_absolute_form_drops_scheme_and_authority(raw, expected):
    assert raw_target({"RAW_URI": raw}) == expected


# --- vllm_target -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("/vllm/v1/chat/completions", ("/v1/chat/completions", "")),
    ("/vllm/v1/models?limit=5&x=y", ("/v1/models", "?limit=5&x=y")),
    ("/vllm/v1/models?", ("/v1/models", "?")),
    ("/vllm", ("", "")),
    ("/vllm/", ("/", "")),
    ("/vllm?x=1", ("", "?x=1")),
    ("/vllm/v1/a%2Fb", ("/v1/a%2Fb", "")),         # encoding passed through untouched
    ("/vllm//sleep", ("//sleep", "")),             # kept as sent; the policy collapses it
    ("/vllm/v1/...", ("/v1/...", "")),             # three dots is a name, not a dot segment
    ("/vllm/v1/a.b/.hidden", ("/v1/a.b/.hidden", "")),
    ("/vllm/v1/models?next=../x", ("/v1/models", "?next=../x")),  # dots in the query are data
])
def test_vllm_target_splits_path_and_query(raw, expected):
    assert target(raw) == expected


@pytest.mark.parametrize("raw", [
    "/%76llm/v1/models", "/vll%6D/v1/models", "/VLLM/v1/models", "/vllmx/v1/models", "/vllm%2Fv1/models",
    "/v1/models", "/", "http://h/other/vllm/v1",
])
def test_vllm_target_requires_the_prefix_written_literally(raw):
    err = refused(target, raw)
    assert err.status == 400
    assert "/vllm prefix" in err.message


@pytest.mark.parametrize("raw", [
    "/vllm/..", "/vllm/.", "/vllm/../admin", "/vllm/v1/../../admin", "/vllm/v1/./models",
    "/vllm/v1/%2e%2e/sleep", "/vllm/v1/%2E%2E/sleep", "/vllm/v1/.%2e/sleep", "/vllm/v1/%2e/models",
    "/vllm/v1/%252e%252e/sleep",                # encoded twice
    "/vllm/v1/%25252e%25252e/sleep",            # encoded three times
    "/vllm/v1/%2525252e%2525252e/sleep",        # encoded four times: refused, not guessed
    "/vllm/v1\\..\\sleep", "/vllm/v1%5C..%5Csleep", "/vllm/v1/..%2Fsleep", "/vllm/v1%2F..%2Fsleep",
    "/vllm/..?x=1",
])
def test_vllm_target_refuses_dot_segments_however_encoded(raw):
    err = refused(target, raw)
    assert err.status == 400
    assert "'..'" in err.message


@pytest.mark.parametrize("raw, expected", [
    ("/vllm/a b", ("/a%20b", "")),
    ("/vllm/a#frag", ("/a%23frag", "")),
    ("/vllm/a\tb\x7f", ("/a%09b%7F", "")),
    ("/vllm/caf\xe9", ("/caf%E9", "")),
    ("/vllm/a?q=x y#z", ("/a", "?q=x%20y%23z")),
    ("/vllm/a?q=caf\xe9", ("/a", "?q=caf%E9")),
])
def test_vllm_target_percent_encodes_unsafe_bytes_and_hash(raw, expected):
    assert target(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("/vllm/100%", ("/100%25", "")),
    ("/vllm/a%zz", ("/a%25zz", "")),
    ("/vllm/a%4", ("/a%254", "")),
    ("/vllm/a%%41", ("/a%25%41", "")),
    ("/vllm/a%80%e9%2F", ("/a%80%e9%2F", "")),           # valid escapes kept as sent
    ("/vllm/a%80%?q=5%&r=%41", ("/a%80%25", "?q=5%25&r=%41")),
])
def test_vllm_target_writes_a_stray_percent_as_25_and_keeps_valid_escapes(raw, expected):
    assert target(raw) == expected


# --- forward_headers ---------------------------------------------------------------------------

def environ_with(**headers) -> dict:
    environ = {"REMOTE_ADDR": "10.0.0.9", "wsgi.url_scheme": "http"}
    environ.update(headers)
    return environ


def test_forward_headers_copies_ordinary_headers_in_title_case():
    headers = forward_headers(environ_with(HTTP_ACCEPT="application/json", HTTP_X_CUSTOM_THING="v",
                                           HTTP_OPENAI_BETA="assistants=v2"), "rid", None)
    assert headers["Accept"] == "application/json"
    assert headers["X-Custom-Thing"] == "v"
    assert headers["Openai-Beta"] == "assistants=v2"


@pytest.mark.parametrize("environ_key", [
    "HTTP_CONNECTION", "HTTP_KEEP_ALIVE", "HTTP_TE", "HTTP_TRAILER", "HTTP_TRANSFER_ENCODING",
    "HTTP_UPGRADE", "HTTP_PROXY_AUTHORIZATION", "HTTP_PROXY_AUTHENTICATE", "HTTP_PROXY_CONNECTION",
    "HTTP_EXPECT",
])
def test_forward_headers_drops_hop_by_hop_headers(environ_key):
    headers = forward_headers(environ_with(**{environ_key: "x"}), "rid", None)
    name = environ_key[5:].replace("_", "-").lower()
    assert name not in {h.lower() for h in headers}


def test_forward_headers_drops_headers_named_in_connection():
    environ = environ_with(HTTP_CONNECTION="keep-alive, X-Secret-Hop ,x-other", HTTP_X_SECRET_HOP="s",
                           HTTP_X_OTHER="o", HTTP_X_KEPT="k")
    headers = forward_headers(environ, "rid", None)
    assert "X-Secret-Hop" not in headers and "X-Other" not in headers
    assert headers["X-Kept"] == "k"


@pytest.mark.parametrize("environ_key", [
    "HTTP_AUTHORIZATION", "HTTP_X_LITELLM_API_KEY", "HTTP_API_KEY", "HTTP_X_API_KEY",
])
@pytest.mark.parametrize("upstream_auth", [None, "Bearer upstream"])
def test_forward_headers_drops_every_credential_header(environ_key, upstream_auth):
    headers = forward_headers(environ_with(**{environ_key: "Bearer sk-caller-secret"}), "rid", upstream_auth)
    assert not any("sk-caller-secret" in v for v in headers.values())
    assert headers.get("Authorization") == upstream_auth


def test_forward_headers_sets_the_upstream_authorization():
    headers = forward_headers(environ_with(HTTP_AUTHORIZATION="Bearer sk-caller"), "rid", "Bearer vllm-key")
    assert headers["Authorization"] == "Bearer vllm-key"


def test_forward_headers_replaces_host_content_length_and_request_id():
    environ = environ_with(HTTP_HOST="gw.example", HTTP_CONTENT_LENGTH="999", HTTP_X_REQUEST_ID="caller-id",
                           CONTENT_TYPE="application/json", CONTENT_LENGTH="12")
    headers = forward_headers(environ, "gw-rid-1", None)
    assert "Host" not in headers
    assert "Content-Length" not in headers
    assert headers["X-Request-Id"] == "gw-rid-1"
    assert headers["Content-Type"] == "application/json"


def test_forward_headers_x_forwarded_for_appends_the_remote_address():
    assert forward_headers(environ_with(), "r", None)["X-Forwarded-For"] == "10.0.0.9"
    headers = forward_headers(environ_with(HTTP_X_FORWARDED_FOR="1.2.3.4"), "r", None)
    assert headers["X-Forwarded-For"] == "1.2.3.4, 10.0.0.9"
    assert forward_headers({}, "r", None)["X-Forwarded-For"] == "unknown"


def test_forward_headers_x_forwarded_proto_from_caller_else_url_scheme():
    assert forward_headers(environ_with(), "r", None)["X-Forwarded-Proto"] == "http"
    assert forward_headers(environ_with(**{"wsgi.url_scheme": "https"}), "r", None)["X-Forwarded-Proto"] == "https"
    assert forward_headers(environ_with(HTTP_X_FORWARDED_PROTO="https"), "r", None)["X-Forwarded-Proto"] == "https"


def test_forward_headers_ignores_non_header_environ_keys():
    headers = forward_headers(environ_with(PATH_INFO="/x", SERVER_NAME="s", RAW_URI="/x"), "r", None)
    assert set(headers) == {"X-Request-Id", "X-Forwarded-For", "X-Forwarded-Proto"}


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b"])
def test_forward_headers_refuses_a_line_break_in_a_header(value):
    err = refused(forward_headers, environ_with(HTTP_X_THING=value), "r", None)
    assert err.status == 400
    assert "X-Thing" in err.message


def test_forward_headers_refuses_non_latin1_header_text():
    err = refused(forward_headers, environ_with(HTTP_X_THING="caf\u20ac"), "r", None)
    assert err.status == 400
    assert "ISO-8859-1" in err.message


def test_forward_headers_keeps_latin1_header_text():
    assert forward_headers(environ_with(HTTP_X_THING="caf\xe9"), "r", None)["X-Thing"] == "caf\xe9"


# --- read_body ---------------------------------------------------------------------------------

class NoRead(io.BytesIO):
    def read(self, *args):
        raise AssertionError("the body must not be read")


def body_environ(data: bytes = b"", stream=None, **extra) -> dict:
    environ = {"wsgi.input": stream if stream is not None else io.BytesIO(data)}
    environ.update(extra)
    return environ


def test_read_body_reads_exactly_content_length_bytes():
    stream = io.BytesIO(b"helloEXTRA")
    assert read_body(body_environ(stream=stream, CONTENT_LENGTH="5"), 100) == b"hello"
    assert stream.read() == b"EXTRA"


def test_read_body_content_length_zero_is_empty_without_reading():
    assert read_body(body_environ(stream=NoRead(), CONTENT_LENGTH="0"), 100) == b""


def test_read_body_at_the_limit_is_accepted():
    assert read_body(body_environ(b"x" * 10, CONTENT_LENGTH="10"), 10) == b"x" * 10


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", "5 5"])
def test_read_body_refuses_a_bad_content_length(length):
    err = refused(read_body, body_environ(b"hello", CONTENT_LENGTH=length), 100)
    assert err.status == 400


def test_read_body_over_the_limit_is_413_without_reading():
    err = refused(read_body, body_environ(stream=NoRead(), CONTENT_LENGTH="11"), 10)
    assert err.status == 413
    assert err.type == "request_too_large"


def test_read_body_shorter_than_content_length_is_400():
    err = refused(read_body, body_environ(b"abc", CONTENT_LENGTH="5"), 100)
    assert err.status == 400
    assert "ended before" in err.message


def test_read_body_without_length_or_chunking_is_empty():
    assert read_body(body_environ(stream=NoRead()), 100) == b""
    assert read_body(body_environ(stream=NoRead(), CONTENT_LENGTH=""), 100) == b""


@pytest.mark.parametrize("framing", [
    {"wsgi.input_terminated": True},
    {"HTTP_TRANSFER_ENCODING": "chunked"},
    {"HTTP_TRANSFER_ENCODING": "gzip, Chunked"},
])
def test_read_body_chunked_reads_to_the_end(framing):
    data = b"0123456789" * 20_000  # more than one 64 KiB read
    assert read_body(body_environ(data, **framing), len(data)) == data


@pytest.mark.parametrize("framing", [{"wsgi.input_terminated": True}, {"HTTP_TRANSFER_ENCODING": "chunked"}])
def test_read_body_chunked_over_the_limit_is_413(framing):
    err = refused(read_body, body_environ(b"x" * 101, **framing), 100)
    assert err.status == 413
