"""`/vllm/<path>`: everything after /vllm goes to the vLLM server as it is."""
from flask import Blueprint, current_app, g, request
from werkzeug.routing import BaseConverter

bp = Blueprint("passthrough", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class RemainderConverter(BaseConverter):
    """Matches anything, leading and doubled slashes included (werkzeug's `path` does not)."""

    regex = ".*"
    part_isolating = False
    weight = 300


@bp.record_once
def _register_converter(state):
    # Runs before the rules below are added to the app's URL map.
    state.app.url_map.converters["remainder"] = RemainderConverter


# merge_slashes=False: '//' in the remainder is the caller's business, not a redirect of ours.
@bp.route("/vllm", defaults={"path": ""}, methods=METHODS, merge_slashes=False,
          provide_automatic_options=False)
@bp.route("/vllm/<remainder:path>", methods=METHODS, merge_slashes=False,
          provide_automatic_options=False)
def passthrough(path):
    """Relay the request to vLLM; the path is read raw from the environ, not from `path`."""
    return current_app.extensions["gateway.passthrough"].handle(request.environ, g.record)
