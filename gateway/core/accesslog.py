"""One JSON line per request on stdout (Heroku's log drain reads stdout).

No bodies, no query strings (they may carry keys), no secrets: only what the record holds.
Each line is one os.write on file descriptor 1: no logging-module overhead per request, and
lines from several workers sharing the pipe never interleave (one write below PIPE_BUF).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time

from gateway.core.timefmt import iso

_state = {"enabled": True, "fd": 1}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def configure(enabled: bool = True, fd: int = 1) -> None:
    _state["enabled"] = enabled
    _state["fd"] = fd


def write_line(line: dict) -> None:
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    try:
        os.write(_state["fd"], data)
    except OSError:
        pass  # a closed stdout must not fail the request


def request_id_for(environ) -> str:
    """The caller's X-Request-Id when it is a sane token, else a new one."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(16)


def upstream_request_id(request_id: str, chosen_by_caller: bool) -> str:
    """The id vLLM gets. vLLM makes X-Request-Id its engine request id, so two tenants sending
    the same id would collide inside vLLM: a caller's id gets a random suffix (it still starts
    with the caller's id, so logs match); an id the gateway made up is unique already."""
    return f"{request_id}-{secrets.token_hex(6)}" if chosen_by_caller else request_id


class RequestRecord:
    """What one request did; filled in along the way, written when the response closes."""

    __slots__ = ("start", "wall", "request_id", "method", "path", "status", "upstream_status",
                 "ttfb", "bytes_in", "bytes_out", "stream", "caller", "error", "extra", "route", "observer",
                 "upstream_id")

    def __init__(self, method: str, path: str, route: str | None = None, observer=None):
        self.start = time.monotonic()
        self.wall = time.time()
        self.method = method
        self.path = path
        self.request_id = None
        self.upstream_id = None  # the id vLLM saw, when it differs from request_id
        self.status = None
        self.upstream_status = None
        self.ttfb = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.stream = False
        self.caller = None
        self.error = None
        self.extra = None
        self.route = route
        self.observer = observer  # metrics: observe_request(record, duration)

    def as_dict(self, end: float | None = None) -> dict:
        end = time.monotonic() if end is None else end
        line = {
            "time": iso(self.wall, "milliseconds"),
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "duration_ms": round((end - self.start) * 1000, 2),
            "ttfb_ms": round((self.ttfb - self.start) * 1000, 2) if self.ttfb is not None else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "stream": self.stream,
            "caller": self.caller,
            "error": self.error,
            "worker": os.getpid(),
        }
        if self.upstream_id is not None:
            line["upstream_request_id"] = self.upstream_id
        if self.extra:
            line.update(self.extra)
        return line

    def emit(self) -> None:
        end = time.monotonic()
        if _state["enabled"]:
            write_line(self.as_dict(end))
        if self.observer is not None:
            self.observer.observe_request(self, end - self.start)
