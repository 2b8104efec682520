"""Slow clients cannot take a worker's connections from everyone else.

Scaled down so it stays bounded: a worker of 120 connections, an attacker (from 127.0.0.2)
holding 300 half-sent request heads. The full-size figures (2,000 heads, 2,100 trickled
bodies against the default settings) come from `python -m bench.slowclients` (README).
"""
import socket
import time

import pytest
import requests

from tests.conftest import MASTER, gateway_environ

ATTACKER = "127.0.0.2"


def half_sent_heads(port: int, count: int) -> list[socket.socket]:
    """Connections that send part of a request head and then nothing."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.bind((ATTACKER, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        held.append(s)
    return held


def ordinary_latencies(url: str, calls: int) -> list[float]:
    took = []
    for _ in range(calls):
        start = time.monotonic()
        resp = requests.get(url + "/vllm/v1/models", headers=MASTER, timeout=10)
        took.append(time.monotonic() - start)
        assert resp.status_code == 200
    return took


@pytest.fixture
def attacked_gateway(vllm, start_gateway, request):
    gw = start_gateway(gateway_environ(vllm.url, WORKER_CONNECTIONS=120, KEEPALIVE=5,
                                       MAX_CONNECTIONS_PER_CLIENT=request.param))
    held = half_sent_heads(gw.port, 300)
    yield gw, held
    for s in held:
        s.close()


@pytest.mark.parametrize("attacked_gateway", [60], indirect=True)
def test_ordinary_callers_are_served_within_a_second_while_one_address_holds_half_sent_heads(attacked_gateway):
    gw, held = attacked_gateway
    took = ordinary_latencies(gw.url, 20)
    assert max(took) < 1.0, f"slowest ordinary call took {max(took):.2f}s"
    # The attacker kept at most the cap; the rest of its connections were closed at once.
    closed = 0
    for s in held:
        s.settimeout(0.5)
        try:
            closed += s.recv(1) == b""
        except socket.timeout:
            pass
        except OSError:
            closed += 1
    assert closed >= 300 - 60


@pytest.mark.parametrize("attacked_gateway", [0], indirect=True)
def test_without_the_cap_the_same_attack_starves_ordinary_callers(attacked_gateway):
    """The control: this is the attack the cap defends against (so the test above means something)."""
    gw, _ = attacked_gateway
    start = time.monotonic()
    resp = requests.get(gw.url + "/vllm/v1/models", headers=MASTER, timeout=15)
    assert resp.status_code == 200
    assert time.monotonic() - start > 1.0


def test_a_bad_connection_cap_refuses_to_start(vllm, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**gateway_environ(vllm.url, MAX_CONNECTIONS_PER_CLIENT="lots"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
                           "--bind", "127.0.0.1:0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "MAX_CONNECTIONS_PER_CLIENT must be a whole number" in proc.stderr
