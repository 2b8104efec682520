"""`/vllm/<path>`: everything after /vllm goes to the vLLM server as it is."""
from flask import Blueprint, current_app, g, request
from werkzeug.routing import BaseConverter

bp = Blueprint("passthrough", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class RemainderConverter(BaseConverter):
    """Matches '' or '/...' with anything after it, doubled slashes included (werkzeug's
    `path` converter does not, and a separate '/vllm/' rule would be redirected)."""

    regex = "(?:/.*)?"
    part_isolating = False
    weight = 300


@bp.record_once
def _register_converter(state):
    # Runs before the rule below is added to the app's URL map.
    state.app.url_map.converters["remainder"] = RemainderConverter


@bp.route("/vllm<remainder:path>", methods=METHODS, merge_slashes=False, strict_slashes=False,
          provide_automatic_options=False)
def passthrough(path):
    """Relay the request to vLLM; the path is read raw from the environ, not from `path`."""
    return current_app.extensions["gateway.passthrough"].handle(request.environ, g.record)
