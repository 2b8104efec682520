"""Real Redis topologies on loopback, started by tests: a 3-primary + 3-replica Redis Cluster and a
1 master + 1 replica + 3 Sentinel setup (issue 13).

fakeredis cannot fail over and a single node has no slots, so the gateway's behaviour on these
topologies can only be seen on real servers. Each topology lives in a temporary directory, keeps
every server's log there (printed when a test fails) and is stopped whatever happens. Timeouts
are short (down-after 1 s, cluster-node-timeout 1.5 s) so a failover takes seconds, and every
wait polls the state it waits for against a deadline: no fixed sleeps.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

HOST = "127.0.0.1"
SERVICE = "mymaster"
DOWN_AFTER_MS = 1000
CLUSTER_NODE_TIMEOUT_MS = 1500


def _free_ports(count: int) -> list[int]:
    """Ports free right now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def poll(predicate, timeout: float, what: str, interval: float = 0.05):
    """Wait for `predicate()` to return something truthy (and return it); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (redis.exceptions.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(interval)


class RedisProcess:
    """One redis-server (data node or Sentinel) on a loopback port, logging into `directory`."""

    def __init__(self, directory: Path, port: int, *args: str, sentinel: bool = False, conf: str | None = None):
        self.directory = directory
        self.port = port
        self.args = args
        self.sentinel = sentinel
        self.conf = conf
        self.log = directory / f"redis-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server"]
        if self.conf:
            command.append(self.conf)
        command += ["--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
                    "--logfile", str(self.log), "--save", "", "--appendonly", "no",
                    # a replica syncs at once, not after the default 5 s wait for more replicas
                    *(() if self.sentinel else ("--repl-diskless-sync-delay", "0")), *self.args]
        if self.sentinel:
            command.append("--sentinel")
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            poll(lambda: self.client(socket_timeout=0.5).ping(), 10, f"redis-server on port {self.port} answers")
        except BaseException:
            self.stop()
            raise

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(HOST, self.port, decode_responses=True, **kwargs)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no goodbye to replicas or Sentinels)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _cluster_info(node: RedisProcess) -> dict:
    text = node.client(socket_timeout=0.5).execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _cluster_slots(node: RedisProcess) -> list:
    """CLUSTER SLOTS of one node: [start, end, [host, port, id], replicas...] per range."""
    return node.client(socket_timeout=0.5).execute_command("CLUSTER", "SLOTS")


class Topology:
    """What both topologies share: a temp dir, their processes, logs, and stopping everything."""

    def __init__(self, label: str):
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli must be installed (apt-get install redis-server)")
        self.directory = Path(tempfile.mkdtemp(prefix=f"vgw-{label}-"))
        self.processes: list[RedisProcess] = []

    def _start(self, port: int, *args: str, **kwargs) -> RedisProcess:
        process = RedisProcess(self.directory, port, *args, **kwargs)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.address}{' (sentinel)' if p.sentinel else ''}\n{p.log_tail()}"
                         for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ClusterTopology(Topology):
    """3 primaries + 3 replicas made by `redis-cli --cluster create --cluster-replicas 1`."""

    def __init__(self):
        super().__init__("cluster")
        try:
            ports = _free_ports(12)
            self.nodes = [self._start(port, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                                      "--cluster-config-file", f"nodes-{port}.conf",
                                      "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS))
                          for port, bus in zip(ports[:6], ports[6:])]
            subprocess.run(["redis-cli", "--cluster", "create", *[n.address for n in self.nodes],
                            "--cluster-replicas", "1", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """How the gateway names this cluster (every node as a seed)."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def live_nodes(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def _state_ok_everywhere(self) -> bool:
        return all(_cluster_info(n)["cluster_state"] == "ok" for n in self.live_nodes())

    def primaries(self) -> list[RedisProcess]:
        """Live nodes that are primaries with slots, as the cluster itself says."""
        owners = set()
        for node in self.live_nodes():
            owners |= {int(master[1]) for _start, _end, master, *_ in _cluster_slots(node)}
        return [n for n in self.live_nodes() if n.port in owners]

    def _replicas_synced(self) -> bool:
        """Every live replica has its primary's data (a replica that never synced cannot fail over)."""
        infos = [n.client(socket_timeout=0.5).info("replication") for n in self.live_nodes()]
        replicas = [i for i in infos if i["role"] == "slave"]
        return len(replicas) >= 3 - (6 - len(infos)) and all(i["master_link_status"] == "up" for i in replicas)

    def wait_healthy(self, timeout: float = 30) -> None:
        poll(lambda: self._state_ok_everywhere() and len(self.primaries()) == 3 and self._replicas_synced(),
             timeout, "cluster_state:ok on every node, 3 primaries, replicas in sync")

    def primary_for(self, key: str) -> RedisProcess:
        slot = self.live_nodes()[0].client().execute_command("CLUSTER", "KEYSLOT", key)
        for node in self.live_nodes():
            for start, end, master, *_ in _cluster_slots(node):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise LookupError(key)

    def kill_primary(self, node: RedisProcess) -> None:
        node.kill()

    def wait_promoted(self, dead: RedisProcess, timeout: float = 30) -> None:
        """Block until a replica took over `dead`'s slots and every live node says cluster_state:ok."""
        def promoted():
            if not self._state_ok_everywhere():
                return None
            owners = {int(master[1]) for _start, _end, master, *_ in _cluster_slots(self.live_nodes()[0])}
            if dead.port in owners or len(owners) != 3:
                return None
            return True
        poll(promoted, timeout, f"a replica of {dead.address} promoted")


class SentinelTopology(Topology):
    """A master, one replica and 3 Sentinels watching them (quorum 2)."""

    def __init__(self):
        super().__init__("sentinel")
        try:
            master_port, replica_port, *sentinel_ports = _free_ports(5)
            self.master = self._start(master_port)
            self.replica = self._start(replica_port, "--replicaof", HOST, str(master_port))
            self.data_nodes = [self.master, self.replica]
            self.sentinels = [self._sentinel(port, master_port) for port in sentinel_ports]
            self.wait_watching()
        except BaseException:
            self.stop()
            raise

    def _sentinel(self, port: int, master_port: int) -> RedisProcess:
        conf = self.directory / f"sentinel-{port}.conf"  # Sentinel rewrites its config: one file each
        conf.write_text(f"sentinel monitor {SERVICE} {HOST} {master_port} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {SERVICE} 5000\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n")
        return self._start(port, sentinel=True, conf=str(conf))

    @property
    def sentinel_list(self) -> str:
        """REDIS_SENTINELS for this setup."""
        return ",".join(s.address for s in self.sentinels)

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.sentinel_list}/{SERVICE}/0"

    def master_address(self, sentinel: RedisProcess) -> tuple[str, int]:
        host, port = sentinel.client(socket_timeout=0.5).sentinel_get_master_addr_by_name(SERVICE)
        return host, int(port)

    def wait_watching(self, timeout: float = 30) -> None:
        """Every Sentinel knows the master, its replica and the two other Sentinels."""
        def ready():
            for sentinel in self.sentinels:
                state = sentinel.client(socket_timeout=0.5).sentinel_master(SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2 or not state["is_master"]:
                    return False
            return self.replica.client().info("replication")["master_link_status"] == "up"
        poll(ready, timeout, "3 Sentinels watching the master and its replica")

    def current_master(self) -> RedisProcess:
        host, port = self.master_address(self.sentinels[0])
        return next(n for n in self.data_nodes if n.port == port)

    def kill_master(self) -> RedisProcess:
        master = self.current_master()
        master.kill()
        return master

    def wait_promoted(self, old: RedisProcess, timeout: float = 30) -> RedisProcess:
        """Block until every Sentinel names another node as master and that node says it is one."""
        def promoted():
            addresses = {self.master_address(s) for s in self.sentinels if s.proc.poll() is None}
            if len(addresses) != 1 or (HOST, old.port) in addresses:
                return None
            (_host, port), = addresses
            node = next(n for n in self.data_nodes if n.port == port)
            return node if node.client(socket_timeout=0.5).info("replication")["role"] == "master" else None
        return poll(promoted, timeout, f"Sentinel promoted a replica of {old.address}")


# -- fixtures ---------------------------------------------------------------------------------------
def _started(request, factory):
    """Start a topology for a fixture; print its servers' logs if a test using it failed; stop it."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs the redis-server and redis-cli binaries (apt-get install redis-server)")
    topology = factory()
    failed_before = request.session.testsfailed
    try:
        yield topology
    finally:
        if request.session.testsfailed > failed_before:
            sys.stderr.write(f"\n{type(topology).__name__} server logs:\n{topology.logs()}\n")
        topology.stop()


@pytest.fixture(scope="session")
def shared_cluster(request):
    """One cluster for every test that only reads and writes (each under its own key prefix)."""
    yield from _started(request, ClusterTopology)


@pytest.fixture(scope="session")
def shared_sentinel(request):
    """One Sentinel setup for every test that only reads and writes (each under its own key prefix)."""
    yield from _started(request, SentinelTopology)


@pytest.fixture
def own_cluster(request):
    """A cluster of this test's own: for a test that kills a primary."""
    yield from _started(request, ClusterTopology)


@pytest.fixture
def own_sentinel(request):
    """A Sentinel setup of this test's own: for a test that kills the master."""
    yield from _started(request, SentinelTopology)
