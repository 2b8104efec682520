"""``python -m fakevllm [--host H] [--port P] [--api-key K] [--model M] [load options]``

Serves the fake vLLM app with gevent.pywsgi and prints one line,
``fake vLLM listening on http://host:port``, once the socket is bound (with
the real port when ``--port 0`` asked for a free one).  SIGTERM and SIGINT
stop it cleanly with exit status 0.

Load model (off by default: every request is answered at once).  Any of the
options below switches it on; those not given take their defaults.  Chat,
completions (and /invocations), /v1/responses and /v1/messages then behave
like vLLM under load:

* ``--max-running N`` (256): the batch limit; further requests wait in a FIFO
  queue (``vllm:num_requests_waiting``).
* ``--kv-blocks N`` (8192) of ``--block-size`` (16) tokens: the KV cache.  A
  running request holds ceil((prompt + generated) / block size) blocks; when a
  running request needs a block and none is free, the most recently admitted
  one is preempted (blocks freed, back to the front of the queue, recomputes its
  prompt and tokens so far when resumed; ``vllm:num_preemptions_total``).  A
  request that cannot fit even alone is refused with 400.
* ``--prefix-cache-blocks N`` (= kv-blocks; 0: off): an LRU of prompt block
  hashes (the prompt's words, per block); a prompt's cached leading blocks skip
  prefill (``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``,
  in tokens).  ``POST /reset_prefix_cache`` empties it.
* ``--prefill-ms-per-token F`` (0.1): time per uncached prompt token, spent in
  the step that admits the request, before its first token.
* ``--decode-ms-per-token F`` (10) and ``--batch-growth F`` (0.05): a step (one
  token for every running request) takes decode × (1 + growth × (running − 1))
  ms plus the prefill of the requests admitted in it.
* ``--speed F`` (1.0): divides every time; 0.5 = half as fast (times doubled).
* ``--engines K`` (1): data-parallel engines, each with its own batch, queue
  and caches; requests go round-robin; /metrics then (K > 1) labels every series
  ``engine="0".."K-1"`` (a reader sums over engines).

Output length is as without the model (``x-fake-chunks``, default 5, capped by
``max_tokens``).  A stream's headers go out at once; its first event after the
queue wait and prefill, each next token one step later.  A client that hangs up
frees its slot and blocks.  /metrics carries running, waiting,
kv_cache_usage_perc, preemptions and prefix cache series per engine.
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
from .engine import LoadConfig  # noqa: E402
from .server import make_server  # noqa: E402

_D = LoadConfig.DEFAULTS


def _number(kind, low, inclusive=True):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text) from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                "must be %s %s" % (">=" if inclusive else ">", low))
        return value
    return parse


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m fakevllm", description=__doc__.split("\n")[0].replace("``", ""),
        epilog=__doc__[__doc__.index("Load model"):].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1,/v2,/inference,/cohere")
    parser.add_argument("--model", default="fake-model", help="the one served model name")
    load = parser.add_argument_group(
        "load model", "behave like vLLM under load (batch limit, queue, KV cache, prefix "
        "cache, step timing); off unless one of these is given")
    load.add_argument("--max-running", type=_number(int, 1), metavar="N",
                      help="batch limit; more requests wait in a FIFO queue (default %d)"
                      % _D["max_running"])
    load.add_argument("--kv-blocks", type=_number(int, 1), metavar="N",
                      help="KV cache blocks per engine; full cache preempts the latest "
                      "admitted request (default %d)" % _D["kv_blocks"])
    load.add_argument("--block-size", type=_number(int, 1), metavar="N",
                      help="tokens per KV block and per prefix-cache hash (default %d)"
                      % _D["block_size"])
    load.add_argument("--prefix-cache-blocks", type=_number(int, 0), metavar="N",
                      help="prefix cache LRU size in blocks, 0 = off (default: --kv-blocks)")
    load.add_argument("--prefill-ms-per-token", type=_number(float, 0), metavar="MS",
                      help="time per uncached prompt token before the first token "
                      "(default %g)" % _D["prefill_ms_per_token"])
    load.add_argument("--decode-ms-per-token", type=_number(float, 0), metavar="MS",
                      help="time of one decode step with one running request (default %g)"
                      % _D["decode_ms_per_token"])
    load.add_argument("--batch-growth", type=_number(float, 0), metavar="F",
                      help="a step takes decode-ms x (1 + F x (running - 1)) (default %g)"
                      % _D["batch_growth"])
    load.add_argument("--speed", type=_number(float, 0, inclusive=False), metavar="F",
                      help="speed multiplier: every time is divided by F; 0.5 = half as "
                      "fast (default %g)" % _D["speed"])
    load.add_argument("--engines", type=_number(int, 1), metavar="K",
                      help="data-parallel engines (own batch, queue, caches; round-robin); "
                      "/metrics labels series engine=\"0\"..\"K-1\" (default %d)"
                      % _D["engines"])
    return parser


def load_config(args):
    """The LoadConfig the options ask for, or None when no load option was given."""
    settings = {key: getattr(args, key) for key in LoadConfig.DEFAULTS}
    if all(value is None for value in settings.values()):
        return None
    return LoadConfig(**settings)


def main(argv=None):
    args = _parser().parse_args(argv)
    app = make_app(api_key=args.api_key, model=args.model, load=load_config(args))

    server = make_server(app, args.host, args.port)
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
