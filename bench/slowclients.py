"""Slow-client attacks against a one-worker gateway, and what ordinary callers see meanwhile.

    python -m bench.slowclients --attack headers --sockets 2000 --seconds 20
    python -m bench.slowclients --attack bodies --sockets 2100 --seconds 20

`headers`: sockets that send half a request head and stop; each is reopened as soon as the
gateway drops it (the keep-alive timeout is the only header deadline). `bodies`: sockets that
send a whole head with a valid virtual key and then the body one byte every 2 s (bounded by
REQUEST_BODY_TIMEOUT). The attack comes from 127.0.0.2, the ordinary callers from 127.0.0.1
(both loopback; a per-client connection cap tells them apart). Ordinary callers send one
`GET /vllm/v1/models` at a time; the report gives their latency percentiles and failures.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import http_request, raise_nofile_limit, start_fake_vllm, start_gunicorn

MASTER_KEY = "sk-bench-master-key-0123456789abcdef"
UPSTREAM_KEY = "bench-upstream-key-0123456789"
ATTACKER = "127.0.0.2"


class Attack:
    """Keeps `count` slow sockets open against the gateway until `stop` is set."""

    def __init__(self, port: int, count: int, kind: str, key: str):
        self.port, self.count, self.kind, self.key = port, count, kind, key
        self.stop = threading.Event()
        self.opened = 0
        self.dropped = 0
        self.sel = selectors.DefaultSelector()

    def _open(self) -> None:
        s = socket.socket()
        s.bind((ATTACKER, 0))
        s.setblocking(False)
        try:
            s.connect_ex(("127.0.0.1", self.port))
        except OSError:
            s.close()
            return
        if self.kind == "headers":
            first = b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        else:
            first = (b"POST /vllm/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {self.key}\r\nContent-Length: 1000\r\n\r\n{{".encode())
        self.sel.register(s, selectors.EVENT_READ, {"pending": first, "next": time.monotonic()})
        self.opened += 1

    def run(self) -> None:
        for _ in range(self.count):
            self._open()
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/"):  # dropped or answered (408/400): reopen
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self.dropped += 1
                    self._open()
            now = time.monotonic()
            for key in list(self.sel.get_map().values()):
                state = key.data
                if now >= state["next"]:
                    try:
                        key.fileobj.send(state["pending"])
                    except OSError:
                        pass
                    state["pending"] = b" " if self.kind == "bodies" else b""
                    state["next"] = now + 2.0
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


def ordinary_calls(port: int, seconds: float) -> dict:
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            status, _ = http_request(port, "GET", "/vllm/v1/models",
                                     headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=15)
            ok = status == 200
        except OSError:
            ok = False
        latencies.append(time.monotonic() - start)
        failures += not ok
        time.sleep(0.05)
    latencies.sort()
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)  # noqa: E731
    return {"calls": len(latencies), "failed": failures, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "max_ms": round(latencies[-1] * 1000, 1), "mean_ms": round(statistics.mean(latencies) * 1000, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", choices=("headers", "bodies"), default="headers")
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the gateway")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    logdir = Path(tempfile.mkdtemp(prefix="vgw-slowclients-"))
    vllm = start_fake_vllm(logdir, UPSTREAM_KEY)
    env = {**os.environ, "HOSTED_VLLM_API_BASE": vllm.url, "HOSTED_VLLM_API_KEY": UPSTREAM_KEY,
           "LITELLM_MASTER_KEY": MASTER_KEY, "WEB_CONCURRENCY": "1", "ALLOW_EPHEMERAL_KEYSTORE": "1",
           "DISABLE_ACCESS_LOG": "1"}
    env.pop("REDIS_URL", None)
    env.update(dict(item.split("=", 1) for item in args.env))
    gateway = start_gunicorn("gateway", ["-c", "gunicorn.conf.py", "wsgi:app"], env, logdir, "/health/liveness")
    try:
        status, body = http_request(gateway.port, "POST", "/key/generate", b"{}",
                                    {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
        key = json.loads(body)["key"]
        before = ordinary_calls(gateway.port, 3)
        attack = Attack(gateway.port, args.sockets, args.attack, key)
        thread = threading.Thread(target=attack.run, daemon=True)
        thread.start()
        time.sleep(2.0)  # the attack's sockets are open
        during = ordinary_calls(gateway.port, args.seconds)
        attack.stop.set()
        thread.join(10)
        result = {"attack": args.attack, "sockets": args.sockets, "env": args.env, "before": before,
                  "during": during, "attack_sockets_opened": attack.opened, "attack_sockets_dropped": attack.dropped}
        print(json.dumps(result, indent=2))
    finally:
        gateway.stop()
        vllm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
