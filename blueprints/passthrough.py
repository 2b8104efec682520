"""`/vllm/<path>`: everything after /vllm goes to vLLM as it is, and its answer comes back.

A route like any other: the app's hooks give it the request record, the X-Request-Id and the
error envelope. The view hands the WSGI environ to the relay (gateway/relay/exchange.py), which
reads the raw target and body bytes from it, and streams vLLM's answer back as a generator.
"""
from flask import Blueprint, Response, g, request
from werkzeug.routing import PathConverter

from blueprints import services
from gateway.relay.target import PREFIX

bp = Blueprint("passthrough", __name__)


class RestOfPath(PathConverter):
    """Nothing, or '/' and anything: `/vllm`, `/vllm/` and `/vllm//sleep`, which `path` does not
    match, also reach the relay (and its route policy) rather than a 404 or a redirect."""

    regex = "(?:/.*)?"
    part_isolating = False  # spans segments (werkzeug would infer True from this regex)


@bp.record_once
def _register_converter(state):
    # Before the rules below are added (deferred functions run in the order recorded).
    state.app.url_map.converters["rest_of_path"] = RestOfPath

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# `//sleep` must reach the route policy as it is, not be redirected; OPTIONS goes to vLLM.
_RULE_OPTIONS = {"methods": METHODS, "provide_automatic_options": False, "merge_slashes": False}


class RelayedResponse(Response):
    """vLLM's status and headers as they are: no default Content-Type, no computed length."""

    default_mimetype = None
    automatically_set_content_length = False


@bp.route(PREFIX + "/<path:path>", **_RULE_OPTIONS)
@bp.route(PREFIX + "<rest_of_path:path>", **_RULE_OPTIONS)
def relay(path):
    """Relay one request to vLLM (`path` is matched; the raw bytes come from the environ)."""
    relayed = services().passthrough.relay(request.environ, g.record)
    # Not direct_passthrough: werkzeug would then skip the close callbacks.
    response = RelayedResponse(relayed.body, status=relayed.status_line, headers=relayed.headers)
    response.call_on_close(relayed.close)
    return response
