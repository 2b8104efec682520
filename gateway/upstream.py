"""The connection to vLLM: one pooled `requests` adapter per worker, and the response relay.

Requests go straight to the adapter's urllib3 connection pool: `Session.request` would redo
URL parsing, header merging, environment lookups, cookie and hook handling on every call, and
none of it applies to a pass-through (reference.md §5). Bytes are relayed raw
(`decode_content=False`) so `Content-Encoding` and `Content-Length` stay true to the body
(LiteLLM #25624).
"""
from __future__ import annotations

import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util.timeout import Timeout
from werkzeug.http import is_hop_by_hop_header

from gateway.errors import GatewayError

# A non-stream body up to this size is read whole, so the reply goes out in one write.
SMALL_BODY = 256 * 1024
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class Upstream:
    """Sends requests to the vLLM base over a pooled adapter; never follows redirects."""

    def __init__(self, base: str, *, api_key: str | None, connect_timeout: float,
                 read_timeout: float, pool_size: int):
        self.base = base
        self.base_path = urlsplit(base).path
        self.host_url = base[: len(base) - len(self.base_path)]
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self.session = requests.Session()
        self.session.trust_env = False  # no per-request proxy/netrc lookups from the environment
        # pool_maxsize: connections kept per host; above it they would be opened and discarded.
        self.adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)
        self.pool = self.adapter.poolmanager.connection_from_url(self.host_url)

    def send(self, method: str, path: str, headers: dict, body: bytes | None):
        """Send one request; returns urllib3's response with its body unread.

        Raises GatewayError 502/504 when vLLM cannot be reached or does not answer in time.
        """
        if body:
            headers["Content-Length"] = str(len(body))
        elif method in _BODY_METHODS:
            headers["Content-Length"] = "0"
        try:
            return self.pool.urlopen(
                method, path, body=body or None, headers=headers, retries=False, redirect=False,
                assert_same_host=False, timeout=self.timeout, preload_content=False,
                decode_content=False, release_conn=False)
        except NewConnectionError as exc:  # before ConnectTimeoutError: urllib3 derives it from that
            raise GatewayError(502, f"vLLM is unreachable ({_failure_kind(exc)})") from None
        except ConnectTimeoutError:
            raise GatewayError(504, f"vLLM did not accept the connection within {self.connect_timeout:g}s") from None
        except ReadTimeoutError:
            raise GatewayError(504, f"vLLM did not answer within {self.read_timeout:g}s") from None
        except (Urllib3Error, OSError) as exc:
            raise GatewayError(502, f"vLLM is unreachable ({_failure_kind(exc)})") from None

    def probe(self, timeout: float = 2.0) -> tuple[bool, str]:
        """GET {base}/health for readiness; returns (ok, detail)."""
        headers = {"Authorization": self.auth_header} if self.auth_header else {}
        try:
            resp = self.session.get(self.base + "/health", headers=headers, timeout=timeout,
                                    allow_redirects=False)
            resp.close()
        except requests.exceptions.RequestException as exc:
            return False, _failure_kind(exc)
        return resp.status_code < 500, f"HTTP {resp.status_code}"


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


def response_headers(raw_headers, request_id: str) -> list[tuple[str, str]]:
    """vLLM's headers minus hop-by-hop ones (and those named in Connection), plus our request id."""
    connection = raw_headers.get("connection")
    named = {t.strip().lower() for t in connection.split(",")} if connection else ()
    out = [(k, v) for k, v in raw_headers.iteritems()
           if not is_hop_by_hop_header(k) and k.lower() not in named and k.lower() != "x-request-id"]
    out.append(("X-Request-Id", request_id))
    if raw_headers.get("content-type", "").startswith("text/event-stream"):
        out.append(("X-Accel-Buffering", "no"))  # nginx would otherwise buffer the SSE stream
    return out


class RelayBody:
    """Iterates vLLM's body as it arrives and closes the upstream on every exit path.

    A class rather than a generator: WSGI servers may close a response they never iterated
    (HEAD, early disconnect), and an unstarted generator's `finally` would not run.
    `observer.on_chunk` sees each chunk after it was handed to the server, so looking at it
    never delays it (bytes are immutable: no copy needed).
    """

    def __init__(self, resp, record, observer=None):
        self.resp = resp
        self.record = record
        self.observer = observer
        self.complete = False
        self.closed = False

    def _chunks(self):
        resp = self.resp
        if resp.chunked and resp.supports_chunked_reads():
            yield from resp.read_chunked(None, decode_content=False)
        else:
            while True:
                data = resp.read1(65536, decode_content=False)
                if not data:
                    break
                yield data

    def __iter__(self):
        record = self.record
        try:
            for chunk in self._chunks():
                if record.ttfb is None:
                    record.ttfb = time.monotonic()
                record.bytes_out += len(chunk)
                yield chunk
                if self.observer is not None:
                    self.observer.on_chunk(chunk)
            self.complete = True
        except (Urllib3Error, OSError, ValueError) as exc:
            # Headers are gone already: end the stream cleanly and say why in the log.
            record.error = f"upstream stream broke: {_failure_kind(exc)}"

    def close(self):
        if self.closed:
            return
        self.closed = True
        if not self.complete and self.record.error is None:
            self.record.error = "client disconnected"
        # On an unfinished body this closes the socket, so vLLM aborts the generation (LiteLLM #30244).
        if self.complete:
            self.resp.release_conn()
        else:
            self.resp.close()


def read_small_body(resp) -> bytes | None:
    """The whole body when it is short and of known length, else None (then stream it)."""
    length = resp.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > SMALL_BODY:
        return None
    try:
        data = resp.read(decode_content=False)
    except (Urllib3Error, OSError) as exc:
        resp.close()
        raise GatewayError(502, f"vLLM's response broke off ({_failure_kind(exc)})") from None
    resp.release_conn()
    return data
