"""Shared fixtures: a real fake-vLLM server on loopback, the Flask app, real gunicorn gateways."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from app import create_app
from tests.redis_topologies import own_cluster, own_sentinel, shared_cluster, shared_sentinel  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-test-master-0123456789abcdef"
UPSTREAM_KEY = "vllm-upstream-secret-key-42"


class OutputWatcher:
    """Drains a child's pipe into a list of lines and lets a test wait for a line."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe):
        for line in iter(pipe.readline, ""):
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # EOF marker
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0):
        """Block until a line matches `pattern` (regex); return the match."""
        regex = re.compile(pattern)
        seen = start

        def found():
            nonlocal seen
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                if line is None:
                    raise RuntimeError("process output ended before " + pattern + ":\n" + self.text())
                m = regex.search(line)
                if m:
                    return m
            return None

        with self._cond:
            match = self._cond.wait_for(found, timeout)
        if not match:
            raise TimeoutError(f"no line matching {pattern!r} within {timeout}s:\n{self.text()}")
        return match

    def wait_eof(self, timeout: float = 20.0) -> None:
        """Block until the process closed its end of the pipe and every line was read."""
        with self._cond:
            self._cond.wait_for(lambda: self.lines and self.lines[-1] is None, timeout)

    def text(self) -> str:
        return "\n".join(line for line in self.lines if line is not None)

    def json_lines(self) -> list[dict]:
        out = []
        for line in self.lines:
            if line and line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


class FakeVLLM:
    """Handle on a `python -m fakevllm` subprocess and its introspection endpoints."""

    def __init__(self, extra_args=()):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fakevllm", "--host", "127.0.0.1", "--port", "0", *extra_args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = OutputWatcher(self.proc.stdout)
        self.url = self.out.wait_for(r"listening on (http://\S+)").group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.http = requests.Session()

    def requests(self) -> list[dict]:
        return self.http.get(self.url + "/_fake/requests", timeout=5).json()["requests"]

    def last(self) -> dict:
        recorded = self.requests()
        assert recorded, "the fake vLLM received no request"
        return recorded[-1]

    def clear(self):
        self.http.delete(self.url + "/_fake/requests", timeout=5)

    def wait_event(self, type_: str, request_id: str, timeout: float = 5.0):
        resp = self.http.get(self.url + "/_fake/wait", timeout=timeout + 5,
                             params={"type": type_, "request_id": request_id, "timeout": timeout})
        return resp.status_code, resp.json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_until(predicate, timeout=5.0):
    """Poll a condition that has no event to await (key expiry, batched accounting, a lease
    running out); True as soon as it holds, False if it never did within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def sent_for(upstream_id: str | None, caller_id: str) -> bool:
    """True when vLLM's request id is the one the gateway derived from the caller's X-Request-Id
    (the caller's id plus "-" and 12 hex digits, unique per request)."""
    return upstream_id is not None and re.fullmatch(re.escape(caller_id) + r"-[0-9a-f]{12}", upstream_id) is not None


def header(recorded: dict, name: str):
    """All values of header `name` in a recorded request (case-insensitive)."""
    return [v for k, v in recorded["headers"] if k.lower() == name.lower()]


@pytest.fixture(scope="session")
def fake_vllm_server():
    server = FakeVLLM(["--api-key", UPSTREAM_KEY])
    yield server
    server.stop()


@pytest.fixture
def vllm(fake_vllm_server) -> FakeVLLM:
    """The shared fake vLLM, with its records cleared for this test."""
    fake_vllm_server.clear()
    return fake_vllm_server


def gateway_environ(vllm_url: str, **extra) -> dict:
    env = {
        "HOSTED_VLLM_API_BASE": vllm_url,
        "HOSTED_VLLM_API_KEY": UPSTREAM_KEY,
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "ALLOW_EPHEMERAL_KEYSTORE": "1",  # tests without REDIS_URL use the in-process store
        # No background /metrics reads on the shared fake (tests count what reached it);
        # reconciliation's own tests turn it on.
        "RECONCILE": "0",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class BufferedClient(FlaskClient):
    """Reads each response whole and closes it, as a WSGI server would, so close callbacks
    (accounting, the access log) have run when a call returns."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def build_app(config):
    app = create_app(config)
    app.test_client_class = BufferedClient
    return app


@pytest.fixture
def app(vllm):
    return build_app({"environ": gateway_environ(vllm.url)})


@pytest.fixture
def client(app):
    return app.test_client()


MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}
# 0.001 per prompt token, 0.002 per completion token: easy sums in assertions.
TEST_PRICES = json.dumps({"fake-model": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}})


STREAM_BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}],
                          "stream": True}).encode()


def open_raw_stream(port: int, request_id: str, key: str = MASTER_KEY, chunks: int = 2000,
                    delay_ms: int = 50, events: int = 1):
    """Start a slow SSE chat stream on a raw socket (so the test decides exactly when the
    client leaves); returns (socket, bytes received) once `events` events have arrived."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
              + f"Authorization: Bearer {key}\r\nX-Request-Id: {request_id}\r\n".encode()
              + f"x-fake-chunk-delay-ms: {delay_ms}\r\nx-fake-chunks: {chunks}\r\n".encode()
              + b"Content-Type: application/json\r\n"
              + f"Content-Length: {len(STREAM_BODY)}\r\n\r\n".encode() + STREAM_BODY)
    received = b""
    while received.count(b"data: ") < events:
        data = s.recv(65536)
        if not data:
            break
        received += data
    return s, received


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayServer:
    """A real `gunicorn -c gunicorn.conf.py wsgi:app` on loopback (the Procfile's command)."""

    def __init__(self, env: dict, workers: int = 1, args=()):
        self.port = free_port()
        full_env = {k: v for k, v in os.environ.items() if k not in (
            "HOSTED_VLLM_API_BASE", "VLLM_API_BASE", "HOSTED_VLLM_API_KEY", "VLLM_API_KEY",
            "LITELLM_MASTER_KEY", "REDIS_URL", "DATABASE_URL")}
        full_env.update(env)
        full_env["WEB_CONCURRENCY"] = str(workers)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
             "--bind", f"127.0.0.1:{self.port}", *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout = OutputWatcher(self.proc.stdout)
        self.stderr = OutputWatcher(self.proc.stderr)
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr.wait_for(r"Listening at")
        # The listening socket queues connections until a worker has loaded the app.
        requests.get(self.url + "/health/liveliness", timeout=30).raise_for_status()

    def worker_pids_seen(self) -> set[int]:
        """Worker pids gunicorn reported booting."""
        return {int(m) for m in re.findall(r"Booting worker with pid: (\d+)", self.stderr.text())}

    def access_lines(self) -> list[dict]:
        return [line for line in self.stdout.json_lines() if "request_id" in line]

    def stop(self, sig=signal.SIGQUIT):
        """SIGQUIT: gunicorn's quick shutdown (tests of graceful SIGTERM pass it explicitly)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_gateway():
    """Factory: start real gunicorn gateways; all are stopped after the test."""
    servers = []

    def start(env: dict, workers: int = 1, args=()):
        server = GatewayServer(env, workers, args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def shared_gateway(fake_vllm_server):
    server = GatewayServer(gateway_environ(fake_vllm_server.url))
    yield server
    server.stop()


@pytest.fixture
def gateway(vllm, shared_gateway) -> GatewayServer:
    """A real gunicorn gateway in front of the fake vLLM (shared; tests tell lines apart by request id)."""
    return shared_gateway


# -- Redis: every keystore test runs on fakeredis, the real server (when one answers), and on a
# real Redis Cluster and Sentinel setup started for the session (tests/redis_topologies.py) -----

REAL_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_TOPOLOGIES = ["fakeredis", "redis", "cluster", "sentinel"]


def real_redis_available() -> bool:
    import redis
    try:
        redis.Redis.from_url(REAL_REDIS_URL, socket_timeout=1).ping()
        return True
    except Exception:
        return False


def _purge(client, prefix):
    """Delete every key under `prefix`; on a cluster scan_iter walks every primary, and keys are
    deleted one by one (one DEL may not span slots)."""
    for name in client.scan_iter(match=prefix + "*", count=500):
        client.delete(name)


def topology_environ(topology) -> dict:
    """The settings a gateway in front of a started topology is given (as an operator would)."""
    if type(topology).__name__ == "SentinelTopology":
        from tests.redis_topologies import SERVICE
        return {"REDIS_SENTINELS": topology.sentinel_list, "REDIS_SENTINEL_SERVICE": SERVICE}
    return {"REDIS_URL": topology.url}


def gateway_redis(topology, **settings):
    """The client the gateway itself builds (make_redis from Settings) for a started topology."""
    from gateway.core import redisconn
    from gateway.core.config import load_settings

    budget = redisconn.incidents.budget  # make_redis sets this process-wide; tests keep it as it was
    try:
        env = gateway_environ("http://127.0.0.1:9", **topology_environ(topology), **settings)
        return redisconn.make_redis(load_settings(env))
    finally:
        redisconn.incidents.budget = budget


@pytest.fixture(params=REDIS_TOPOLOGIES)
def redis_client(request):
    """A Redis client (decode_responses) and a unique key prefix, cleaned up afterwards: fakeredis,
    the real server, and the gateway's own clients for a Redis Cluster and a Sentinel setup."""
    import uuid

    import fakeredis
    import redis

    if request.param == "redis":
        if not real_redis_available():
            pytest.skip(f"no Redis at {REAL_REDIS_URL}")
        client = redis.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    elif request.param in ("cluster", "sentinel"):
        client = gateway_redis(request.getfixturevalue(f"shared_{request.param}"))
    else:
        client = fakeredis.FakeRedis(decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    client.test_prefix = prefix
    yield client
    _purge(client, prefix)
    client.close()


@pytest.fixture
def kapp(vllm, redis_client):
    """The app with a keystore on `redis_client`."""
    env = gateway_environ(vllm.url, REDIS_KEY_PREFIX=redis_client.test_prefix, MODEL_PRICES=TEST_PRICES)
    return build_app({"environ": env, "redis": redis_client})


@pytest.fixture
def kclient(kapp):
    return kapp.test_client()


@contextlib.contextmanager
def real_redis_namespace(label: str = "test"):
    """(client, prefix): the real Redis and a unique key prefix, whose keys are removed after."""
    import uuid

    import redis
    client = redis.Redis.from_url(REAL_REDIS_URL, decode_responses=True)
    prefix = f"{label}-{uuid.uuid4().hex[:10]}:"
    try:
        yield client, prefix
    finally:
        _purge(client, prefix)


@pytest.fixture
def real_redis_prefix():
    """A unique prefix on the real Redis, for tests of several gateway processes sharing it."""
    if not real_redis_available():
        pytest.skip(f"no Redis at {REAL_REDIS_URL}")
    with real_redis_namespace() as namespace:
        yield namespace
