"""The "null app": the cheapest WSGI app gunicorn's gevent worker can serve.

It bounds what any app can reach on this worker and machine; the gateway's throughput is
reported as a fraction of it. Run by bench.run with bench/gunicorn_null.conf.py.
"""

BODY = b'{"id":"null","object":"chat.completion","choices":[]}'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    """Read the request body (as any real app would), answer a constant JSON object."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        environ["wsgi.input"].read(int(length))
    start_response("200 OK", HEADERS)
    return [BODY]
