"""gunicorn settings for the gateway (Procfile: `gunicorn -c gunicorn.conf.py wsgi:app`).

Imports nothing that opens sockets or SSL: the gevent worker monkey-patches when it boots,
and anything imported here first (requests, ssl, urllib3) would escape the patching.
"""
import glob
import os
import resource
import shutil
import sys
import tempfile

from gateway.core.config import load_settings, redis_url_from, require_keystore
from gateway.core.gunicorn_worker import connection_cap


def _open_files_limit() -> int:
    """The soft open-file limit, raised to the hard one first (many hosts start at 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


bind = f"0.0.0.0:{os.environ.get('PORT', '4000')}"
# gunicorn's gevent worker plus a cap on connections per client address (slow-client attacks).
worker_class = "gateway.core.gunicorn_worker.CappedGeventWorker"
# Connections a worker serves at once. Slow clients each hold one until a deadline (keep-alive
# timeout for heads, REQUEST_BODY_TIMEOUT for bodies), so the default is as many as the
# open-file limit allows: each relayed request holds two descriptors (caller and vLLM), and
# 256 stay free for Redis, logs and files. 10,000 at most (~2 KB of greenlet each when idle).
worker_connections = int(os.environ.get("WORKER_CONNECTIONS")
                         or min(10_000, max((_open_files_limit() - 256) // 2, 64)))
# Without Redis the keystore lives inside one process, so a second worker would not see it.
workers = int(os.environ.get("WEB_CONCURRENCY", "2")) if redis_url_from(os.environ) else 1
# With gevent this is a liveness timeout for a stuck worker, not a request timeout.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# Heroku sends SIGKILL 30 s after SIGTERM: let running streams use almost all of it.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "28"))
# Idle keep-alive connections hold a graceful shutdown open this long, so keep it short.
keepalive = int(os.environ.get("KEEPALIVE", "5"))
# Several masters on one machine would fight over the default control socket path.
control_socket_disable = True
accesslog = None  # the gateway writes its own JSON line per request
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


_METRICS_DIR_CREATED = []


def on_starting(server):
    """Refuse to start with a clear message instead of a worker traceback loop; prepare the
    directory where every worker writes its Prometheus values (so /metrics adds them up)."""
    try:
        require_keystore(load_settings())
        connection_cap(worker_connections)
    except ValueError as exc:  # ConfigError too
        print(f"gateway configuration error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    if not redis_url_from(os.environ):
        print("ALLOW_EPHEMERAL_KEYSTORE=1 and no REDIS_URL: running 1 worker whose keys are lost at restart",
              file=sys.stderr, flush=True)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.remove(stale)  # values of a previous run must not be added to this one
    else:
        directory = tempfile.mkdtemp(prefix="vgw-metrics-")
        _METRICS_DIR_CREATED.append(directory)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # inherited by the workers


def child_exit(server, worker):
    """A dead worker's live gauges (open streams) must stop counting. This is what
    prometheus_client.multiprocess.mark_process_dead does; importing prometheus_client here
    would import ssl in the master before gevent patches the workers."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in glob.glob(os.path.join(directory, f"gauge_live*_{worker.pid}.db")):
            os.remove(path)


def on_exit(server):
    for directory in _METRICS_DIR_CREATED:
        shutil.rmtree(directory, ignore_errors=True)
