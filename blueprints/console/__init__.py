"""The web console (/ui/): one static HTML shell and its scripts, served by the gateway itself.

The page needs no key to load; it holds no data. Everything it shows comes from the JSON API
(/key/*, /spend/*, /audit/logs, /replicas), called from the browser with
`Authorization: Bearer <key>`, the key kept in the tab's sessionStorage only (never in a URL,
a cookie or a log line). Every response of this blueprint carries a strict
Content-Security-Policy: scripts and styles from this origin only, no inline script or style
attribute, no form submission, no framing. No build step: plain ES modules and a vendored
Chart.js (static/vendor/chartjs/VERSION).
"""
from __future__ import annotations

from flask import Blueprint, Response, render_template

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates",
               static_folder="static", static_url_path="/static")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@bp.get("/")
def console() -> Response:
    """The shell; `/ui` (no slash) is redirected here by the routing rule."""
    response = Response(render_template("console.html"), content_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.after_request
def security_headers(response: Response) -> Response:
    """On the shell and every static file of the console (its 404s included)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if response.mimetype == "application/javascript":
        # One type for module scripts whatever the host's mime.types says (nosniff is strict).
        response.mimetype = "text/javascript"
    return response
