"""Processes under test: start them on loopback, find their workers, read their CPU and memory.

Everything about a process is read from /proc (Linux): CPU seconds from /proc/<pid>/stat,
resident memory from /proc/<pid>/status.
"""
from __future__ import annotations

import http.client
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile_limit() -> None:
    """Soft open-file limit up to the hard one; runs in each child before exec (and here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppid_and_ticks(pid: int):
    """(ppid, utime + stime ticks) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces or parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    info = _ppid_and_ticks(pid)
    return info[1] / CLK_TCK if info else 0.0


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _ppid_and_ticks(int(name))
            if info and info[0] == pid:
                kids.append(int(name))
    return kids


def find_by_comm(comm: str) -> list[int]:
    """Pids whose command name is `comm` (to report e.g. the shared redis-server's CPU)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == comm:
                        found.append(int(name))
            except OSError:
                pass
    return found


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, irq) CPU seconds of the whole machine, all cores summed (/proc/stat).

    busy is everything but idle and iowait; irq (hard + soft interrupts) is reported apart
    because loopback TCP is largely processed in softirq, which no process is charged for.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, (irq + softirq) / CLK_TCK


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 10.0):
    """One loopback request with http.client; returns (status, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A started server process; `pids()` names the master and its workers for sampling."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, stdout_to_log: bool):
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            # The gateway writes one access line per request: count their cost, keep no copy.
            stdout=self._log if stdout_to_log else subprocess.DEVNULL, stderr=self._log,
            preexec_fn=raise_nofile_limit)
        self.port = None
        self._workers: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def refresh_workers(self) -> list[int]:
        self._workers = children_of(self.proc.pid)
        return self._workers

    def groups(self) -> dict[str, list[int]]:
        """{'<name>': [pid]} for a single process, master/worker split for gunicorn."""
        if not self._workers:
            return {self.name: [self.proc.pid]}
        return {f"{self.name}_master": [self.proc.pid], f"{self.name}_worker": list(self._workers)}

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid) + sum(rss_kb(p) for p in self._workers)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def wait_until(check, what: str, server: Server, timeout: float = 30.0):
    """Poll `check()` (bounded) until it returns a true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{server.name}: {what} not within {timeout}s:\n{server.log_tail()}")


def start_fake_vllm(logdir: Path, api_key: str) -> Server:
    server = Server("fake_vllm", [sys.executable, "-m", "fakevllm", "--host", "127.0.0.1",
                                  "--port", "0", "--api-key", api_key],
                    dict(os.environ), logdir, stdout_to_log=True)

    def port_line():
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", server.log_path.read_text(errors="replace"))
        return m and int(m.group(1))

    server.port = wait_until(port_line, "the 'listening on' line", server)
    return server


def start_gunicorn(name: str, app_argv: list[str], env: dict, logdir: Path, health_path: str,
                   stdout_to_log: bool = False) -> Server:
    """`python -m gunicorn <app_argv> --bind 127.0.0.1:<free port>`, waited for until healthy."""
    port = free_port()
    server = Server(name, [sys.executable, "-m", "gunicorn", *app_argv, "--bind", f"127.0.0.1:{port}"],
                    env, logdir, stdout_to_log)
    server.port = port
    # The socket queues connections before the worker has loaded the app: ask for a 200.
    wait_until(lambda: http_request(port, "GET", health_path, timeout=5)[0] == 200,
               f"GET {health_path} -> 200", server)
    wait_until(server.refresh_workers, "a worker process", server)
    return server
