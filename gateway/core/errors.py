"""The one error envelope for everything the gateway itself answers.

OpenAI SDKs read `error.message`; LiteLLM users' scripts read `error.type`.
vLLM's own errors are relayed untouched and never pass through here.
"""
from __future__ import annotations

import json

_TYPES_BY_STATUS = {
    400: "bad_request_error",
    401: "auth_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class GatewayError(Exception):
    """Raised anywhere in the gateway; rendered as the JSON envelope with `status`."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 param: str | None = None, headers: dict | None = None,
                 kind: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _TYPES_BY_STATUS.get(status, "internal_error")
        self.param = param
        self.headers = headers or {}
        self.kind = kind            # for upstream failures: what went wrong, for metrics
        self.retryable = retryable  # True only when nothing of the request reached vLLM

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.type, self.param)


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None) -> bytes:
    """Serialise the envelope `{"error": {message, type, param, code}}`."""
    payload = {"error": {
        "message": message,
        "type": type_ or _TYPES_BY_STATUS.get(status, "internal_error"),
        "param": param,
        "code": str(status),
    }}
    return json.dumps(payload).encode()
