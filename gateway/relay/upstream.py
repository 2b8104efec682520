"""The connection to vLLM: pooled keep-alive connections per worker, and the response relay.

Relayed requests go through gateway/httpclient.py (raw sockets and httptools' parser); the
readiness probe uses a `requests.Session`. Bytes are relayed as received (chunk framing aside),
so `Content-Encoding` and `Content-Length` stay true to the body (LiteLLM #25624).
"""
from __future__ import annotations

import time
from urllib.parse import urlsplit

import requests
from werkzeug.http import is_hop_by_hop_header

from gateway.relay.disconnect import watch
from gateway.core.errors import GatewayError
from gateway.httpclient import ConnectionPool, UpstreamError, UpstreamTimeout

# A non-stream body up to this size is read whole, so the reply goes out in one write.
SMALL_BODY = 256 * 1024
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class Upstream:
    """Sends requests to one vLLM base over pooled connections; never follows redirects."""

    def __init__(self, base: str, *, api_key: str | None, connect_timeout: float,
                 read_timeout: float, pool_size: int, ca_bundle: str | None = None, max_idle: float = 4.0):
        parts = urlsplit(base)
        self.base = base
        self.base_path = parts.path
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        self.host_header = parts.netloc
        self.pool = ConnectionPool(parts.hostname, port, tls=tls, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout, maxsize=pool_size, ca_bundle=ca_bundle,
                                   max_idle=max_idle)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy/netrc lookups from the environment
        self.session.verify = ca_bundle or True

    def send(self, method: str, path: str, headers: dict, body: bytes | None):
        """Send one request; returns the response with its body unread.

        Raises GatewayError 502/504 when vLLM cannot be reached or does not answer in time.
        """
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise GatewayError(400, f"header {name} contains a line break")
            lines.append(f"{name}: {value}\r\n")
        if body:
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif method in _BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise GatewayError(400, "request headers must be ISO-8859-1 text") from None
        try:
            return self.pool.request(head, body, head_only=method == "HEAD")
        except UpstreamTimeout as exc:
            if exc.phase == "connect":
                raise GatewayError(504, f"vLLM did not accept the connection within {self.connect_timeout:g}s",
                                   kind="connect_timeout", retryable=True) from None
            raise GatewayError(504, f"vLLM did not answer within {self.read_timeout:g}s",
                               kind="read_timeout") from None
        except UpstreamError as exc:
            if exc.phase == "connect":
                raise GatewayError(502, f"vLLM is unreachable ({exc.kind})",
                                   kind=exc.kind.replace(" ", "_"), retryable=True) from None
            raise GatewayError(502, f"vLLM failed to answer ({exc.kind})", kind=exc.kind.replace(" ", "_")) from None

    def probe(self, timeout: float = 2.0) -> tuple[bool, str]:
        """Readiness of this replica: (ok, detail naming the cause when not ok).

        vLLM's `/health` needs no key, so it cannot tell a wrong upstream key; `/v1/models` is
        behind `--api-key`, so it is probed too. A 404 on `/health` means the base URL is not
        the server's root (a common slip: a base ending in `/v1`).
        """
        ok, detail = self._probe_get("/health", timeout)
        if not ok:
            return ok, detail
        return self._probe_get("/v1/models", timeout)

    def _probe_get(self, path: str, timeout: float) -> tuple[bool, str]:
        headers = {"Authorization": self.auth_header} if self.auth_header else {}
        try:
            resp = self.session.get(self.base + path, headers=headers, timeout=timeout, allow_redirects=False)
            resp.close()
        except requests.exceptions.RequestException as exc:
            return False, _failure_kind(exc)
        return probe_verdict(self.base_path, path, resp.status_code, bool(self.auth_header))


def probe_verdict(base_path: str, path: str, status: int, has_key: bool) -> tuple[bool, str]:
    """(ok, detail) for one readiness answer from vLLM; the detail says what to fix."""
    if status in (401, 403):
        if has_key:
            return False, f"vLLM refused the gateway's upstream key (HTTP {status} on {path}); check HOSTED_VLLM_API_KEY"
        return False, f"vLLM requires a key (HTTP {status} on {path}); set HOSTED_VLLM_API_KEY"
    if status == 404:
        hint = " (it must be the server root, without /v1)" if base_path.rstrip("/").endswith("/v1") else ""
        return False, f"HTTP 404 on {path}: HOSTED_VLLM_API_BASE does not point at a vLLM server root{hint}"
    if status >= 300:
        return False, f"HTTP {status} on {path}"
    return True, f"HTTP {status}"


def _failure_kind(exc: BaseException) -> str:
    """A short, secret-free name for a transport failure."""
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "resolution" in text or "nodename" in text:
        return "name resolution failed"
    if "timed out" in text or "timeout" in text:
        return "timed out"
    if "reset" in text:
        return "connection reset"
    return type(exc).__name__


def response_headers(resp, request_id: str) -> list[tuple[str, str]]:
    """vLLM's headers minus hop-by-hop ones (and those named in Connection), plus our request id."""
    connection = resp.header("connection")
    named = {t.strip().lower() for t in connection.split(",")} if connection else ()
    out = [(k, v) for k, v in resp.headers
           if not is_hop_by_hop_header(k) and k.lower() not in named and k.lower() != "x-request-id"]
    out.append(("X-Request-Id", request_id))
    if resp.header("content-type").startswith("text/event-stream"):
        out.append(("X-Accel-Buffering", "no"))  # nginx would otherwise buffer the SSE stream
    return out


class RelayBody:
    """Iterates vLLM's body as it arrives and closes the upstream on every exit path.

    A class rather than a generator: WSGI servers may close a response they never iterated
    (HEAD, early disconnect), and an unstarted generator's `finally` would not run.
    `observer.on_chunk` sees each chunk after it was handed to the server, so looking at it
    never delays it (bytes are immutable: no copy needed).
    """

    def __init__(self, resp, record, observer=None, client_socket=None):
        self.resp = resp
        self.record = record
        self.observer = observer
        self.complete = False
        self.closed = False
        self.client_gone = False
        self.watcher = watch(client_socket, self._client_gone)

    def _client_gone(self):
        self.client_gone = True
        self.resp.close()  # wakes the relay loop with an error; vLLM sees the connection close

    def __iter__(self):
        record = self.record
        try:
            for chunk in self.resp.pieces():
                if record.ttfb is None:
                    record.ttfb = time.monotonic()
                record.bytes_out += len(chunk)
                yield chunk
                if self.observer is not None:
                    self.observer.on_chunk(chunk)
            self.complete = True
        except UpstreamError as exc:
            # Headers are gone already: end the stream cleanly and say why in the log.
            record.error = "client disconnected" if self.client_gone else f"upstream stream broke: {exc.kind}"

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.kill()  # before gunicorn reads the next request from the same socket
        if not self.complete and self.record.error is None:
            self.record.error = "client disconnected"
        # On an unfinished body this closes the socket, so vLLM aborts the generation (LiteLLM #30244).
        if self.complete:
            self.resp.release()
        else:
            self.resp.close()


def read_small_body(resp) -> bytes | None:
    """The whole body when it is short and of known length, else None (then stream it)."""
    length = resp.header("content-length")
    if not length.isdigit() or int(length) > SMALL_BODY:
        return None
    try:
        data = resp.read_all()
    except UpstreamError as exc:
        resp.close()
        raise GatewayError(502, f"vLLM's response broke off ({exc.kind})") from None
    resp.release()
    return data
