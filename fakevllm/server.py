"""gevent.pywsgi glue: a handler that exposes the raw request to the app.

pywsgi only offers the *decoded* PATH_INFO and CGI-mangled headers (names
upper-cased, and headers containing ``_`` silently dropped).  Recording must
show what a gateway really sent, so the handler adds:

* ``RAW_URI``: the request target exactly as on the wire (same key gunicorn uses);
* ``fake.raw_headers``: ``[(name, value), ...]`` in the received order and case;
* ``fake.socket``: the client socket, so x-fake-hang can notice a hang-up.

Import this only after ``gevent.monkey.patch_all()``.
"""

import socket

from gevent.pywsgi import WSGIHandler, WSGIServer

__all__ = ["FakeHandler", "make_server"]


class FakeHandler(WSGIHandler):
    def __init__(self, sock, address, server, rfile=None):
        # pywsgi writes the header block and the body with separate send()
        # calls; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms per response).  Streams want each event out at once, too.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP (e.g. a Unix socket)
        super().__init__(sock, address, server, rfile)

    def get_environ(self):
        env = super().get_environ()
        env["RAW_URI"] = self.path
        env["fake.raw_headers"] = self.headers.items()
        env["fake.socket"] = self.socket
        return env


def make_server(app, host="127.0.0.1", port=8000):
    """A keep-alive HTTP/1.1 pywsgi server with request logging off (speed)."""
    return WSGIServer(
        (host, port), app, log=None, handler_class=FakeHandler, backlog=2048,
        # A preset SERVER_NAME spares pywsgi a reverse-DNS lookup at start.
        environ={"SERVER_NAME": host},
    )
