"""A redis-server of a test's own (its limits, its replication state, its crash), on loopback."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import redis

from tests.conftest import free_port, wait_until


class OwnRedis:
    def __init__(self, directory, *args: str):
        if shutil.which("redis-server") is None:
            pytest.skip("needs the redis-server binary")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", f"redis-{self.port}.log", *args])
        if not wait_until(self._answers, timeout=10):
            self.stop()
            raise RuntimeError("redis-server did not start")

    def _answers(self) -> bool:
        try:
            with self.client(socket_timeout=1) as client:
                return client.ping()
        except redis.exceptions.ConnectionError:
            return False

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, **kwargs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis_factory(tmp_path):
    """Factory: own_redis_factory(*redis-server args) -> OwnRedis, stopped after the test."""
    servers = []

    def start(*args: str) -> OwnRedis:
        server = OwnRedis(tmp_path, *args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
