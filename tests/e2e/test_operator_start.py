"""What an operator sees at start (issue 12, points 14 and 16): the Procfile command refuses to
run without Redis unless told to, a bad REDIS_URL is one line, and scripts/start reports failure."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import requests

from tests.conftest import MASTER_KEY, ROOT, OutputWatcher, free_port, gateway_environ

BASE_ENV = {k: v for k, v in os.environ.items() if k not in (
    "HOSTED_VLLM_API_BASE", "VLLM_API_BASE", "HOSTED_VLLM_API_KEY", "VLLM_API_KEY", "LITELLM_MASTER_KEY",
    "REDIS_URL", "DATABASE_URL", "ALLOW_EPHEMERAL_KEYSTORE", "FAKE_VLLM_PORT", "PORT", "WEB_CONCURRENCY")}


def procfile_gunicorn(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                           "--bind", f"127.0.0.1:{free_port()}"], cwd=ROOT, env={**BASE_ENV, **env},
                          capture_output=True, text=True, timeout=60)


def config_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gateway configuration error")]


def test_procfile_path_refuses_to_run_without_redis_unless_opted_in():
    env = {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": MASTER_KEY}
    proc = procfile_gunicorn(env)
    assert proc.returncode != 0
    [line] = config_errors(proc.stderr)
    assert "REDIS_URL is not set" in line and "ALLOW_EPHEMERAL_KEYSTORE=1" in line
    assert "Traceback" not in proc.stderr and "Booting worker" not in proc.stderr


def test_a_bad_redis_url_is_one_line_naming_the_variable():
    for url in ("localhost:6379", "redis://127.0.0.1:6379/zero"):
        env = {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": MASTER_KEY, "REDIS_URL": url}
        proc = procfile_gunicorn(env)
        assert proc.returncode != 0
        [line] = config_errors(proc.stderr)
        assert "REDIS_URL" in line and "Traceback" not in proc.stderr


def run_start(env: dict, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["scripts/start"], cwd=ROOT, env={**BASE_ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_start_script_exits_non_zero_when_the_gateway_fails():
    proc = run_start({"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": MASTER_KEY,
                      "REDIS_URL": "localhost:6379", "PORT": str(free_port())})
    assert proc.returncode != 0
    assert "REDIS_URL must start with redis://" in proc.stderr


def test_start_script_refuses_a_busy_fake_vllm_port():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = run_start({"FAKE_VLLM_PORT": str(port), "LITELLM_MASTER_KEY": MASTER_KEY, "PORT": str(free_port())})
    assert proc.returncode != 0
    assert f"could not listen on 127.0.0.1:{port}" in proc.stderr
    assert "Listening at" not in proc.stderr  # the gateway never started in front of the squatter


def test_start_script_runs_an_ephemeral_gateway_and_says_so(vllm):
    port = free_port()
    env = {**BASE_ENV, **gateway_environ(vllm.url), "PORT": str(port)}
    del env["ALLOW_EPHEMERAL_KEYSTORE"]  # the script sets it itself
    proc = subprocess.Popen(["scripts/start"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = OutputWatcher(proc.stdout), OutputWatcher(proc.stderr)
        try:
            out.wait_for(r"REDIS_URL not set: keys live in the gateway's memory .*ALLOW_EPHEMERAL_KEYSTORE=1")
            err.wait_for(r"Listening at")
        except (RuntimeError, TimeoutError):
            err.wait_eof(5)
            pytest.fail(f"scripts/start did not start the gateway:\n{out.text()}\n{err.text()}")
        ready = requests.get(f"http://127.0.0.1:{port}/health/readiness", timeout=30).json()
        assert ready["dependencies"]["keystore"] == {"status": "up", "ephemeral": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # the script and everything it started (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
