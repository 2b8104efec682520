"""The HTTP transport to vLLM: one `requests.Session` per worker and the adapter it mounts.

requests and urllib3 do the HTTP; this module only configures them, through the extension
points they document (an `HTTPAdapter` subclass overriding `init_poolmanager`, urllib3's
`ConnectionCls`, http.client's `response_class`), for three things a relay needs:

- **Interim answers.** http.client skips only `100 Continue`; a `103 Early Hints` would be taken
  as the final answer (empty body) and the real one left on the connection for the next caller.
  `FinalResponse` skips every 1xx but `101`.
- **Idle connections.** vLLM's uvicorn closes a keep-alive connection idle for 5 s. A request sent
  on it as it closes fails after bytes may have reached vLLM, which must not be retried. A
  pooled connection is therefore not reused once idle longer than `max_idle` (4 s by default).
- **No retries, no redirects, no cookies.** `Retry(0, read=False)`; redirects are not followed
  (`allow_redirects=False` at each call); cookies vLLM might set are never stored or sent.

Stray bytes after a complete response (a second response, a HEAD answer with a body) never
reach the next caller: urllib3 checks a pooled connection before reuse and drops one that has
anything to read.
"""
from __future__ import annotations

import http.client
import select
import time
from http.cookiejar import DefaultCookiePolicy

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.retry import Retry

MAX_INTERIM_RESPONSES = 10


def _unpatched_poll():
    """select.poll as the OS provides it. A zero-timeout poll never blocks, so it is safe on a
    gevent worker, and costs one system call where gevent's emulation starts and stops watchers."""
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


_poll = _unpatched_poll()


class FinalResponse(http.client.HTTPResponse):
    """Reads past interim 1xx answers to the final one (101 Switching Protocols is final)."""

    def begin(self):
        super().begin()
        for _ in range(MAX_INTERIM_RESPONSES):
            if not 102 <= self.status < 200:  # 100 was skipped by http.client already
                return
            self.headers = self.msg = None    # begin() reads a head only while headers is None
            super().begin()
        if 102 <= self.status < 200:
            raise http.client.HTTPException(f"more than {MAX_INTERIM_RESPONSES} interim responses")


class _IdleLimited:
    """Mixed into urllib3's connections: not reused once idle longer than `max_idle`."""

    max_idle = 4.0
    response_class = FinalResponse
    _answered_at = None

    def getresponse(self, *args, **kwargs):
        response = super().getresponse(*args, **kwargs)
        self._answered_at = time.monotonic()
        return response

    @property
    def is_connected(self) -> bool:
        """Reusable: not idle too long, and nothing to read (neither a close nor stray bytes).

        Idle time counts from the response head: a long stream only makes the connection look
        older, which costs a new connection, never a stale one."""
        if self.sock is None:
            return False
        if self._answered_at is not None and time.monotonic() - self._answered_at > self.max_idle:
            return False
        poller = _poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)


def _pool_classes(max_idle: float) -> dict:
    """urllib3 pool classes whose connections carry this worker's idle limit."""
    http_conn = type("VLLMConnection", (_IdleLimited, HTTPConnection), {"max_idle": max_idle})
    https_conn = type("VLLMHTTPSConnection", (_IdleLimited, HTTPSConnection), {"max_idle": max_idle})
    return {
        "http": type("VLLMConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("VLLMHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


class VLLMAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools use the connections above."""

    def __init__(self, *, max_idle: float, **kwargs):
        self.max_idle = max_idle
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self.max_idle)
        self._pools = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        """The pool for this request's origin, remembered: requests would parse the URL and
        build the pool key again for every request to the same few vLLM servers."""
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        scheme, _, netloc = request.url.split("/", 3)[:3]
        key = (scheme, netloc, verify, cert)  # the session sets verify (a bool or CA path) and no cert
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # pool.pool is None once the pool was closed
            pool = self._pools[key] = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool

    def build_response(self, req, resp):
        """requests' Response around urllib3's, without what a relay never reads: a copy of
        the headers (urllib3's are case-insensitive already) and a cookie jar filled from them."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self):
        self._pools.clear()
        super().close()


class _NoCookies(DefaultCookiePolicy):
    """vLLM has no use for cookies; keeping them would grow the worker's jar forever."""

    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


def build_session(*, pool_size: int, max_idle: float, replicas: int = 1, trust_env: bool = False,
                  ca_bundle: str | None = None) -> requests.Session:
    """The worker's session: one pool per replica, each keeping up to `pool_size` connections
    (a pool smaller than the number of concurrent streams would close and reopen connections)."""
    session = requests.Session()
    session.trust_env = trust_env   # environment proxies and .netrc: opt-in (UPSTREAM_TRUST_ENV)
    session.verify = ca_bundle or True
    session.headers.clear()         # only the caller's headers go to vLLM, not requests' defaults
    session.cookies.set_policy(_NoCookies())
    adapter = VLLMAdapter(max_idle=max_idle, pool_connections=max(replicas, 1), pool_maxsize=pool_size,
                          max_retries=Retry(0, read=False, redirect=False))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
