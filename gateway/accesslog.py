"""One JSON line per request on stdout (Heroku's log drain reads stdout).

No bodies, no query strings (they may carry keys), no secrets: only what the record holds.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

logger = logging.getLogger("gateway.access")


def configure(enabled: bool = True) -> None:
    """Send access lines to stdout, unformatted, once per process."""
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    if not any(getattr(h, "_gateway_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._gateway_access = True
        logger.addHandler(handler)


class RequestRecord:
    """What one request did; filled in along the way, written when the response closes."""

    __slots__ = ("start", "wall", "request_id", "method", "path", "status", "upstream_status",
                 "ttfb", "bytes_in", "bytes_out", "stream", "caller", "error", "extra")

    def __init__(self, method: str, path: str):
        self.start = time.monotonic()
        self.wall = time.time()
        self.method = method
        self.path = path
        self.request_id = None
        self.status = None
        self.upstream_status = None
        self.ttfb = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.stream = False
        self.caller = None
        self.error = None
        self.extra = None

    def as_dict(self) -> dict:
        end = time.monotonic()
        line = {
            "time": datetime.fromtimestamp(self.wall, timezone.utc).isoformat(timespec="milliseconds"),
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
        if self.extra:
            line.update(self.extra)
        return line

    def emit(self) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info(json.dumps(self.as_dict(), separators=(",", ":")))
