"""``python -m fakevllm [--host H] [--port P] [--api-key K] [--model M]``

Serves the fake vLLM app with gevent.pywsgi and prints one line,
``fake vLLM listening on http://host:port``, once the socket is bound (with
the real port when ``--port 0`` asked for a free one).  SIGTERM and SIGINT
stop it cleanly with exit status 0.
"""

from gevent import monkey

# Patch before anything else imports socket/threading/time.
monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

from .app import make_app  # noqa: E402
from .server import make_server  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fakevllm", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1,/v2,/inference,/cohere")
    parser.add_argument("--model", default="fake-model", help="the one served model name")
    args = parser.parse_args(argv)

    server = make_server(make_app(api_key=args.api_key, model=args.model), args.host, args.port)
    server.start()
    host, port = server.address[:2]
    print("fake vLLM listening on http://%s:%d" % (host, port), flush=True)

    stop = Event()
    # Signal callbacks run in the hub, which must not block; just wake main.
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    # Give in-flight requests a moment, then kill the rest (hung ones).
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
