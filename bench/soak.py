"""Soak the gateway: the same load, round after round, watching one worker for anything that grows.

    .venv/bin/python -m bench.soak            # 5 rounds of 10,000 requests + 1,000 streams (~2-3 min)
    .venv/bin/python -m bench.soak --quick    # smoke run (< 30 s), writes bench/results/soak-quick.{json,md}

One fake vLLM and ONE gateway worker (WEB_CONCURRENCY=1) with every feature on: Redis keystore,
access log, usage tracking with prices and a budget, and a virtual key whose rpm/tpm/parallel
limits are far too high to trigger. After a warm-up and after every round it records the
worker's VmRSS, its open file descriptors and its Redis connections (CLIENT LIST entries named
vgw-worker-<pid>). Processes, the load generator and Redis clean-up are bench.run's/bench.procs'.
See bench/README.md, section "Soak".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench import procs
from bench.report import write_results
from bench.run import CHAT, CHAT_BODY, STREAM_HEADERS, Bench, machine_info

BIG = 10**9
# Limits set, so each request goes through the limiter, but never reached.
KEY_LIMITS = {"rpm_limit": BIG, "tpm_limit": BIG, "max_parallel_requests": 10**6,
              "max_budget": float(BIG), "budget_duration": "30d", "key_alias": "soak"}
# Prices make usage tracking compute a spend for every request.
MODEL_PRICES = json.dumps({"fake-model": {"input_cost_per_million": 0.5, "output_cost_per_million": 1.5}})
# Any of these inherited would switch a feature off or change what is measured.
FEATURE_OFF_VARS = ("DISABLE_ACCESS_LOG", "KEY_CACHE_TTL", "MODEL_PRICES", "MODEL_PRICES_FILE",
                    "REDIS_POOL_SIZE", "UPSTREAM_POOL_SIZE", "SPEND_LOG_MAX_ENTRIES")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 2 with --quick)")
    p.add_argument("--requests", type=int, default=None,
                   help="non-stream requests per round, concurrency 32 (default 10000; 500 with --quick)")
    p.add_argument("--streams", type=int, default=None,
                   help="concurrent SSE streams per round (default 1000; 100 with --quick)")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="non-stream requests before the first sample (default 500; 100 with --quick); "
                        "a tenth as many streams follow them")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to wait after a round before sampling (default 3; 1 with --quick)")
    p.add_argument("--rss-threshold-mb", type=float, default=10.0,
                   help="RSS growth from round 2 to the last round above this fails the verdict")
    p.add_argument("--fd-tolerance", type=int, default=10,
                   help="open fds may differ by this much between round 1 and the last round")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny counts, < 30 s")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/soak.json, soak-quick.json with --quick); "
                        "the markdown goes next to it with .md")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VAL",
                   help="extra gateway environment, repeatable")
    args = p.parse_args(argv)
    for item in args.gateway_env:
        if "=" not in item:
            p.error(f"--gateway-env wants KEY=VAL, got {item!r}")
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.requests = args.requests or (500 if q else 10_000)
    args.streams = args.streams or (100 if q else 1000)
    args.warmup_requests = args.warmup_requests if args.warmup_requests is not None else (100 if q else 500)
    args.settle = args.settle if args.settle is not None else (1.0 if q else 3.0)
    args.out = args.out or procs.ROOT / "bench" / "results" / ("soak-quick.json" if q else "soak.json")
    if min(args.rounds, args.requests, args.streams, args.concurrency) < 1:
        p.error("--rounds, --requests, --streams and --concurrency must be positive")
    # bench.run.Bench reads these.
    args.duration, args.warmup = 1.0, 0.0
    return args


class Soak(Bench):
    """bench.run's Bench without the null app, with a limited key and all features on."""

    def start(self) -> None:
        self.start_fake_and_gateway()
        if not self.redis_url:
            raise RuntimeError("the soak needs Redis (BENCH_REDIS_URL, default redis://127.0.0.1:6379/0): "
                               + "; ".join(self.notes))
        self.virtual_key = self.generate_key()
        self.worker_pid = self.single_worker()

    def gateway_env(self) -> dict:
        env = super().gateway_env()
        for name in FEATURE_OFF_VARS:
            if not any(item.startswith(name + "=") for item in self.args.gateway_env):
                env.pop(name, None)
        env.setdefault("MODEL_PRICES", MODEL_PRICES)
        return env

    def generate_key(self) -> str:
        status, body = procs.http_request(
            self.gateway.port, "POST", "/key/generate", json.dumps(KEY_LIMITS).encode(),
            {"Authorization": f"Bearer {self.master_key}", "Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"/key/generate answered {status}: {body[:300]!r}")
        return json.loads(body)["key"]

    def single_worker(self) -> int:
        workers = self.gateway.refresh_workers()
        if len(workers) != 1:
            raise RuntimeError(f"expected one gateway worker, found {workers}")
        return workers[0]

    # -- load ---------------------------------------------------------------------------

    def load(self, mode: str, n: int) -> dict:
        """Run bench.loadgen once (its own process), sampling the worker's peak RSS meanwhile."""
        url = self.gateway.url + "/vllm" + CHAT
        headers = {"Authorization": f"Bearer {self.virtual_key}"}
        body = dict(CHAT_BODY)
        argv = [sys.executable, "-m", "bench.loadgen", mode, "--url", url]
        if mode == "streams":
            body.update(stream=True, stream_options={"include_usage": True})
            headers.update(STREAM_HEADERS)
            argv += ["--streams", str(n), "--timeout", "90"]
            limit = 150.0
        else:
            argv += ["--count", str(n), "--concurrency", str(self.args.concurrency),
                     "--warmup", "0", "--timeout", "120"]
            limit = 180.0
        argv += ["--body", json.dumps(body)]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        for server in self.servers:
            server.check_alive()
        pid = self.worker_pid
        peak = procs.rss_kb(pid)
        cpu0, t0 = procs.cpu_seconds(pid), time.monotonic()
        lg = subprocess.Popen(argv, cwd=procs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=procs.raise_nofile_limit)
        try:
            out, err = lg.communicate(timeout=0.1)
        except subprocess.TimeoutExpired:
            out = None
        while out is None:  # bounded by `limit`
            peak = max(peak, procs.rss_kb(pid))
            try:
                out, err = lg.communicate(timeout=0.1)
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > limit:
                    lg.kill()
                    lg.communicate(timeout=5)
                    raise RuntimeError(f"loadgen {mode} ran past {limit}s") from None
        wall = time.monotonic() - t0
        if lg.returncode != 0:
            raise RuntimeError(f"loadgen {mode} exited {lg.returncode}: {err.decode()[-2000:]}")
        result = json.loads(out)
        result.update(wall_s=round(wall, 3), worker_cpu_s=round(procs.cpu_seconds(pid) - cpu0, 3),
                      worker_rss_peak_kb=peak)
        return result

    # -- sampling -------------------------------------------------------------------------

    def redis_connections(self) -> int:
        import redis
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            name = f"vgw-worker-{self.worker_pid}"
            return sum(1 for c in client.client_list() if c.get("name") == name)
        finally:
            client.close()

    def redis_keys(self) -> dict[str, int]:
        """Keys under this run's prefix by shape, tokens and numbers masked (a lease or a
        rate window that is never cleaned up would show as a growing count)."""
        import redis
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, decode_responses=True)
        shapes: dict[str, int] = {}
        try:
            for i, name in enumerate(client.scan_iter(match=self.prefix + "*", count=1000)):
                if i >= 100_000:  # bounded
                    break
                shape = re.sub(r"\d+", "N", re.sub(r"\{[^}]*\}|[0-9a-f]{16,}", "<key>", name[len(self.prefix):]))
                shapes[shape] = shapes.get(shape, 0) + 1
        finally:
            client.close()
        return dict(sorted(shapes.items()))

    def sample(self) -> dict:
        """The worker's state once the load is over and connections had `settle` s to close."""
        time.sleep(self.args.settle)
        for server in self.servers:
            server.check_alive()
        workers = self.gateway.refresh_workers()
        pid = self.worker_pid
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = None
        shapes = self.redis_keys()
        kinds = fd_kinds(pid, self.gateway.port, self.fake.port, urlsplit(self.redis_url).port or 6379)
        return {"worker_pid": pid, "worker_alive": pid in workers, "workers": workers,
                "rss_kb": procs.rss_kb(pid), "fds": fds, "fd_kinds": kinds,
                # fds that are not idle upstream keep-alive connections (whose number is bounded
                # by UPSTREAM_POOL_SIZE and varies with how a burst ended)
                "fds_non_upstream": None if fds is None else fds - kinds["upstream"],
                "redis_conns": self.redis_connections(),
                "redis_key_shapes": shapes, "redis_keys": sum(shapes.values()), "master_rss_kb": procs.rss_kb(self.gateway.proc.pid),
                "fake_vllm_rss_kb": procs.rss_kb(self.fake.proc.pid)}


def tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, TCP state hex) from /proc/net/tcp{,6}."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    table[fields[9]] = (int(fields[1].rsplit(":", 1)[1], 16),
                                        int(fields[2].rsplit(":", 1)[1], 16), fields[3])
        except OSError:
            pass
    return table


def fd_kinds(pid: int, gateway_port: int, upstream_port: int, redis_port: int) -> dict[str, int]:
    """The worker's open fds by kind: sockets to the fake vLLM (its idle keep-alive pool),
    client sockets, Redis sockets, everything else; and TCP sockets in CLOSE_WAIT (the peer
    closed, the worker has not yet)."""
    kinds = {"upstream": 0, "client": 0, "redis": 0, "other": 0, "close_wait": 0}
    table = tcp_sockets()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        sock = table.get(link[8:-1]) if link.startswith("socket:[") else None
        if sock is None:
            kinds["other"] += 1
            continue
        local, remote, state = sock
        kinds["close_wait"] += state == "08"
        if remote == upstream_port:
            kinds["upstream"] += 1
        elif remote == redis_port:
            kinds["redis"] += 1
        elif local == gateway_port and state != "0A":  # not the listening socket
            kinds["client"] += 1
        else:
            kinds["other"] += 1
    return kinds


def run_round(soak: Soak, label: str, requests: int, streams: int) -> dict:
    t0 = time.monotonic()
    rps = soak.load("rps", requests)
    st = soak.load("streams", streams)
    state = soak.sample()
    return {
        "round": label, "wall_s": round(time.monotonic() - t0, 1),
        "requests": rps["requests"], "requests_ok": rps["ok"], "rps": rps["rps"], "p99_ms": rps["p99_ms"],
        "streams": streams, "streams_ok": st["completed"],
        "served": rps["ok"] + st["completed"],
        # a request never answered within the loadgen's time bound counts too
        "errors": rps["errors"] + st["errors"] + max(0, requests - rps["requests"] - rps["socket_errors"]),
        "error_samples": (rps["error_samples"] + st["error_samples"])[:5],
        "statuses": rps["statuses"],
        "worker_cpu_s": round(rps["worker_cpu_s"] + st["worker_cpu_s"], 2),
        **state,
        "rss_peak_kb": max(rps["worker_rss_peak_kb"], st["worker_rss_peak_kb"], state["rss_kb"]),
    }


def gateway_setting(args, name: str, default: int) -> int:
    for item in args.gateway_env:
        key, _, value = item.partition("=")
        if key == name:
            return int(value)
    return default


def verdict(rows: list[dict], args) -> dict:
    """Checks over the rounds (rows[0] is the warm-up sample, rows[1] round 1, ...)."""
    base, first, last = rows[0], rows[1], rows[-1]
    # Round 1 fills the pools (upstream, Redis) to their high-water mark: compare from round 2
    # when there are at least three rounds.
    second = rows[2] if len(rows) > 3 else rows[1]
    rss_growth_mb = (last["rss_kb"] - second["rss_kb"]) / 1024
    fd_growth = (last["fds_non_upstream"] or 0) - (first["fds_non_upstream"] or 0)
    upstream_max = max(r["fd_kinds"]["upstream"] for r in rows)
    pool_size = gateway_setting(args, "UPSTREAM_POOL_SIZE", 1000)
    redis_growth = last["redis_conns"] - first["redis_conns"]
    redis_max = max(r["redis_conns"] for r in rows)
    redis_pool = gateway_setting(args, "REDIS_POOL_SIZE", 50)
    errors = sum(r["errors"] for r in rows[1:])
    pid_stable = all(r["worker_pid"] == base["worker_pid"] and r["worker_alive"] for r in rows)
    checks = {
        "zero_errors": {"ok": errors == 0, "value": errors},
        "worker_not_replaced": {"ok": pid_stable, "value": base["worker_pid"]},
        "rss_growth_round2_to_last_mb": {"ok": rss_growth_mb < args.rss_threshold_mb,
                                         "value": round(rss_growth_mb, 2), "threshold": args.rss_threshold_mb,
                                         "from": second["round"], "to": last["round"]},
        "fd_growth_round1_to_last": {"ok": fd_growth <= args.fd_tolerance, "value": fd_growth,
                                     "tolerance": args.fd_tolerance,
                                     "what": "open fds other than idle upstream keep-alive sockets"},
        "upstream_sockets_within_pool": {"ok": upstream_max <= pool_size, "value": upstream_max,
                                         "pool_size": pool_size},
        # The worker's pool holds at most REDIS_POOL_SIZE connections and may still be filling
        # up after round 1 (short runs); more than that, or growth once full, is a leak.
        "redis_conn_growth_round1_to_last": {
            "ok": redis_max <= redis_pool and (redis_growth <= 0 or first["redis_conns"] < redis_pool),
            "value": redis_growth, "max": redis_max, "pool_size": redis_pool},
    }
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


def deltas(rows: list[dict]) -> dict:
    base, first, last = rows[0], rows[1], rows[-1]
    out = {}
    for name in ("rss_kb", "fds", "fds_non_upstream", "upstream", "redis_conns", "redis_keys"):
        a, b, z = ((r["fd_kinds"]["upstream"] if name == "upstream" else r[name] or 0) for r in (base, first, last))
        out[name] = {"warmup_to_last": z - a, "round1_to_last": z - b}
    return out


def markdown(results: dict) -> str:
    cfg, rows, v = results["config"], results["rows"], results["verdict"]
    lines = [
        (f"# Gateway soak: {cfg['rounds']} rounds of {cfg['requests']} requests (c{cfg['concurrency']}) "
         f"+ {cfg['streams']} streams{' (quick)' if cfg['quick'] else ''}"),
        "",
        (f"One gevent worker (pid {rows[0]['worker_pid']}), Redis keystore, access log, usage tracking, "
         f"virtual key with limits never reached. {results['machine']['cpu_count']} cores; "
         f"sampled {cfg['settle_s']} s after each round; {results['elapsed_s']} s in all."),
        "",
        ("| round | served | errors | req/s | p99 ms | worker RSS MB | peak RSS MB | fds | upstream socks "
         "| other fds | CLOSE_WAIT | redis conns | redis keys | worker CPU s | wall s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['served']} | {r['errors']} | {r.get('rps', '')} | {r.get('p99_ms', '')} "
            f"| {r['rss_kb'] / 1024:.1f} | {r['rss_peak_kb'] / 1024:.1f} | {r['fds']} "
            f"| {r['fd_kinds']['upstream']} | {r['fds_non_upstream']} | {r['fd_kinds']['close_wait']} "
            f"| {r['redis_conns']} "
            f"| {r['redis_keys']} | {r.get('worker_cpu_s', '')} | {r.get('wall_s', '')} |")
    d = results["deltas"]
    lines += [
        "",
        "| delta | warm-up → last | round 1 → last |",
        "|---|---|---|",
        f"| worker RSS | {d['rss_kb']['warmup_to_last'] / 1024:+.1f} MB | {d['rss_kb']['round1_to_last'] / 1024:+.1f} MB |",
        f"| open fds, all | {d['fds']['warmup_to_last']:+d} | {d['fds']['round1_to_last']:+d} |",
        f"| idle upstream sockets | {d['upstream']['warmup_to_last']:+d} | {d['upstream']['round1_to_last']:+d} |",
        f"| other fds | {d['fds_non_upstream']['warmup_to_last']:+d} | {d['fds_non_upstream']['round1_to_last']:+d} |",
        f"| Redis connections | {d['redis_conns']['warmup_to_last']:+d} | {d['redis_conns']['round1_to_last']:+d} |",
        f"| Redis keys (prefix) | {d['redis_keys']['warmup_to_last']:+d} | {d['redis_keys']['round1_to_last']:+d} |",
        "",
        f"**Verdict: {'PASS' if v['ok'] else 'FAIL'}**",
        "",
    ]
    c = v["checks"]
    rss = c["rss_growth_round2_to_last_mb"]
    fd = c["fd_growth_round1_to_last"]
    rc = c["redis_conn_growth_round1_to_last"]
    lines += [
        f"- errors: {c['zero_errors']['value']} ({'ok' if c['zero_errors']['ok'] else 'FAIL'})",
        f"- same worker throughout: {'ok' if c['worker_not_replaced']['ok'] else 'FAIL (worker replaced or died)'}",
        (f"- RSS growth {rss['from']} → {rss['to']}: {rss['value']:+.2f} MB "
         f"(threshold {rss['threshold']} MB: {'ok' if rss['ok'] else 'FAIL'})"),
        (f"- growth of fds other than idle upstream sockets, round 1 → last: {fd['value']:+d} "
         f"(tolerance {fd['tolerance']}: {'ok' if fd['ok'] else 'FAIL'})"),
        (f"- idle upstream keep-alive sockets at most {c['upstream_sockets_within_pool']['value']} "
         f"(bounded by UPSTREAM_POOL_SIZE {c['upstream_sockets_within_pool']['pool_size']}: "
         f"{'ok' if c['upstream_sockets_within_pool']['ok'] else 'FAIL'})"),
        (f"- Redis connection growth round 1 → last: {rc['value']:+d}, at most {rc['max']} "
         f"(REDIS_POOL_SIZE {rc['pool_size']}; growth while the pool fills up is allowed: "
         f"{'ok' if rc['ok'] else 'FAIL'})"),
    ]
    for note in results["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    procs.raise_nofile_limit()
    started = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        with soak.running():
            print(f"warm-up: {args.warmup_requests} requests + {max(1, args.warmup_requests // 10)} streams",
                  file=sys.stderr, flush=True)
            warm = run_round(soak, "warm-up", max(1, args.warmup_requests), max(1, args.warmup_requests // 10))
            if warm["errors"]:
                raise RuntimeError(f"warm-up had {warm['errors']} errors: {warm['error_samples']}")
            rows.append(warm)
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}: {args.requests} requests + {args.streams} streams",
                      file=sys.stderr, flush=True)
                row = run_round(soak, str(i + 1), args.requests, args.streams)
                rows.append(row)
                print(f"  served {row['served']} errors {row['errors']} rss {row['rss_kb'] / 1024:.1f} MB "
                      f"fds {row['fds']} (upstream {row['fd_kinds']['upstream']}) redis conns {row['redis_conns']}", file=sys.stderr, flush=True)
    results = {
        "machine": machine_info(),
        "config": {"rounds": args.rounds, "requests": args.requests, "streams": args.streams,
                   "concurrency": args.concurrency, "warmup_requests": args.warmup_requests,
                   "settle_s": args.settle, "quick": args.quick, "stream_headers": STREAM_HEADERS,
                   "key_limits": KEY_LIMITS, "gateway_env": args.gateway_env, "redis": soak.redis_url,
                   "redis_prefix": soak.prefix,
                   "rss_threshold_mb": args.rss_threshold_mb, "fd_tolerance": args.fd_tolerance},
        "notes": soak.notes, "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows, "deltas": deltas(rows), "verdict": verdict(rows, args),
    }
    write_results(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
