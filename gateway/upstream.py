"""The connection to vLLM: one pooled `requests` adapter per worker, and the response relay.

Bytes are relayed raw (`decode_content=False`) so `Content-Encoding` and `Content-Length`
stay true to the body (LiteLLM #25624).
"""
from __future__ import annotations

import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.http import is_hop_by_hop_header

from gateway.errors import GatewayError

# A non-stream body up to this size is read whole, so the reply goes out in one write.
SMALL_BODY = 256 * 1024


class Upstream:
    """Sends requests to the vLLM base over a pooled adapter; never follows redirects."""

    def __init__(self, base: str, *, api_key: str | None, connect_timeout: float,
                 read_timeout: float, pool_size: int):
        self.base = base
        self.host_url = base[: len(base) - len(urlsplit(base).path)]
        self.base_path = urlsplit(base).path
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        self.session.trust_env = False  # no per-request proxy/netrc lookups from the environment
        self.adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)

    def send(self, method: str, path: str, headers: dict, body: bytes | None):
        """Send one request and return the `requests.Response` with its raw body unread.

        Raises GatewayError 502/504 when vLLM cannot be reached or does not answer in time.
        """
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self.host_url + path
        prepared.headers = CaseInsensitiveDict(headers)
        if body:
            prepared.headers["Content-Length"] = str(len(body))
            prepared.body = body
        else:
            if method in ("POST", "PUT", "PATCH"):
                prepared.headers["Content-Length"] = "0"
            prepared.body = None
        prepared.hooks = {"response": []}
        try:
            return self.adapter.send(prepared, stream=True, timeout=self.timeout)
        except requests.exceptions.ConnectTimeout:
            raise GatewayError(504, f"vLLM did not accept the connection within {self.timeout[0]:g}s") from None
        except requests.exceptions.ReadTimeout:
            raise GatewayError(504, f"vLLM did not answer within {self.timeout[1]:g}s") from None
        except (requests.exceptions.RequestException, Urllib3Error, OSError) as exc:
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
    named = {t.strip().lower() for v in raw_headers.getlist("connection") for t in v.split(",")}
    out = [(k, v) for k, v in raw_headers.items()
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
        self.raw = resp.raw
        self.record = record
        self.observer = observer
        self.complete = False
        self.closed = False

    def _chunks(self):
        raw = self.raw
        if raw.chunked and raw.supports_chunked_reads():
            yield from raw.read_chunked(None, decode_content=False)
        else:
            while True:
                data = raw.read1(65536, decode_content=False)
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
            self.raw.release_conn()
        else:
            self.resp.close()


def read_small_body(resp) -> bytes | None:
    """The whole body when it is short and of known length, else None (then stream it)."""
    length = resp.raw.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > SMALL_BODY:
        return None
    try:
        return resp.raw.read(decode_content=False)
    except (Urllib3Error, OSError) as exc:
        resp.close()
        raise GatewayError(502, f"vLLM's response broke off ({_failure_kind(exc)})") from None
