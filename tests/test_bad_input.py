"""Property-based tests: hostile or malformed input never yields a 500, a leak or a state change.

The /vllm tests drive the WSGI app with environs built the way gunicorn builds them (RAW_URI is
the request target exactly as sent, PATH_INFO its latin-1 unquoted form), so the raw bytes are
under the test's control. The fake vLLM records what really arrived.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import socket
import string
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from werkzeug.http import is_hop_by_hop_header
from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.conftest import (
    MASTER,
    MASTER_KEY,
    UPSTREAM_KEY,
    build_app,
    gateway_environ,
    header,
)


def fuzz(examples: int):
    """Hypothesis settings for tests that share function-scoped fixtures across examples."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- driving the WSGI app ----------------------------------------------------------------------

class CountingStream:
    """A wsgi.input that remembers how many bytes the application read from it."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(size if size is not None else -1)
        self.consumed += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        line = self._data.readline(size)
        self.consumed += len(line)
        return line

    def __iter__(self):
        return iter(self.readline, b"")


@dataclass
class Answer:
    status: int
    headers: list
    body: bytes

    def json(self):
        return json.loads(self.body)


def environ_for(target: str, *, method: str = "GET", headers=(), body: bytes = b"",
                content_length: str | None = None, content_type: str | None = None,
                key: str | None = MASTER_KEY) -> dict:
    """The environ gunicorn builds for `target` written verbatim on the request line.

    Duplicate headers are joined with ',' as gunicorn does; `content_length` overrides the
    declared length (None: the body's real length, or no header for an empty body).
    """
    path = target
    if not path.startswith("/"):  # absolute-form: gunicorn's PATH_INFO is the path alone
        path = "/" + path.split("://", 1)[-1].partition("/")[2]
    path, _, query = path.partition("?")
    environ = EnvironBuilder(method=method).get_environ()
    for name in [k for k in environ if k.startswith("HTTP_") or k.startswith("CONTENT_")]:
        del environ[name]
    environ.update({
        "RAW_URI": target, "REQUEST_URI": target, "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, encoding="latin-1"), "QUERY_STRING": query,
        "HTTP_HOST": "gw", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": CountingStream(body), "wsgi.input_terminated": True,
    })
    if key is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    elif body:
        environ["CONTENT_LENGTH"] = str(len(body))
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    for name, value in headers:
        cgi_name = "HTTP_" + name.upper().replace("-", "_")
        environ[cgi_name] = f"{environ[cgi_name]},{value}" if cgi_name in environ else value
    return environ


def call(app, environ) -> Answer:
    app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
    return Answer(int(status[:3]), headers.to_wsgi_list(), b"".join(app_iter))


def answer_of(resp) -> Answer:
    """A Flask test-client response as an Answer."""
    return Answer(resp.status_code, list(resp.headers.items()), resp.get_data())


# -- assertions shared by every test -----------------------------------------------------------

def assert_envelope(answer: Answer) -> dict:
    """A 4xx in the gateway's own envelope; returns its `error` object."""
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    payload = answer.json()
    assert list(payload) == ["error"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == str(answer.status)
    return payload["error"]


def assert_no_secrets(answer: Answer, *secrets: str, echo: bool = False) -> None:
    """Neither the master key, the upstream key nor any of `secrets` is in the answer.

    With `echo`, a 200 is the fake's /echo reflection of what it received, which includes the
    upstream Authorization the gateway rightly sent it: the upstream key is looked for in the
    rest of that body (the master key and `secrets` everywhere).
    """
    head = "".join(f"{k}: {v}\n" for k, v in answer.headers).encode("latin-1")
    for secret in (MASTER_KEY, *secrets):
        assert secret.encode() not in head + answer.body, f"{secret[:12]}… leaked"
    body = answer.body
    if echo and answer.status == 200:
        reflected = answer.json()
        reflected.pop("headers")
        body = json.dumps(reflected).encode()
    assert UPSTREAM_KEY.encode() not in head + body, "the upstream key leaked"


def climbs(path: str) -> bool:
    """True when a segment of `path` is '.' or '..' at any depth of percent-decoding."""
    for _ in range(10):
        if any(seg in (".", "..") for seg in re.split(r"[/\\]", path)):
            return True
        decoded = unquote(path, encoding="latin-1")
        if decoded == path:
            return False
        path = decoded
    return True


_URI_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
PATH_CHARS = set(_URI_UNRESERVED + "!$&'()*+,;=" + ":@/")   # RFC 3986 pchar and '/'
QUERY_CHARS = PATH_CHARS | {"?"}


def on_the_wire(text: str, allowed=PATH_CHARS) -> str:
    """`text` (one char per byte) as the request target vLLM receives, meaning unchanged: each
    %XX escape kept with its hex in upper case, a '%' that starts none written %25, every other
    byte a URI may not hold as %XX (RFC 3986 §2.1, §6.2.2.1)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "%" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1:i + 3]):
            out.append(text[i:i + 3].upper())
            i += 3
            continue
        out.append(text[i] if text[i] in allowed else "%%%02X" % ord(text[i]))
        i += 1
    return "".join(out)


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def echo_app(vllm):
    """The gateway with a base URL carrying a path prefix; the fake answers anything under it."""
    return build_app({"environ": gateway_environ(vllm.url + "/echo", DISABLE_ACCESS_LOG=1)})


@pytest.fixture
def plain_app(vllm):
    return build_app({"environ": gateway_environ(vllm.url, DISABLE_ACCESS_LOG=1)})


@pytest.fixture
def limited_key(kclient) -> str:
    """A virtual key that may only use fake-model."""
    resp = kclient.post("/key/generate", headers=MASTER, json={"models": ["fake-model"]})
    assert resp.status_code == 200
    return resp.get_json()["key"]


# -- 1. paths ----------------------------------------------------------------------------------

SAFE = string.ascii_letters + string.digits + "-_~!$&'()*+,;=:@"
TRICKY_PIECES = [
    ".", "..", "...", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "%2f", "%2F", "%2f..",
    "%252e", "%252E%252e", "%25252e%25252e", "%2525252e", "%5c", "%5C", "\\", "\\..", "%00",
    "%ff", "%FF%FE", "%c3%a9", "%", "%2", "%zz", "%%2e", "@", "@evil.example", "http:",
    "http://evil.example", "//", ";", ";..", "~",
]
raw_byte = st.characters(min_codepoint=0x00, max_codepoint=0xFF, exclude_characters="?#")
segment = st.lists(st.one_of(st.sampled_from(TRICKY_PIECES), st.text(SAFE, max_size=6), raw_byte),
                   max_size=4).map("".join)
mixed_targets = st.builds(
    lambda form, prefix, segments, slash: form + prefix + ("/" + "/".join(segments) if segments or slash else ""),
    st.sampled_from(["", "", "", "http://gw"]),
    st.sampled_from(["/vllm", "/vllm", "/vllm", "/vllm", "/%76llm", "/VLLM", "/vllm%2F"]),
    st.lists(segment, max_size=8), st.booleans())
# Long targets stay under the fake's 8 KB request-line limit once /echo is prepended.
long_targets = st.builds(lambda n, piece: "/vllm/" + "x" * n + "/" + piece,
                         st.integers(1, 7900), st.sampled_from(TRICKY_PIECES))


@fuzz(400)
@given(target=st.one_of(mixed_targets, long_targets), method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_paths_never_escape_the_base(echo_app, vllm, target, method):
    """Any path after /vllm is either relayed below the base (raw, no dot segment, the fake's
    own Host) or refused with a 4xx envelope; never a 500, never a leak."""
    vllm.clear()
    answer = call(echo_app, environ_for(target, method=method))
    assert answer.status < 500
    assert_no_secrets(answer, echo=True)
    recorded = vllm.requests()
    event(f"status {answer.status}")
    if not recorded:
        assert_envelope(answer)
        return
    [sent] = recorded
    assert answer.status == 200
    assert sent["path"] == "/echo" or sent["path"].startswith("/echo/")
    assert not climbs(sent["path"][len("/echo"):])
    raw = target if target.startswith("/") else "/" + target.split("://", 1)[1].partition("/")[2]
    assert sent["path"] == "/echo" + on_the_wire(raw.partition("?")[0][len("/vllm"):])
    assert header(sent, "host") == [f"127.0.0.1:{vllm.port}"]


# -- 2. query strings --------------------------------------------------------------------------

PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "#")
queries = st.one_of(
    st.text(PRINTABLE, max_size=300),
    st.lists(st.one_of(st.text(PRINTABLE, max_size=5),
                       st.sampled_from(["%20", "%00", "%ff", "%C3%A9", "%", "%zz", "&&", "==", "+", "%2e%2e/"]),
                       st.characters(min_codepoint=0x80, max_codepoint=0xFF),
                       st.characters(max_codepoint=0x20)),
             max_size=40).map("".join))


@fuzz(150)
@given(query=queries)
def test_query_strings_are_forwarded_byte_for_byte(echo_app, vllm, query):
    """A query reaches vLLM with its meaning unchanged (RFC 3986 normalisation only: see
    on_the_wire); never a 500."""
    vllm.clear()
    answer = call(echo_app, environ_for("/vllm/q?" + query))
    assert answer.status == 200, answer.body[:300]
    assert_no_secrets(answer, echo=True)
    sent = vllm.last()
    assert sent["path"] == "/echo/q"
    assert sent["query"] == on_the_wire(query, QUERY_CHARS)


# -- 3. headers --------------------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
CREDENTIAL_NAMES = ("authorization", "x-litellm-api-key", "api-key", "x-api-key")
# Names gunicorn does not put in HTTP_* or that the gateway owns; and the fake's control knobs.
RESERVED = {"content-length", "content-type", "host", "connection", "expect", "proxy-connection",
            "x-request-id", "x-forwarded-for", "x-forwarded-proto", *CREDENTIAL_NAMES}


def _ordinary(name: str) -> bool:
    normal = name.lower().replace("_", "-")
    return normal not in RESERVED and not normal.startswith("x-fake-") and not is_hop_by_hop_header(normal)


header_names = st.text(TCHAR, min_size=1, max_size=20).filter(_ordinary)
# Printable Latin-1 (obs-text included); C1 controls are left out because Python's email parser,
# which the fake's server uses, would split a header line at \x85.
LATIN1_TEXT = st.text(st.sampled_from([chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x100)]]), max_size=60)
header_values = st.one_of(
    LATIN1_TEXT.map(str.strip),
    st.integers(1, 16 * 1024).map(lambda n: "v" * n),
    st.builds(lambda before, eol: f"{before}{eol}X-Injected-Header: yes", LATIN1_TEXT, st.sampled_from(["\r\n", "\n", "\r"])),
)


def odd_case(name: str):
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if up else c for c, up in zip(name, flips)))


def credential_header(value_strategy):
    return st.sampled_from(CREDENTIAL_NAMES).flatmap(
        lambda name: st.tuples(odd_case(name), value_strategy))


@fuzz(250)
@given(
    ordinary=st.lists(st.tuples(header_names, header_values), max_size=8),
    duplicated=st.booleans(),
    master_in=credential_header(st.just(MASTER_KEY)),
    extra_credentials=st.lists(credential_header(st.text(string.ascii_letters, min_size=8, max_size=20)
                                                 .map(lambda s: "sk-caller-" + s)), max_size=3),
)
def test_headers_never_inject_or_leak(echo_app, vllm, ordinary, duplicated, master_in, extra_credentials):
    """Random, duplicated, huge and CR/LF-laden headers: never a 500, no injected header line,
    caller credentials never forwarded, ordinary headers kept."""
    name, key = master_in
    credentials = [(name, f"Bearer {key}" if name.lower() == "authorization" else key), *extra_credentials]
    headers = ordinary + (ordinary[:1] if duplicated else []) + credentials
    environ = environ_for("/vllm/h", headers=headers, key=None)
    vllm.clear()
    answer = call(echo_app, environ)
    assert answer.status < 500
    assert_no_secrets(answer, *(value for _, value in extra_credentials), echo=True)
    recorded = vllm.requests()
    event(f"status {answer.status}")
    if not recorded:
        error = assert_envelope(answer)
        assert answer.status in (400, 401), error
        return
    [sent] = recorded
    assert answer.status == 200
    names = [k.lower() for k, _ in sent["headers"]]
    assert not any(n.startswith("x-injected") for n in names), "a header line was injected"
    assert all("\r" not in v and "\n" not in v for _, v in sent["headers"])
    assert header(sent, "authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert not set(names) & {"x-litellm-api-key", "api-key", "x-api-key"}
    dumped = json.dumps(sent)
    assert MASTER_KEY not in dumped and not any(v in dumped for _, v in extra_credentials)
    for name, _ in ordinary:
        expected = environ["HTTP_" + name.upper().replace("-", "_")]
        forwarded = [v.strip() for k, v in sent["headers"] if k.lower().replace("_", "-") == name.lower().replace("_", "-")]
        assert forwarded == [expected.strip()]


# -- 4. bodies ---------------------------------------------------------------------------------

CONTENT_TYPES = [None, "", "application/json", "application/json; charset=latin-1", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=xyz",
                 "MULTIPART/FORM-DATA; boundary=abc", "image/png", "application/vnd.api+json", "*/*"]
BROKEN_JSON = [b"{", b'{"model": "fake-model",', b"{'model': 'fake-model'}", b'{"model": fake-model}',
               b"[1, 2", b'{"a": 1}{"b": 2}', b"\xff\xfe{\x00}", b'{"model": "fake-model"', b"nul", b"{]"]
BROKEN_MULTIPART = [
    b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-model',         # no close delimiter
    b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-model\r\n--xyz',
    b'--abc\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-model\r\n--abc--\r\n',  # other boundary
    b'--xyz\r\nContent-Disposition: form-data; name="model"; filename="m"\r\n\r\nfake-model\r\n--xyz--\r\n',
    b"--xyz\r\n\r\n\r\n--xyz--\r\n", b"--xyz--\r\n",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
garbage_bodies = st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.sampled_from(BROKEN_JSON + BROKEN_MULTIPART),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.text(min_size=1, max_size=200).map(lambda s: s.encode("utf-8")),
)


def readable_model(body: bytes):
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return payload.get("model") if isinstance(payload, dict) else None


@fuzz(120)
@given(body=garbage_bodies, content_type=st.sampled_from(CONTENT_TYPES),
       route=st.sampled_from(["/v1/chat/completions", "/v1/audio/transcriptions", "/tokenize"]))
def test_master_key_bodies_reach_vllm_untouched(plain_app, vllm, body, content_type, route):
    """For the master key any body is relayed byte-for-byte and vLLM's own answer comes back."""
    vllm.clear()
    answer = call(plain_app, environ_for("/vllm" + route, method="POST", body=body, content_type=content_type))
    assert answer.status < 500
    assert_no_secrets(answer)
    [sent] = vllm.requests()
    assert base64.b64decode(sent["body_b64"]) == body
    direct_headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    if content_type is not None:
        direct_headers["Content-Type"] = content_type
    direct = vllm.http.post(vllm.url + route, data=body, headers=direct_headers, timeout=5)
    assert answer.status == direct.status_code
    if direct.status_code >= 400:
        assert answer.body == direct.content


@fuzz(100)
@given(body=garbage_bodies, content_type=st.sampled_from(CONTENT_TYPES),
       route=st.sampled_from(["/v1/chat/completions", "/v1/audio/transcriptions", "/v1/embeddings"]))
def test_model_limited_key_fails_closed_on_unreadable_bodies(kapp, vllm, limited_key, body, content_type, route):
    """A key with a models list gets 403 key_model_access_denied when the body's model cannot be
    read as an allowed one; nothing reaches vLLM, never a 500."""
    assume(readable_model(body) != "fake-model")
    # A form carrying fake-model may be a valid one that vLLM reads (python-multipart's header
    # parsing forgives much): the examples below pin those cases; this property is about bodies
    # nothing can read.
    assume(not ((content_type or "").lower().startswith("multipart/") and b"fake-model" in body))
    answer = call(kapp, environ_for("/vllm" + route, method="POST", body=body,
                                    content_type=content_type, key=limited_key))
    assert_no_secrets(answer, limited_key)
    error = assert_envelope(answer)
    assert answer.status == 403 and error["type"] == "key_model_access_denied" and error["param"] == "model"
    assert vllm.requests() == []


DEFAULT_LIMIT = 64 * 1024 * 1024  # MAX_REQUEST_BODY_BYTES's default


@fuzz(50)
@given(declared=st.one_of(st.integers(DEFAULT_LIMIT + 1, 10**13), st.just(10_000_000_000)),
       sent=st.binary(max_size=64), who=st.sampled_from(["master", "virtual"]),
       route=st.sampled_from(["/v1/chat/completions", "/v1/audio/transcriptions"]))
def test_oversized_content_length_is_refused_unread(kapp, vllm, limited_key, declared, sent, who, route):
    """A declared Content-Length above the limit gets 413 before a single body byte is read."""
    key = MASTER_KEY if who == "master" else limited_key
    environ = environ_for("/vllm" + route, method="POST", body=sent, content_length=str(declared),
                          content_type="application/json", key=key)
    answer = call(kapp, environ)
    assert_no_secrets(answer, limited_key)
    assert answer.status == 413 and assert_envelope(answer)["type"] == "request_too_large"
    assert environ["wsgi.input"].consumed == 0
    assert vllm.requests() == []


@fuzz(50)
@given(body=st.binary(max_size=512), missing=st.integers(1, 4000),
       content_type=st.sampled_from(CONTENT_TYPES), who=st.sampled_from(["master", "virtual"]))
def test_truncated_bodies_are_refused(kapp, vllm, limited_key, body, missing, content_type, who):
    """A body shorter than its Content-Length is a 400 envelope; vLLM never sees half a request."""
    key = MASTER_KEY if who == "master" else limited_key
    environ = environ_for("/vllm/v1/chat/completions", method="POST", body=body,
                          content_length=str(len(body) + missing), content_type=content_type, key=key)
    answer = call(kapp, environ)
    assert_no_secrets(answer, limited_key)
    assert answer.status == 400 and assert_envelope(answer)
    assert environ["wsgi.input"].consumed <= len(body) + missing
    assert vllm.requests() == []


@fuzz(60)
@given(length=st.one_of(st.text(max_size=12), st.integers(-10**12, -1).map(str)), body=st.binary(max_size=64))
def test_malformed_content_length_is_a_400(plain_app, vllm, length, body):
    """A Content-Length that is not a non-negative number never yields a 500 (400 unless it is
    a number after all)."""
    assume(length.strip() and not length.strip().isdigit())
    environ = environ_for("/vllm/v1/chat/completions", method="POST", body=body, content_length=length)
    answer = call(plain_app, environ)
    assert_no_secrets(answer)
    assert answer.status < 500
    if not re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", length):
        assert answer.status == 400 and assert_envelope(answer)
        assert vllm.requests() == []


# -- 5. admin payloads -------------------------------------------------------------------------

KEY_FIELDS = ("key_alias", "duration", "models", "max_budget", "budget_duration", "metadata", "user_id",
              "team_id", "rpm_limit", "tpm_limit", "max_parallel_requests", "allowed_routes", "key",
              "blocked", "tags")


def nested(depth: int):
    value: object = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


# Durations valid here are long, so no key expires (and changes Redis) during a test.
LONG_DURATIONS = st.sampled_from(["1h", "12h", "30d", "2w", "1mo", " 30d "])
BAD_DURATIONS = st.sampled_from(["30dx", "0s", "1y", "-1", "", " ", "1.5h", "99999999999d", "1000000000w", "d30",
                                 "30 d", "１h"])
weird = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2**70, 2**70),
    st.sampled_from([2**31, 2**53 + 1, 2**63, 10**12 + 1, 10**300, -(10**300), -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.integers(257, 20_000).map(lambda n: "s" * n),
    st.integers(2, 300).map(nested),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
    BAD_DURATIONS,
)
short_text = st.text(min_size=1, max_size=12)
plausible = {
    "key_alias": short_text,
    "duration": LONG_DURATIONS,
    "models": st.lists(short_text, max_size=3),
    "max_budget": st.one_of(st.floats(0, 1e6), st.integers(0, 10**6)),
    "budget_duration": LONG_DURATIONS,
    "metadata": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    "user_id": short_text,
    "team_id": short_text,
    "rpm_limit": st.integers(0, 10**12),
    "tpm_limit": st.integers(0, 10**12),
    "max_parallel_requests": st.integers(0, 10**12),
    "allowed_routes": st.lists(st.sampled_from(["/v1/*", "/v1/models", "/tokenize", "/vllm/v1/", "v1/x", "*"]),
                               max_size=3),
    "key": st.one_of(st.text(string.ascii_letters + string.digits, min_size=13, max_size=40).map("sk-".__add__),
                     st.sampled_from(["sk-short", "pk-0123456789abcdef", "sk-with space 0123456", "sk-ünïcode-0123456"])),
    "blocked": st.booleans(),
    "tags": st.lists(short_text, max_size=3),
}
known_fields = st.fixed_dictionaries({}, optional={name: st.one_of(plausible[name], weird) for name in KEY_FIELDS})
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda n: n not in KEY_FIELDS),
                                 weird, max_size=2)
payloads = st.builds(lambda known, unknown: {**known, **unknown}, known_fields, unknown_fields)


def redis_state(client) -> dict:
    """Every key under the test prefix: type, value and absolute expiry."""
    names = sorted(client.scan_iter(match=client.test_prefix + "*", count=1000))
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.type(name)
            pipe.pexpiretime(name)
        meta = pipe.execute()
    readers = {"string": "get", "hash": "hgetall", "zset": "zrange", "set": "smembers", "list": "lrange",
               "stream": "xrange"}
    with client.pipeline(transaction=False) as pipe:
        for name, kind in zip(names, meta[::2]):
            reader = readers[kind]
            if reader in ("zrange", "lrange"):
                getattr(pipe, reader)(name, 0, -1, **({"withscores": True} if kind == "zset" else {}))
            else:
                getattr(pipe, reader)(name)
        values = pipe.execute()
    return {name: (kind, expiry, value) for name, kind, expiry, value in zip(names, meta[::2], meta[1::2], values)}


def post_admin(kclient, redis_client, endpoint: str, body: bytes, content_type="application/json") -> Answer:
    """POST to an admin endpoint; a refused request must leave Redis exactly as it was."""
    before = redis_state(redis_client)
    answer = answer_of(kclient.post(endpoint, headers=MASTER, data=body, content_type=content_type))
    assert answer.status < 500, answer.body[:300]
    if answer.status >= 400:
        assert_envelope(answer)
        assert redis_state(redis_client) == before, "a refused request changed Redis"
    return answer


def assert_param_names_a_field(answer: Answer, payload: dict, *also: str) -> None:
    """A 400 names a field of the payload (or an item of one, `models[2]`), or one of `also`."""
    if answer.status != 400:
        return
    param = answer.json()["error"]["param"]
    assert param is not None, answer.body
    item = re.fullmatch(r"(.+)\[\d+\]", param)
    assert param in payload or (item and item.group(1) in payload) or param in also, (param, sorted(payload))


@fuzz(200)
@given(payload=payloads)
def test_generate_refuses_bad_fields_by_name(kclient, redis_client, payload):
    """/key/generate: 200 or a 400 naming the field; a refusal leaves Redis untouched; no
    secret comes back (only the new key itself, on success)."""
    answer = post_admin(kclient, redis_client, "/key/generate", json.dumps(payload).encode())
    event(f"status {answer.status}")
    assert answer.status in (200, 400), answer.body[:300]
    assert_param_names_a_field(answer, payload)
    assert_no_secrets(answer)


@fuzz(200)
@given(payload=payloads, naming=st.sampled_from(["key", "key", "token", "alias-only", "unknown", "weird"]),
       odd=weird)
def test_update_refuses_bad_fields_by_name(kclient, redis_client, limited_key, payload, naming, odd):
    """/key/update: 200, 404 or a 400 naming the field; a refusal leaves Redis untouched; the
    key's plaintext, the master key and the upstream key never come back."""
    payload.pop("key", None)
    if naming == "key":
        payload["key"] = limited_key
    elif naming == "token":
        payload["key"] = hashlib.sha256(limited_key.encode()).hexdigest()
    elif naming == "unknown":
        payload["key"] = "sk-no-such-key-0123456789"
    elif naming == "weird":
        payload["key"] = odd
    answer = post_admin(kclient, redis_client, "/key/update", json.dumps(payload).encode())
    event(f"status {answer.status}")
    assert answer.status in (200, 400, 404), answer.body[:300]
    assert_param_names_a_field(answer, payload, "key")
    assert_no_secrets(answer, limited_key)


not_objects = st.one_of(
    st.binary(max_size=300),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.sampled_from(BROKEN_JSON + [b"NaN", b"-Infinity", b"1e400", b'"sk-a-string-not-an-object"', b"\xef\xbb\xbf[]"]),
)


@fuzz(100)
@given(endpoint=st.sampled_from(["/key/generate", "/key/update"]), body=not_objects,
       content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]))
def test_admin_bodies_that_are_not_objects(kclient, redis_client, endpoint, body, content_type):
    """Non-JSON and non-object JSON bodies: a 400 (body-level, no param) unless the body is
    blank, never a 500, Redis untouched on refusal."""
    answer = post_admin(kclient, redis_client, endpoint, body, content_type)
    event(f"status {answer.status}")
    assert_no_secrets(answer)
    try:
        is_object = isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError):
        is_object = False
    if not body.strip() or is_object:
        return  # {} (or an object): covered above
    assert answer.status == 400
    assert answer.json()["error"]["param"] is None


# -- cases the properties above found (each was a 500 before its fix) ----------------------

def test_deeply_nested_json_to_vllm_is_relayed(plain_app, vllm):
    """A deeply nested JSON body (master key) is still relayed byte-for-byte, not a 500."""
    body = b'{"model": "fake-model", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = call(plain_app, environ_for("/vllm/v1/chat/completions", method="POST", body=body,
                                         content_type="application/json"))
    assert answer.status < 500
    assert base64.b64decode(vllm.last()["body_b64"]) == body


def test_deeply_nested_json_for_a_model_limited_key_is_refused(kapp, vllm, limited_key):
    """For a key with a models list, an unparseable (too deep) body is a 403, not a 500."""
    body = b"[" * 100_000 + b"]" * 100_000
    answer = call(kapp, environ_for("/vllm/v1/chat/completions", method="POST", body=body,
                                    content_type="application/json", key=limited_key))
    assert answer.status == 403


@pytest.mark.parametrize("endpoint", ["/key/generate", "/key/update"])
def test_deeply_nested_admin_body_is_a_400(kclient, redis_client, endpoint):
    """A JSON body nested beyond the parser's depth is a 400, not a 500."""
    post_admin(kclient, redis_client, endpoint, b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_max_budget_beyond_float_range_is_a_400(kclient, redis_client):
    """An integer max_budget too large for a float is a 400 naming max_budget, not a 500."""
    answer = post_admin(kclient, redis_client, "/key/generate", b'{"max_budget": 1' + b"0" * 400 + b"}")
    assert answer.status == 400 and answer.json()["error"]["param"] == "max_budget"


@pytest.mark.parametrize("endpoint, body", [
    ("/key/generate", b'{"key_alias": "\\ud800"}'),
    ("/key/update", b'{"key_alias": "\\udfff"}'),
    ("/key/update", b'{"key": "\\ud800"}'),
])
def test_lone_surrogates_in_identifiers_are_a_400(kclient, redis_client, endpoint, body):
    """JSON may spell a lone surrogate (\\ud800); as an alias or key it is a 400, not a 500."""
    answer = post_admin(kclient, redis_client, endpoint, body)
    assert answer.status in (400, 404)


def test_repeated_form_model_cannot_slip_past_the_models_list(kapp, vllm, limited_key):
    """With two `model` form fields, the one vLLM will use (the last, as Starlette and the fake
    read forms) must be on the key's list, else 403."""
    body = (b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-model\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nforbidden-model\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
            b"--xyz--\r\n")
    answer = call(kapp, environ_for("/vllm/v1/audio/transcriptions", method="POST", body=body,
                                    content_type="multipart/form-data; boundary=xyz", key=limited_key))
    assert answer.status == 403, "the request reached vLLM with a model outside the key's list"


@pytest.mark.parametrize("disposition", [b'form-data; name="model"', b";name= model ", b"form-data;name=model"])
def test_a_form_vllm_reads_is_read_the_same_way(kapp, vllm, limited_key, disposition):
    """Starlette takes the part's name from python-multipart's header parser, which forgives a
    missing `form-data` and spaces around the name: such a form's model is the one vLLM uses, so
    an allowed model goes through and a forbidden one is refused."""
    for model, allowed in ((b"fake-model", True), (b"forbidden-model", False)):
        vllm.clear()
        body = b"--abc\r\nContent-Disposition:" + disposition + b"\r\n\r\n" + model + b"\r\n--abc--"
        answer = call(kapp, environ_for("/vllm/v1/audio/transcriptions", method="POST", body=body,
                                        content_type="MULTIPART/FORM-DATA; boundary=abc", key=limited_key))
        # Forwarded (the fake then answers as it likes: it has no audio file), or refused.
        assert (answer.status != 403) == allowed
        assert len(vllm.requests()) == (1 if allowed else 0)


# -- 7. through a real gunicorn ----------------------------------------------------------------

def read_response(sock) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(fields.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), head + b"\r\n\r\n" + body


def test_gunicorn_refuses_oversized_bodies_without_waiting(vllm, start_gateway):
    """Through gunicorn: a 10 GB Content-Length with a few bytes sent gets 413 at once, and a
    chunked body past MAX_REQUEST_BODY_BYTES gets 413; nothing reaches vLLM."""
    gw = start_gateway(gateway_environ(vllm.url, MAX_REQUEST_BODY_BYTES=4096, DISABLE_ACCESS_LOG=1))
    head = (f"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
            "Content-Type: application/json\r\n")

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        # The socket's 10 s timeout fails the test if the gateway waits for the announced body.
        s.sendall((head + "Content-Length: 10000000000\r\n\r\n").encode() + b'{"model"')
        status, raw = read_response(s)
    assert status == 413, status
    assert MASTER_KEY.encode() not in raw and UPSTREAM_KEY.encode() not in raw

    chunk = b"x" * 2000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked)
        status, raw = read_response(s)
    assert status == 413, raw[:300]
    assert MASTER_KEY.encode() not in raw and UPSTREAM_KEY.encode() not in raw
    assert vllm.requests() == []
