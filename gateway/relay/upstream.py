"""One vLLM server (replica): send a request through the worker's `requests.Session`, probe it.

Each request is a `PreparedRequest` built here, not by `Session.request`: the caller's target
is relayed as it came (requests would re-quote the path, and merge its default headers,
environment and cookies into it), and the per-request work stays small. The session's adapter
does the HTTP (gateway/relay/transport.py).
"""
from __future__ import annotations

from urllib.parse import urlsplit

import requests
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import NewConnectionError
from urllib3.util import SKIP_HEADER

from gateway.core.errors import GatewayError
from gateway.core.runtime import gevent_patched
from gateway.relay.disconnect import CallerGone
from gateway.relay.target import PREFIX

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class HeadTimeout(Exception):
    """vLLM took longer than the head deadline to send its status line and headers."""


class Upstream:
    """Sends requests to one vLLM base; never follows redirects, never retries a sent request."""

    def __init__(self, base: str, session: requests.Session, *, api_key: str | None,
                 connect_timeout: float, read_timeout: float, head_timeout: float | None = None):
        parts = urlsplit(base)
        self.base = base
        self.base_path = parts.path
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.session = session
        self.api_key = api_key
        self.auth_header = f"Bearer {api_key}" if api_key else None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.timeout = (connect_timeout, read_timeout)
        # Twice the read timeout by default, so a silent vLLM meets the read timeout (504) first
        # and only a head trickled byte by byte meets this deadline (502).
        self.head_timeout = head_timeout or 2 * read_timeout
        # Without environment proxies (UPSTREAM_TRUST_ENV off, the default) a request goes
        # straight to the session's adapter for this origin: Session.send would add only hooks,
        # cookie extraction and redirect bookkeeping, which a relay never uses.
        self._adapter = None if session.trust_env else session.get_adapter(self.origin + "/")
        self._adapter_options = {"stream": True, "timeout": self.timeout, "verify": session.verify,
                                 "cert": session.cert, "proxies": {}}
        self._gevent = gevent_patched()  # decided once: the app is built after the worker patched

    def send(self, method: str, target: str, headers: dict, body: bytes | None) -> requests.Response:
        """Send one request (`target`: path and query from the server root); the response's
        body is left unread. Raises GatewayError 502/504 when vLLM cannot be reached, sends a
        broken head, or does not answer in time."""
        request = requests.PreparedRequest()
        request.method = method
        request.url = self.origin + target
        request.headers = _wire_headers(headers, body, method)
        request.body = body or None
        deadline = self._start_head_deadline()
        try:
            if self._adapter is not None:
                return self._adapter.send(request, **self._adapter_options)
            return self.session.send(request, stream=True, timeout=self.timeout, allow_redirects=False)
        except requests.ConnectTimeout:
            raise GatewayError(504, f"vLLM did not accept the connection within {self.connect_timeout:g}s",
                               kind="connect_timeout", retryable=True) from None
        except requests.ReadTimeout:
            raise GatewayError(504, f"vLLM did not answer within {self.read_timeout:g}s",
                               kind="read_timeout") from None
        except CallerGone:
            raise GatewayError(499, "client disconnected before vLLM answered", kind="client_gone") from None
        except HeadTimeout:
            raise GatewayError(502, f"vLLM did not finish its response head within {self.head_timeout:g}s",
                               kind="head_timeout") from None
        except requests.ConnectionError as exc:
            kind = failure_kind(exc)
            if _never_connected(exc):  # nothing of the request reached vLLM: another replica may try
                raise GatewayError(502, f"vLLM is unreachable ({kind})", kind=kind.replace(" ", "_"),
                                   retryable=True) from None
            raise GatewayError(502, f"vLLM failed to answer ({kind})", kind="bad_response") from None
        except (requests.RequestException, ValueError) as exc:  # ValueError: e.g. an invalid header
            raise GatewayError(502, f"the request could not be sent to vLLM ({type(exc).__name__})",
                               kind="bad_request") from None
        finally:
            if deadline is not None:
                deadline.close()

    def public_location(self, value: str) -> str | None:
        """A Location vLLM sent, as the caller must see it: a URL on vLLM's internal address
        becomes the gateway's `/vllm/...`; one outside the base cannot be followed through the
        gateway and is dropped (None); anything else (another host, a relative path) stays."""
        parts = urlsplit(value)
        if parts.scheme or parts.netloc:
            if f"{parts.scheme}://{parts.netloc}".lower() != self.origin.lower():
                return value
        elif not value.startswith("/"):
            return value
        base_path = self.base_path.rstrip("/")
        path = parts.path or "/"
        if base_path and path != base_path and not path.startswith(base_path + "/"):
            return None
        rest = path[len(base_path):]
        return PREFIX + rest + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")

    def _start_head_deadline(self):
        """A total deadline for the response head (HeadTimeout is raised where the request
        waits): the read timeout bounds each gap, not a head trickled one byte at a time.
        Enforced on gevent workers, how the gateway is served; None elsewhere."""
        if not self._gevent:
            return None
        import gevent

        return gevent.Timeout.start_new(self.head_timeout, HeadTimeout)

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
        except requests.RequestException as exc:
            return False, failure_kind(exc)
        return probe_verdict(self.base_path, path, resp.status_code, bool(self.auth_header))


def _wire_headers(headers: dict, body: bytes | None, method: str) -> CaseInsensitiveDict:
    """The headers as they go out: the framing header set here, and none added by urllib3
    (it would add User-Agent and Accept-Encoding the caller did not send)."""
    out = CaseInsensitiveDict(headers)
    if body:
        out["Content-Length"] = str(len(body))
    elif method in _BODY_METHODS:
        out["Content-Length"] = "0"
    for name in ("User-Agent", "Accept-Encoding"):
        if name not in out:
            out[name] = SKIP_HEADER
    return out


def _never_connected(exc: requests.ConnectionError) -> bool:
    """True when the connection itself failed (refused, unresolvable), so no byte was sent."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


# What a transport failure's text says, first match wins -> the name the gateway reports.
_FAILURE_KINDS = (
    (("refused",), "connection refused"),
    (("name or service", "resolution", "nodename"), "name resolution failed"),
    (("timed out", "timeout"), "timed out"),
    (("reset",), "connection reset"),
    (("got more than", "line too long", "linetoolong"), "response head too large"),
    (("remotedisconnected", "without response"), "connection closed without a response"),
)


def failure_kind(exc: BaseException) -> str:
    """A short, secret-free name for a transport failure."""
    text = str(exc).lower()
    for markers, kind in _FAILURE_KINDS:
        if any(marker in text for marker in markers):
            return kind
    return type(exc).__name__


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
