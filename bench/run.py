"""Benchmark the gateway against the fake vLLM, a null app and a minimal proxy, in interleaved rounds.

    .venv/bin/python -m bench.run            # full run (~6 min), writes bench/results/latest.{json,md}
    .venv/bin/python -m bench.run --quick    # smoke run (< 1 min), writes bench/results/quick.{json,md}

Every process (load generator, gateway, fake vLLM, null app, minimal proxy, Redis) shares this
machine's cores; each measurement records how many CPU seconds each of them used. See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs, report

SCENARIOS = ("nonstream_c32", "latency_c1", "streams_500", "streams_1000")
CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hello to the benchmark"}]}
STREAM_HEADERS = {"x-fake-chunks": "20", "x-fake-chunk-delay-ms": "20"}
# The gateway reads these; inherited values would point it somewhere else.
GATEWAY_VARS = ("HOSTED_VLLM_API_BASE", "VLLM_API_BASE", "HOSTED_VLLM_API_KEY", "VLLM_API_KEY",
                "LITELLM_MASTER_KEY", "REDIS_URL", "DATABASE_URL", "REDIS_KEY_PREFIX", "PORT")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per non-stream measurement")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each one")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 round, tiny counts, < 60 s")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/latest.json, quick.json with --quick); "
                        "the markdown goes next to it with .md")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VAL",
                   help="extra gateway environment, repeatable (e.g. DISABLE_ACCESS_LOG=1)")
    p.add_argument("--only", action="append", default=[], choices=SCENARIOS,
                   help="run only this scenario (repeatable)")
    p.add_argument("--streams", type=int, default=None, help="override the 500 of streams_500")
    p.add_argument("--many-streams", type=int, default=None, help="override the 1000 of streams_1000")
    args = p.parse_args(argv)
    for item in args.gateway_env:
        if "=" not in item:
            p.error(f"--gateway-env wants KEY=VAL, got {item!r}")
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.3
    args.streams = args.streams or (50 if args.quick else 500)
    args.many_streams = args.many_streams or (100 if args.quick else 1000)
    if args.out is None:
        args.out = procs.ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds and --duration must be positive")
    return args


class Bench:
    """The started processes, the targets built on them, and one measurement at a time."""

    def __init__(self, args, logdir: Path):
        self.args = args
        self.logdir = logdir
        self.servers: list[procs.Server] = []
        self.upstream_key = "fake-upstream-" + secrets.token_hex(8)
        self.master_key = "sk-bench-" + secrets.token_urlsafe(24)
        self.prefix = f"bench-{secrets.token_hex(5)}:"
        self.redis_url = None
        self.virtual_key = None
        self.notes: list[str] = []

    # -- start-up -------------------------------------------------------------------------

    def start_fake_and_gateway(self) -> None:
        self.fake = procs.start_fake_vllm(self.logdir, self.upstream_key)
        self.servers.append(self.fake)
        self.gateway = procs.start_gunicorn(
            "gateway", ["-c", "gunicorn.conf.py", "wsgi:app"], self.gateway_env(), self.logdir,
            "/health/liveliness")
        self.servers.append(self.gateway)

    def start(self) -> None:
        self.start_fake_and_gateway()
        self.null = procs.start_gunicorn(
            "null", ["-c", "bench/gunicorn_null.conf.py", "-k", "gevent", "-w", "1",
                     "--no-control-socket", "bench.nullapp:app"],
            dict(os.environ), self.logdir, "/")
        self.servers.append(self.null)
        self.minimal = procs.start_gunicorn(
            "minimal_proxy", ["-c", "bench/gunicorn_null.conf.py", "-k", "gevent", "-w", "1",
                              "--no-control-socket", "bench.minimalproxy:app"],
            self.minimal_proxy_env(), self.logdir, "/vllm/health")
        self.servers.append(self.minimal)
        self.virtual_key = self.generate_key()
        self.redis_pids = procs.find_by_comm("redis-server") if self.redis_url else []

    def gateway_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARS}
        env.update(HOSTED_VLLM_API_BASE=self.fake.url, HOSTED_VLLM_API_KEY=self.upstream_key,
                   LITELLM_MASTER_KEY=self.master_key, WEB_CONCURRENCY="1")
        url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        if redis_answers(url):
            self.redis_url = url
            env.update(REDIS_URL=url, REDIS_KEY_PREFIX=self.prefix)
        else:
            env["ALLOW_EPHEMERAL_KEYSTORE"] = "1"
            self.notes.append(f"no Redis at {url}: the gateway kept its keys in-process")
        for item in self.args.gateway_env:
            key, _, value = item.partition("=")
            env[key] = value
        env["WEB_CONCURRENCY"] = "1"  # the comparison is one worker against one worker
        return env

    def minimal_proxy_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARS}
        env.update(HOSTED_VLLM_API_BASE=self.fake.url, HOSTED_VLLM_API_KEY=self.upstream_key)
        return env

    def generate_key(self) -> str:
        status, body = procs.http_request(
            self.gateway.port, "POST", "/key/generate", b"{}",
            {"Authorization": f"Bearer {self.master_key}", "Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"/key/generate answered {status}: {body[:300]!r}")
        return json.loads(body)["key"]

    def targets(self) -> dict:
        """name -> (url, headers) for the chat completions route."""
        return {
            "direct": (self.fake.url + CHAT, {"Authorization": f"Bearer {self.upstream_key}"}),
            "gateway_master": (self.gateway.url + "/vllm" + CHAT, {"Authorization": f"Bearer {self.master_key}"}),
            "gateway_virtual": (self.gateway.url + "/vllm" + CHAT, {"Authorization": f"Bearer {self.virtual_key}"}),
            "null": (self.null.url + CHAT, {}),
            # The same request as gateway_master's; the minimal proxy replaces the key with its own.
            "minimal_proxy": (self.minimal.url + "/vllm" + CHAT, {"Authorization": f"Bearer {self.master_key}"}),
        }

    def preflight(self) -> None:
        """One request per target, so a misconfiguration fails here and not as 100% errors."""
        for name, (url, headers) in self.targets().items():
            port = int(url.split(":")[2].split("/")[0])
            path = "/" + url.split("/", 3)[3]
            status, body = procs.http_request(port, "POST", path, json.dumps(CHAT_BODY).encode(),
                                              {**headers, "Content-Type": "application/json"})
            if not 200 <= status < 300:
                raise RuntimeError(f"preflight {name}: HTTP {status}: {body[:300]!r}")

    # -- measuring -----------------------------------------------------------------------

    def process_groups(self) -> dict[str, list[int]]:
        groups = {}
        for server in self.servers:
            server.refresh_workers()
            groups.update(server.groups())
        if self.redis_pids:
            groups["redis_server"] = self.redis_pids
        return groups

    def measure(self, mode: str, target: str, **opts) -> dict:
        """Run the load generator once (its own process) and sample everything around it."""
        url, headers = self.targets()[target]
        body = dict(CHAT_BODY)
        argv = [sys.executable, "-m", "bench.loadgen", mode, "--url", url]
        if mode == "streams":
            body["stream"] = True
            headers = {**headers, **STREAM_HEADERS}
            argv += ["--streams", str(opts["streams"]), "--timeout", "90"]
            limit = 150
        else:
            argv += ["--concurrency", str(opts["concurrency"]), "--duration", str(self.args.duration),
                     "--warmup", str(self.args.warmup), "--timeout", "30"]
            limit = self.args.warmup + self.args.duration + 60
        argv += ["--body", json.dumps(body)]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]

        for server in self.servers:
            server.check_alive()
        groups = self.process_groups()
        cpu0 = {name: sum(procs.cpu_seconds(p) for p in pids) for name, pids in groups.items()}
        (busy0, irq0), kids0, self0 = procs.machine_busy_seconds(), _rusage(resource.RUSAGE_CHILDREN), _rusage(resource.RUSAGE_SELF)
        rss_max = {s.name: s.rss_kb() for s in self.servers}
        t0 = time.monotonic()
        lg = subprocess.Popen(argv, cwd=procs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=procs.raise_nofile_limit)
        deadline = t0 + limit
        while True:  # sample memory while the load runs
            try:
                lg.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    lg.kill()
                    lg.wait(5)
                    raise RuntimeError(f"loadgen {mode} {target} ran past {limit}s")
            for s in self.servers:
                rss_max[s.name] = max(rss_max[s.name], s.rss_kb())
        wall = time.monotonic() - t0
        out, err = lg.stdout.read(), lg.stderr.read()
        lg.stdout.close()
        lg.stderr.close()
        if lg.returncode != 0:
            raise RuntimeError(f"loadgen {mode} {target} exited {lg.returncode}: {err.decode()[-2000:]}")
        result = json.loads(out)
        cpu = {name: round(sum(procs.cpu_seconds(p) for p in pids) - cpu0[name], 3)
               for name, pids in groups.items()}
        cpu["loadgen"] = round(_rusage(resource.RUSAGE_CHILDREN) - kids0, 3)
        cpu["bench_run"] = round(_rusage(resource.RUSAGE_SELF) - self0, 3)
        busy1, irq1 = procs.machine_busy_seconds()
        busy, irq = busy1 - busy0, irq1 - irq0
        result.update(target=target, wall_s=round(wall, 3), cpu_s=cpu,
                      machine_busy_cores=round(busy / wall, 2), irq_cpu_s=round(irq, 2),
                      others_cpu_s=round(max(0.0, busy - irq - sum(cpu.values())), 2),
                      rss_max_kb=rss_max)
        time.sleep(0.3 if self.args.quick else 1.0)  # let closing connections settle
        return result

    # -- scenarios -------------------------------------------------------------------------

    def run_round(self, scenario: str) -> dict:
        """One round of one scenario: every target once, direct and gateway alternating."""
        a = self.args
        if scenario == "nonstream_c32":
            order = ("direct", "gateway_master", "null", "gateway_virtual", "minimal_proxy")
            return {t: self.measure("rps", t, concurrency=32) for t in order}
        if scenario == "latency_c1":
            order = ("direct", "gateway_master", "minimal_proxy")
            return {t: self.measure("rps", t, concurrency=1) for t in order}
        if scenario == "streams_500":
            order = ("direct", "gateway_master", "minimal_proxy")
            return {t: self.measure("streams", t, streams=a.streams) for t in order}
        if scenario == "streams_1000":
            return {"gateway_master": self.measure("streams", "gateway_master", streams=a.many_streams)}
        raise ValueError(scenario)

    @contextlib.contextmanager
    def running(self):
        """Start everything, stop it afterwards; on failure show each server's log tail."""
        try:
            self.start()
            yield self
        except BaseException:
            for server in self.servers:
                print(f"--- {server.name} log tail ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            self.stop()

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        if self.redis_url:
            purge_redis(self.redis_url, self.prefix)


def _rusage(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def redis_answers(url: str) -> bool:
    import redis
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except Exception:  # any failure means: run without Redis, and say so
        return False


def purge_redis(url: str, prefix: str) -> None:
    import redis
    client = redis.Redis.from_url(url, socket_timeout=2)
    for name in client.scan_iter(match=prefix + "*", count=500):
        client.delete(name)


def machine_info() -> dict:
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "mem_total_mb": mem_kb // 1024,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    procs.raise_nofile_limit()
    scenarios = [s for s in SCENARIOS if not args.only or s in args.only]
    started = time.monotonic()
    rounds: dict[str, list] = {s: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        bench = Bench(args, Path(tmp))
        with bench.running():
            bench.preflight()
            processes = {"pids": bench.process_groups(),
                         "commands": {s.name: " ".join(s.argv[1:]).replace(bench.upstream_key, "***")
                                      for s in bench.servers}}
            idle_rss = {s.name: s.rss_kb() for s in bench.servers}
            for i in range(args.rounds):
                for scenario in scenarios:
                    print(f"round {i + 1}/{args.rounds}: {scenario}", file=sys.stderr, flush=True)
                    rounds[scenario].append(bench.run_round(scenario))
    results = {
        "machine": machine_info(),
        "config": {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                   "quick": args.quick, "streams": args.streams, "many_streams": args.many_streams,
                   "stream_headers": STREAM_HEADERS, "gateway_env": args.gateway_env,
                   "redis": bench.redis_url, "scenarios": scenarios},
        "processes": processes, "idle_rss_kb": idle_rss, "notes": bench.notes,
        "elapsed_s": round(time.monotonic() - started, 1),
        "scenarios": {s: {"rounds": rounds[s], "summary": report.summarise(s, rounds[s])} for s in scenarios},
    }
    report.write_results(args.out, results, report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
