"""The pass-through: authenticate, build the upstream request from the raw one, relay the answer."""
from __future__ import annotations

import time

from werkzeug.wrappers import Response

from gateway import policy
from gateway.forwarding import forward_headers, read_body, vllm_target
from gateway.upstream import RelayBody, read_small_body, response_headers


class RelayResponse(Response):
    """A response that adds no Content-Type of its own: vLLM's headers are the truth."""

    default_mimetype = None
    automatically_set_content_length = False


class PassThrough:
    """Forwards `/vllm/<path>` to vLLM untranslated; one instance per worker."""

    def __init__(self, upstream, authenticator, max_body_bytes: int):
        self.upstream = upstream
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes

    def handle(self, environ, record) -> Response:
        identity = self.authenticator.authenticate(environ)
        record.caller = identity.label
        path, query = vllm_target(environ)
        if not identity.is_master:
            policy.check_route(policy.policy_path(path), identity.key)
        body = read_body(environ, self.max_body_bytes)
        record.bytes_in = len(body)
        if not identity.is_master and identity.key.get("models"):
            fields = policy.body_fields(body, environ.get("CONTENT_TYPE")) if body else None
            policy.check_model(fields, identity.key, bool(body))
        method = environ["REQUEST_METHOD"]
        headers = forward_headers(environ, record.request_id, self.upstream.auth_header)
        target = (self.upstream.base_path + path or "/") + query
        resp = self.upstream.send(method, target, headers, body)
        return self._relay(resp, method, record)

    def _relay(self, resp, method: str, record) -> Response:
        record.upstream_status = resp.status_code
        out_headers = response_headers(resp.raw.headers, record.request_id)
        if method == "HEAD":
            resp.close()
            return RelayResponse(b"", status=resp.status_code, headers=out_headers)
        small = read_small_body(resp)
        if small is not None:
            record.ttfb = time.monotonic()
            record.bytes_out = len(small)
            return RelayResponse([small], status=resp.status_code, headers=out_headers)
        record.stream = True
        return RelayResponse(RelayBody(resp, record), status=resp.status_code, headers=out_headers)
