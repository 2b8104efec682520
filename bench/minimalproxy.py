"""The "minimal proxy": what a user would write on the gateway's own stack (Flask + requests).

No keys, limits, usage or logs: forward /vllm/<path> to vLLM with the upstream key and relay the
answer as it arrives. It is the floor the gateway is measured against (bench.run target
`minimal_proxy`), run like the null app: gunicorn -c bench/gunicorn_null.conf.py -k gevent -w 1.
"""
import os

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ["HOSTED_VLLM_API_BASE"].rstrip("/")
AUTH = {"Authorization": f"Bearer {os.environ['HOSTED_VLLM_API_KEY']}"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

app = Flask(__name__)
_session = None


def session() -> requests.Session:
    """One pooled session per worker, built on first use (after gunicorn forked and gevent patched)."""
    global _session
    if _session is None:
        _session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=1000)  # one connection per open stream
        _session.mount("http://", adapter)
        _session.mount("https://", adapter)
    return _session


@app.route("/vllm/<path:path>", methods=METHODS)
def proxy(path):
    headers = {k: v for k, v in request.headers if k.lower() not in HOP_BY_HOP | {"host", "authorization"}}
    resp = session().request(request.method, f"{UPSTREAM}/{path}", params=request.query_string,
                             headers={**headers, **AUTH}, data=request.get_data(), stream=True,
                             timeout=(5, 600), allow_redirects=False)

    def body():
        try:
            yield from resp.raw.stream(65536, decode_content=False)
        finally:
            resp.close()

    out_headers = [(k, v) for k, v in resp.raw.headers.items() if k.lower() not in HOP_BY_HOP]
    return Response(body(), status=resp.status_code, headers=out_headers)
