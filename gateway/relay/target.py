"""What the gateway sends upstream: target path, headers and body, built from the WSGI environ.

Everything here works on the raw request, so vLLM receives the target the caller sent with its
meaning unchanged (urllib3 then applies RFC 3986's normalisations) and the body byte for byte.
"""
from __future__ import annotations

import re
import socket
from urllib.parse import unquote

from werkzeug.http import is_hop_by_hop_header

from gateway.core.errors import GatewayError
from gateway.core.runtime import gevent_patched

# Everything after it is vLLM's path: the one place the prefix is spelled.
PREFIX = "/vllm"

# Every header a caller may put its gateway key in: none of them may reach vLLM (LiteLLM #32202).
CREDENTIAL_ENVIRON_KEYS = ("HTTP_X_LITELLM_API_KEY", "HTTP_AUTHORIZATION", "HTTP_API_KEY", "HTTP_X_API_KEY")
# Headers the gateway recomputes or owns instead of copying.
_REPLACED = frozenset({
    "HTTP_HOST", "HTTP_CONTENT_LENGTH", "HTTP_X_REQUEST_ID", "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO", "HTTP_EXPECT", "HTTP_PROXY_CONNECTION",
}) | frozenset(CREDENTIAL_ENVIRON_KEYS)

# Bytes that may stand in a request target as they are; anything else is percent-encoded
# (http.client refuses non-ASCII and control characters, and '#' would end the path).
_UNSAFE = re.compile(rb"[^\x21-\x7e]|#")
# A '%' that starts no %XX escape means a literal '%'. urllib3 re-encodes every '%' of a target
# holding even one such stray (turning a real %80 into %2580), so strays are written as %25.
_STRAY_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _quote_unsafe(raw: bytes) -> str:
    """The target as it goes on the wire, meaning unchanged. urllib3 then applies RFC 3986's
    normalisations (escapes in upper case, characters a URI may not hold escaped)."""
    raw = _STRAY_PERCENT.sub(b"%25", raw)
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")


def _has_dot_segment(path: str) -> bool:
    """True when any segment is '.' or '..', however often it was percent-encoded."""
    for _ in range(4):
        if any(seg in (".", "..") for seg in re.split(r"[/\\]", path)):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # encoded more than three times over: refuse rather than guess


def raw_target(environ) -> str:
    """The request target as the client sent it (path and query, percent-encoding intact)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        # No server-provided raw URI: rebuild one from the decoded parts.
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        # PATH_INFO is decoded: every '%' in it is a literal one.
        raw = _quote_unsafe(path.replace("%", "%25").encode("latin-1", "replace")).replace("?", "%3F")
        return raw + ("?" + query if query else "")
    if not raw.startswith("/"):
        # absolute-form ("GET http://host/vllm/x HTTP/1.1"): drop scheme and authority.
        scheme_end = raw.find("://")
        slash = raw.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        raw = raw[slash:] if slash >= 0 else "/"
    return raw


def vllm_target(environ) -> tuple[str, str]:
    """Split `/vllm/<rest>` into vLLM's path and the query (with its '?', or '').

    Refuses anything that could climb above the base: dot segments, however encoded.
    """
    raw = raw_target(environ)
    if not raw.startswith(PREFIX) or raw[len(PREFIX):len(PREFIX) + 1] not in ("", "/", "?"):
        raise GatewayError(400, "the /vllm prefix must be written literally, without percent-encoding")
    path, sep, query = raw[len(PREFIX):].partition("?")
    if _has_dot_segment(path):
        raise GatewayError(400, "the path after /vllm may not contain '.' or '..' segments")
    path = _quote_unsafe(path.encode("latin-1", "replace"))
    if sep:
        query = _quote_unsafe(query.encode("latin-1", "replace"))
    return path, sep + query


def _connection_named(environ) -> frozenset:
    value = environ.get("HTTP_CONNECTION")
    if not value:
        return frozenset()
    return frozenset("HTTP_" + t.strip().upper().replace("-", "_") for t in value.split(",") if t.strip())


def _header_value(name: str, value: str) -> str:
    """A value that can go out as one header line: no line breaks, ISO-8859-1 text."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise GatewayError(400, f"header {name} contains a line break")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise GatewayError(400, "request headers must be ISO-8859-1 text") from None
    return value


def forward_headers(environ, request_id: str, upstream_auth: str | None) -> dict:
    """Caller headers minus hop-by-hop, Host, Content-Length and credentials; plus ours."""
    named = _connection_named(environ)
    headers = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_") or key in _REPLACED or key in named:
            continue
        name = key[5:].replace("_", "-").title()
        if is_hop_by_hop_header(name):
            continue
        headers[name] = _header_value(name, value)
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type
    headers["X-Request-Id"] = request_id
    remote = environ.get("REMOTE_ADDR") or "unknown"
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    headers["X-Forwarded-Proto"] = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
    if upstream_auth:
        headers["Authorization"] = upstream_auth
    return headers


def read_body(environ, limit: int, timeout: float | None = None) -> bytes:
    """The exact request body bytes; 413 past `limit` without reading the rest.

    On a gevent worker the whole body must arrive within `timeout` seconds (408), so a caller
    trickling a byte now and then cannot hold a connection for ever. A body gunicorn cannot
    decode (bad chunk framing, premature end) is a 400. After either the rest of the body is
    unread, so the connection is closed once the error has been sent."""
    timer = _body_timer(timeout)
    try:
        return _read_body(environ, limit)
    except _BODY_ERRORS as exc:
        _stop_reading(environ)
        raise GatewayError(400, f"the request body could not be read: {_body_error_text(exc)}",
                           headers=_CLOSE) from None
    except BaseException as exc:
        if timer is None or exc is not timer:
            raise
        _stop_reading(environ)
        raise GatewayError(408, f"request body not received within {timeout:g}s", headers=_CLOSE) from None
    finally:
        if timer is not None:
            timer.close()


try:  # what gunicorn raises while reading a body it cannot decode
    from gunicorn.http.errors import NoMoreData, ParseException
    _BODY_ERRORS: tuple = (ParseException, NoMoreData)
except ImportError:  # pragma: no cover - gunicorn is a dependency, but not of every server
    _BODY_ERRORS = ()
_CLOSE = {"Connection": "close"}


def _body_timer(timeout: float | None):
    """A started gevent.Timeout on a gevent worker; None elsewhere (nothing to interrupt)."""
    if not timeout or not gevent_patched():
        return None
    import gevent

    timer = gevent.Timeout(timeout)
    timer.start()
    return timer


def _body_error_text(exc: Exception) -> str:
    if isinstance(exc, NoMoreData):
        return "it ended before its last chunk"
    return f"{type(exc).__name__}: {exc}"


def _stop_reading(environ) -> None:
    """Make gunicorn close the connection after the error response: it would otherwise read
    the rest of the body (at the caller's pace, or from a broken framing) to reach the next
    request. With reading shut down it finds the end at once and closes."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already gone


def _read_body(environ, limit: int) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise GatewayError(400, "Content-Length is not a number") from None
        if size < 0:
            raise GatewayError(400, "Content-Length is negative")
        if size > limit:
            raise GatewayError(413, f"request body of {size} bytes exceeds the {limit}-byte limit")
        body = stream.read(size) if size else b""
        if len(body) != size:
            raise GatewayError(400, "request body ended before Content-Length bytes arrived", headers=_CLOSE)
        return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and not environ.get("wsgi.input_terminated"):
        return b""
    parts, total = [], 0
    while True:
        piece = stream.read(65536)
        if not piece:
            return b"".join(parts)
        total += len(piece)
        if total > limit:
            raise GatewayError(413, f"request body exceeds the {limit}-byte limit")
        parts.append(piece)
