"""A fast, plain-WSGI imitation of the vLLM 0.33 OpenAI-compatible server.

``make_app()`` returns a WSGI callable (no framework: a benchmark needs this
to be far cheaper than the gateway under test).  Besides the vLLM routes it
offers control headers (``x-fake-*``) that tests send *through* a gateway to
provoke delays, errors, broken streams and hangs, and ``/_fake/*`` routes to
inspect what actually arrived and how streams ended.

With a load model (``make_app(load=LoadConfig(...))``, or any load option of
``python -m fakevllm``; see engine.py) generation requests queue for a batch
slot and KV blocks and take the time vLLM would; without one (the default)
they are answered at once.
"""

import base64
import errno
import gzip
import hmac
import re
import threading
import time
from http import HTTPStatus
from urllib.parse import parse_qsl, quote

from . import handlers as H
from .engine import LoadConfig, LoadModel
from .payloads import dumps, models_list
from .sse import ClientGone, SSEStream, drive

__all__ = ["make_app", "FakeVLLM"]

MAX_RECORDS = 1000
MAX_EVENTS = 1000
MAX_HANG = 600.0
DEFAULT_CHUNKS = 5
AUTH_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")

_STATUS = {s.value: "%d %s" % (s.value, s.phrase) for s in HTTPStatus}
_JSON = H.JSON
_NOT_FOUND = (404, _JSON, b'{"detail":"Not Found"}')
_UNAUTHORIZED = (401, _JSON, b'{"error":"Unauthorized"}')
_SSE = [("Content-Type", "text/event-stream; charset=utf-8")]

_GET = frozenset(["GET"])
_POST = frozenset(["POST"])
_GET_POST = frozenset(["GET", "POST"])
_ROUTES = {
    "/health": (_GET, H.health),
    "/ping": (_GET_POST, H.health),
    "/version": (_GET, H.version),
    "/load": (_GET, H.load),
    "/metrics": (_GET, H.metrics),
    "/v1/models": (_GET, H.models),
    "/tokenize": (_POST, H.tokenize),
    "/detokenize": (_POST, H.detokenize),
    "/v1/chat/completions": (_POST, H.chat),
    "/v1/completions": (_POST, H.completions),
    "/invocations": (_POST, H.invocations),
    "/v1/responses": (_POST, H.responses),
    "/v1/messages": (_POST, H.messages),
    "/v1/embeddings": (_POST, H.embeddings),
    "/v1/audio/transcriptions": (_POST, H.audio),
    "/v1/audio/translations": (_POST, H.audio),
}
for _p in ("/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank",
           "/v2/rerank", "/v2/embed"):
    _ROUTES[_p] = (_POST, H.pooling_stub)
for _p in ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
           "/reset_mm_cache", "/reset_encoder_cache", "/server_info", "/start_profile",
           "/stop_profile", "/pause", "/resume", "/is_paused", "/update_weights",
           "/scale_elastic_ep", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
           "/release_kv_cache_memory"):
    _ROUTES[_p] = (_GET_POST, H.operator)


def _route(path):
    """Return (methods or None for any, handler) or None for an unknown path."""
    hit = _ROUTES.get(path)
    if hit is not None:
        return hit
    if path == "/echo" or path.startswith("/echo/"):
        return None, H.echo
    if path.startswith("/fault_tolerance/"):
        return _GET_POST, H.operator
    if path.startswith("/v1/responses/"):
        rest = path[len("/v1/responses/"):]
        if rest and "/" not in rest:
            return _GET, H.response_get
        if rest.count("/") == 1 and rest.endswith("/cancel") and rest != "/cancel":
            return _POST, H.response_cancel
    return None


def _int_header(environ, key, default=None):
    value = environ.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return default


def _status_line(code):
    return _STATUS.get(code) or "%d Unknown" % code


def _raw_headers(environ):
    """Request headers as received, as [name, value] pairs.

    Our pywsgi handler (server.py) stores the exact list; under any other
    server rebuild it from the CGI keys (original case is lost there).
    """
    raw = environ.get("fake.raw_headers")
    if raw is not None:
        return [[k, v] for k, v in raw]
    out = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            out.append([key[5:].replace("_", "-").title(), value])
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            out.append([key.replace("_", "-").title(), value])
    return out


def _read_body(environ):
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if environ.get("wsgi.input_terminated"):
        return stream.read()  # pywsgi: handles chunked uploads, EOF at the end
    length = _int_header(environ, "CONTENT_LENGTH", 0)
    return stream.read(length) if length > 0 else b""


class Request:
    """What handlers get: the request plus the parsed x-fake-chunks knob."""

    __slots__ = ("method", "path", "raw_path", "query", "body", "environ", "rid",
                 "headers", "chunks", "streaming", "seq", "watcher")

    def __init__(self, environ, method, path, body):
        self.environ = environ
        self.method = method
        self.path = path
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        # The wire path keeps percent-encoding; PATH_INFO is already decoded.
        self.raw_path = raw.split("?", 1)[0] if raw else quote(
            environ.get("SCRIPT_NAME", "") + path, safe="/:@!$&'()*+,;=-._~")
        self.query = environ.get("QUERY_STRING", "")
        self.body = body
        self.rid = environ.get("HTTP_X_REQUEST_ID")
        self.headers = _raw_headers(environ)
        self.chunks = max(_int_header(environ, "HTTP_X_FAKE_CHUNKS", DEFAULT_CHUNKS), 0)
        self.streaming = False
        self.seq = None      # the load model's Seq for this request, if any
        self.watcher = None  # the greenlet watching for a hang-up meanwhile


class FakeVLLM:
    """The WSGI callable; ``recorded`` and ``events`` are public for tests."""

    def __init__(self, api_key=None, model="fake-model", load=None):
        self.api_key = api_key
        if isinstance(load, dict):
            load = LoadConfig(**load)
        self.load = LoadModel(load) if load is not None else None
        self.model = model
        self.recorded = []
        self.events = []
        self.inflight = 0
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0}
        self.models_body = dumps(models_list(model, int(time.time()))).encode()
        # threading primitives become gevent-aware under monkey.patch_all(),
        # and stay correct for in-process use with real threads.
        self._cond = threading.Condition()

    # ------------------------------------------------------------ state

    def count_tokens(self, prompt, generated):
        c = self.counters
        c["prompt_tokens"] += prompt
        c["generation_tokens"] += generated
        c["requests"] += 1
        if self.load is not None:
            self.load.pick().count(prompt, generated)

    # ------------------------------------------------------- load model

    def generate(self, req, prompt, n, tokens):
        """Account a generation request of ``prompt`` tokens and ``n`` output tokens; under
        the load model also queue it on an engine (``tokens()`` gives the prompt's tokens).
        Returns an error response, or None to go on."""
        if self.load is None:
            self.count_tokens(prompt, n)
            return None
        capacity = self.load.capacity
        if prompt + max(n, 1) > capacity:
            return H.error(
                "This model's maximum context length is %d tokens. However, you requested "
                "%d tokens (%d in the messages, %d in the completion). Please reduce the "
                "length of the messages or completion." % (capacity, prompt + n, prompt, n),
                400)
        c = self.counters
        c["prompt_tokens"] += prompt
        c["generation_tokens"] += n
        c["requests"] += 1
        engine = self.load.pick()
        seq = req.seq = engine.submit(tokens(), n)
        sock = req.environ.get("fake.socket")
        if sock is not None:  # our gevent server: abort when the client hangs up
            import gevent
            req.watcher = gevent.spawn(_watch_hangup, sock, seq)
        return None

    def wait_generated(self, req):
        """Non-stream: block until the request's tokens are all generated.  A client that
        hung up meanwhile gets its connection dropped (the engine already freed its slot)."""
        seq = req.seq
        if seq is None:
            return
        try:
            finished = seq.engine.wait_finished(seq)
        finally:
            self._release(req)
        if not finished:
            self.add_event({"type": "request_aborted", "request_id": req.rid,
                            "path": req.raw_path, "time": time.time()})
            raise ConnectionResetError(errno.ECONNRESET, "client gone during generation")

    def _release(self, req):
        """The request is over: abort its Seq if still active, stop the hang-up watcher."""
        seq, req.seq = req.seq, None
        if seq is not None:
            seq.engine.abort(seq)
        watcher, req.watcher = req.watcher, None
        if watcher is not None:
            watcher.kill()

    def _gated(self, seq, head, n, content, tail):
        """(head, content, tail) that wait for the engine: head until the first token (all
        of them when n == 0), content(i) until token i, tail until the request finished."""
        engine = seq.engine

        def gated_head():
            if not (engine.wait_tokens(seq, 1) if n else engine.wait_finished(seq)):
                raise ClientGone()
            yield from head

        def gated_content(i):
            if not engine.wait_tokens(seq, i + 1):
                raise ClientGone()
            return content(i)

        def gated_tail():
            if not engine.wait_finished(seq):
                raise ClientGone()
            yield from tail

        return gated_head(), gated_content, gated_tail()

    def add_event(self, event):
        with self._cond:
            self.events.append(event)
            if len(self.events) > MAX_EVENTS:
                del self.events[0]
            self._cond.notify_all()

    def _record(self, req):
        rec = self.recorded
        rec.append({"method": req.method, "path": req.raw_path, "query": req.query,
                    "headers": req.headers, "body_b64": base64.b64encode(req.body).decode(),
                    "request_id": req.rid})
        if len(rec) > MAX_RECORDS:
            del rec[0]

    def stream(self, req, head, n, content, tail, error_tail):
        """Wrap stream events in an SSEStream honouring the x-fake-* knobs."""
        env = req.environ
        delay = max(_int_header(env, "HTTP_X_FAKE_CHUNK_DELAY_MS", 0), 0) / 1000.0
        sock = env.get("fake.socket")
        seq = req.seq

        def pause(seconds):
            # Watch the socket while pausing, as a real server notices a hang-up during a
            # silence (e.g. a long prefill) rather than at its next write.
            if seq is not None:  # the request's watcher is on the socket already
                if seq.engine.wait_aborted(seq, seconds):
                    raise ClientGone()
            elif sock is None:
                time.sleep(seconds)
            elif _wait_for_hangup(sock, seconds) == "client_gone":
                raise ClientGone()

        if seq is not None:
            head, content, tail = self._gated(seq, head, n, content, tail)

        events = drive(head, n, content, tail, delay,
                       _int_header(env, "HTTP_X_FAKE_FAIL_AFTER"),
                       _int_header(env, "HTTP_X_FAKE_STREAM_ERROR_AFTER"), error_tail, sleep=pause)
        rid, path = req.rid, req.raw_path

        def on_close(kind, sent):
            self.inflight -= 1
            if req.seq is not None:
                self._release(req)  # frees the slot before the event is seen
            self.add_event({"type": kind, "request_id": rid, "path": path,
                            "events_sent": sent, "time": time.time()})

        req.streaming = True  # inflight is now released by on_close
        return 200, _SSE, SSEStream(events, on_close)

    # ------------------------------------------------------------- WSGI

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        method = environ["REQUEST_METHOD"]
        if path.startswith("/_fake/"):
            code, headers, body = self._introspect(method, path, environ)
            start_response(_status_line(code), headers + [("Content-Length", str(len(body)))])
            return [body]
        req = Request(environ, method, path, _read_body(environ))
        self._record(req)
        self.inflight += 1
        try:
            code, headers, body = self._dispatch(req)
            if req.streaming:
                write = start_response(_status_line(code), headers)
                if req.seq is not None and callable(write):
                    # vLLM answers with the headers at once; the first event may wait in
                    # the queue and prefill (pywsgi would hold them for the first chunk).
                    try:
                        write(b"")
                    except BaseException:
                        body.close()
                        raise
                return body
            if body and environ.get("HTTP_X_FAKE_GZIP") == "1":
                body = gzip.compress(body, 6, mtime=0)
                headers = headers + [("Content-Encoding", "gzip")]
            start_response(_status_line(code), headers + [("Content-Length", str(len(body)))])
            return [] if method == "HEAD" else [body]
        finally:
            if not req.streaming:
                self.inflight -= 1
                if req.seq is not None:
                    self._release(req)

    def _dispatch(self, req):
        env = req.environ
        delay = _int_header(env, "HTTP_X_FAKE_DELAY_MS", 0)
        if delay > 0:
            time.sleep(delay / 1000.0)
        if self.api_key is not None and req.method != "OPTIONS" \
                and req.path.startswith(AUTH_PREFIXES) and not self._authorized(env):
            return _UNAUTHORIZED
        if env.get("HTTP_X_FAKE_HANG") == "1":
            self._hang(req)
        status = _int_header(env, "HTTP_X_FAKE_STATUS")
        if status is not None and 200 <= status <= 599:
            if status in (204, 304):
                return status, [], b""
            return H.error("fake error (x-fake-status: %d)" % status, status)
        hit = _route(req.path)
        if hit is None:
            return _NOT_FOUND
        methods, handler = hit
        method = req.method
        if methods is not None and method not in methods and not (
                method == "HEAD" and "GET" in methods):
            allow = ", ".join(sorted(methods))
            return 405, _JSON + [("Allow", allow)], b'{"detail":"Method Not Allowed"}'
        try:
            return handler(self, req)
        except H.BadRequest as exc:
            return exc.response

    def _authorized(self, environ):
        # vLLM: "Bearer <key>", scheme case-insensitive, constant-time compare.
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.api_key.encode())

    def _hang(self, req):
        """Never answer: wait until the client hangs up (or MAX_HANG), then
        drop the connection.  Needs the socket our pywsgi handler exposes;
        without it (other servers) just sleep."""
        sock = req.environ.get("fake.socket")
        reason = "timeout"
        if sock is None:
            time.sleep(MAX_HANG)
        else:
            reason = _wait_for_hangup(sock, MAX_HANG)
        self.add_event({"type": "hang_ended", "reason": reason, "request_id": req.rid,
                        "path": req.raw_path, "time": time.time()})
        # ECONNRESET makes pywsgi close the socket quietly without a response.
        raise ConnectionResetError(errno.ECONNRESET, "x-fake-hang: giving up")

    # ---------------------------------------------------- introspection

    def _introspect(self, method, path, environ):
        if path == "/_fake/requests":
            if method == "GET":
                return H.json_resp({"requests": self.recorded})
            if method == "DELETE":
                with self._cond:
                    del self.recorded[:]
                    del self.events[:]
                return H.json_resp({"ok": True})
        elif path == "/_fake/events" and method == "GET":
            return H.json_resp({"events": self.events})
        elif path == "/_fake/inflight" and method == "GET":
            return H.json_resp({"inflight": self.inflight})
        elif path == "/_fake/wait" and method == "GET":
            return self._wait(environ.get("QUERY_STRING", ""))
        else:
            return _NOT_FOUND
        return 405, _JSON, b'{"detail":"Method Not Allowed"}'

    def _wait(self, query):
        """Long-poll until an event matches every query field but ``timeout``."""
        want = dict(parse_qsl(query, keep_blank_values=True))
        try:
            timeout = min(max(float(want.pop("timeout", 5)), 0.0), MAX_HANG)
        except ValueError:
            return H.error("timeout must be a number", 400)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if all(_matches(k, _as_text(event.get(k)), v) for k, v in want.items()):
                        return H.json_resp(event)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return H.json_resp({"timeout": True}, 408)
                self._cond.wait(remaining)


# A gateway in front appends "-<12 hex>" to a caller's X-Request-Id (unique per request).
_GATEWAY_SUFFIX = re.compile(r"-[0-9a-f]{12}")


def _matches(field, value, wanted):
    """An event field equals the wanted value; a request id also matches with the suffix a
    gateway in front appended, so tests can wait on the id they sent."""
    if value == wanted:
        return True
    return (field == "request_id" and value is not None and value.startswith(wanted)
            and _GATEWAY_SUFFIX.fullmatch(value[len(wanted):]) is not None)


def _as_text(value):
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def _wait_for_hangup(sock, limit):
    """Block until the peer closes ``sock`` ("client_gone") or ``limit`` s."""
    import socket as _socket
    from gevent.socket import wait_read

    deadline = time.monotonic() + limit
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        try:
            wait_read(sock.fileno(), timeout=remaining)
        except _socket.timeout:
            return "timeout"
        except OSError:
            return "client_gone"
        try:
            data = sock.recv(1, _socket.MSG_PEEK)
        except OSError:
            return "client_gone"
        if not data:
            return "client_gone"
        # The client sent more bytes (pipelining): it is still there and we
        # cannot peek past them, so just sit out the rest of the limit.
        time.sleep(max(deadline - time.monotonic(), 0))
        return "timeout"


def _watch_hangup(sock, seq):
    """While ``seq`` is active, abort it when the client hangs up (vLLM aborts too)."""
    while seq.active:
        if _wait_for_hangup(sock, 60.0) == "client_gone":
            seq.engine.abort(seq)
            return


def make_app(api_key=None, model="fake-model", load=None):
    """Build the fake server's WSGI callable; ``load`` (a LoadConfig or a dict of its
    settings) switches the load model on."""
    return FakeVLLM(api_key=api_key, model=model, load=load)
