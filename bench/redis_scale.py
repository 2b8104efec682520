"""Admin queries at scale: /key/list and filtered /spend/logs on a Redis holding 100k keys and 1M entries.

    .venv/bin/python -m bench.redis_scale                 # 1,000,000 entries, 100,000 keys (~5 min)
    .venv/bin/python -m bench.redis_scale --quick         # smoke run (20,000 entries, 2,000 keys)
    .venv/bin/python -m bench.redis_scale --keys 0        # the spend log only

Issue 13's targets: a /key/list page p50 <= 50 ms at 100k keys; filtered /spend/logs p50 <= 100 ms
at 1M entries. It starts its own redis-server on a free loopback port (never the shared one: a
million entries take ~2 GB) and stops it at the end. Entries are seeded through
SpendLog.queue_batch on pipelines, so the layout (global stream, per-key and per-end-user
streams, request-id lists, usage buckets, end-user stats) is the gateway's own; keys through
KeyStore.generate. Queries go through the Flask test client (view, JSON and all). Memory: INFO
used_memory before and after each seeding, per logged request and per key, and MEMORY USAGE
samples per kind of Redis key.
"""
from __future__ import annotations

import argparse
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from app import create_app
from bench import procs
from gateway.core.redisnames import RedisNames
from gateway.keys.store import KeyStore
from gateway.usage.spendlog import SpendLog

MASTER_KEY = "sk-bench-scale-0123456789abcdef"
MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}
PREFIX = "vgw:"
BATCH = 2000          # entries per seeding pipeline
OWNERS = 500         # user_id of every 7th key: owner-0 .. owner-499
SPREAD = 7 * 86400    # seeded requests started over the last week (hour and day buckets fill up)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.redis_scale", description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1_000_000, help="spend-log entries to seed")
    p.add_argument("--log-keys", type=int, default=5_000, help="virtual keys the entries spread over")
    p.add_argument("--end-users", type=int, default=50_000, help="end users the entries spread over")
    p.add_argument("--keys", type=int, default=100_000, help="keys created through KeyStore.generate (0: none)")
    p.add_argument("--queries", type=int, default=200, help="timed queries per kind")
    p.add_argument("--quick", action="store_true", help="smoke mode: small counts, a few seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.entries, args.log_keys, args.end_users, args.keys, args.queries = 20_000, 200, 2_000, 2_000, 30
    if min(args.entries, args.log_keys, args.end_users, args.queries) < 1 or args.keys < 0:
        p.error("counts must be positive (--keys may be 0)")
    return args


def start_redis(logdir: Path) -> procs.Server:
    port = procs.free_port()
    server = procs.Server("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                    "--appendonly", "no", "--dir", str(logdir)], {}, logdir, stdout_to_log=True)
    server.port = port
    probe = redis.Redis(host="127.0.0.1", port=port)
    procs.wait_until(lambda: _pings(probe), "PING", server)
    return server


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


# -- seeding --------------------------------------------------------------------------------------
class LogSeed:
    """What the seeded entries are spread over, so queries can pick real targets."""

    def __init__(self, args, rng: random.Random):
        self.tokens = [secrets.token_hex(32) for _ in range(args.log_keys)]
        self.aliases = {f"team-{i}": token for i, token in enumerate(self.tokens)}
        self.end_users = [f"user-{i}-{rng.getrandbits(32):08x}" for i in range(args.end_users)]
        self.request_ids = []


def seed_spend_log(log: SpendLog, args, rng: random.Random) -> tuple[LogSeed, float]:
    seed = LogSeed(args, rng)
    client, names = log.redis, log.names
    pipe = client.pipeline(transaction=False)
    for alias, token in seed.aliases.items():
        pipe.set(names.alias(alias), token)
    pipe.execute()
    aliases = {token: alias for alias, token in seed.aliases.items()}
    now, started = time.time(), time.perf_counter()
    for first in range(0, args.entries, BATCH):
        batch = []
        for i in range(first, min(first + BATCH, args.entries)):
            token, request_id = rng.choice(seed.tokens), f"req-{i:07d}-{rng.getrandbits(24):06x}"
            begin = now - SPREAD + SPREAD * i / args.entries
            prompt, completion = rng.randint(10, 2000), rng.randint(1, 500)
            batch.append({"request_id": request_id, "token": token, "key_alias": aliases[token],
                          "caller": f"key:{aliases[token]}", "end_user": rng.choice(seed.end_users),
                          "model": rng.choice(("llama-3-8b", "llama-3-70b", "qwen-2-7b")),
                          "route": "/v1/chat/completions", "method": "POST", "status": 200, "upstream_status": 200,
                          "prompt_tokens": prompt, "completion_tokens": completion,
                          "spend": (prompt + 2 * completion) * 1e-6, "start_time": begin, "end_time": begin + 0.8,
                          "ttfb_ms": 120.5, "duration_ms": 800.0, "stream": i % 3 == 0, "estimated": False})
            if i % 97 == 0:
                seed.request_ids.append(request_id)
        log.queue_batch(pipe, batch)
        pipe.execute()
        if first and first % 100_000 == 0:
            print(f"  seeded {first:,} entries ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return seed, time.perf_counter() - started


def seed_keys(app, count: int) -> float:
    store = app.extensions["gateway"].keystore
    started = time.perf_counter()
    for i in range(count):
        fields = {"key_alias": f"k-{i}"} if i % 10 == 0 else {}
        if i % 7 == 0:
            fields["user_id"] = f"owner-{(i // 7) % OWNERS}"
        store.generate(fields, caller="bench")
        if i and i % 20_000 == 0:
            print(f"  generated {i:,} keys ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return time.perf_counter() - started


# -- measuring -------------------------------------------------------------------------------------
def timed(http, paths: list[str]) -> dict:
    """p50/p95 in ms of GET `paths` (every answer must be 200 and non-empty where it should be)."""
    times, empty = [], 0
    for path in paths:
        started = time.perf_counter()
        resp = http.get(path, headers=MASTER)
        times.append((time.perf_counter() - started) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.get_data(as_text=True)[:300]}")
        body = resp.get_json()
        empty += not (body.get("logs") or body.get("keys") or body.get("series"))
    times.sort()
    return {"p50": statistics.median(times), "p95": times[min(len(times) - 1, int(len(times) * 0.95))],
            "n": len(times), "empty": empty}


def spend_queries(seed: LogSeed, count: int, rng: random.Random) -> dict[str, list[str]]:
    pick = lambda items: [rng.choice(items) for _ in range(count)]  # noqa: E731
    return {
        "/spend/logs page 1 (no filter)": ["/spend/logs?size=50"] * count,
        "/spend/logs?key=": [f"/spend/logs?key={t}&size=50" for t in pick(seed.tokens)],
        "/spend/logs?end_user=": [f"/spend/logs?end_user={u}&size=50" for u in pick(seed.end_users)],
        "/spend/logs?request_id=": [f"/spend/logs?request_id={r}" for r in pick(seed.request_ids)],
        "/spend/logs?key_alias=": [f"/spend/logs?key_alias={a}&size=50" for a in pick(list(seed.aliases))],
        "/spend/logs?key=&end_user=": [f"/spend/logs?key={t}&end_user={u}"
                                       for t, u in zip(pick(seed.tokens), pick(seed.end_users))],
        "/spend/report by key, hourly": ["/spend/report?group_by=key&interval=hour&limit=20"] * max(5, count // 10),
    }


def key_queries(total: int, count: int, rng: random.Random) -> dict[str, list[str]]:
    pages = max(1, total // 50)
    return {
        "/key/list page (size 50)": [f"/key/list?page={rng.randint(1, pages)}&size=50" for _ in range(count)],
        "/key/list page, full objects": [f"/key/list?page={rng.randint(1, pages)}&size=50&return_full_object=true"
                                         for _ in range(count)],
        "/key/list?key_alias=": [f"/key/list?key_alias=k-{rng.randrange(0, total, 10)}" for _ in range(count)],
        "/key/list?user_id=": [f"/key/list?user_id=owner-{rng.randrange(min(OWNERS, total // 7 or 1))}&size=50"
                               for _ in range(count)],
        # aliases are k-0, k-10, ...: "K-1" matches about a tenth of them, "k-12" a hundredth
        "/key/list?search= (prefix, full objects)": [
            f"/key/list?search={rng.choice(['K-1', 'k-12', 'k-3'])}&size=50&return_full_object=true"
            for _ in range(count)],
    }


def memory_samples(client, log: SpendLog, seed: LogSeed, rng: random.Random) -> dict[str, float]:
    """Average MEMORY USAGE (bytes) of each kind of spend-log key, from samples."""
    def average(keys):
        sizes = [client.memory_usage(k, samples=0) or 0 for k in keys]
        return sum(sizes) / max(1, len(sizes))
    picks = lambda items, n=100: [rng.choice(items) for _ in range(n)]  # noqa: E731
    names = log.names
    hours = [int(k.rsplit(":", 1)[1]) for k in client.scan_iter(match=names.prefix + "usage:hour:*", count=1000)]
    return {
        "global stream (whole)": client.memory_usage(names.spend_log, samples=0) or 0,
        "log:{token} (one key's stream)": average(names.key_log(t) for t in picks(seed.tokens)),
        "eu-log:<end user>": average(names.end_user_log(u) for u in picks(seed.end_users)),
        "req:#<n> (one request-id list)": average(log._request_list(r) for r in picks(seed.request_ids)),
        "usage:hour:<start> (one bucket)": average(names.usage_bucket("hour", h) for h in hours[:50]),
    }


def print_table(rows: list[tuple], title: str) -> None:
    print(f"\n{title}")
    print(f"{'query':36s} {'p50 ms':>8s} {'p95 ms':>8s} {'n':>5s} {'empty':>6s}")
    for name, result in rows:
        print(f"{name:36s} {result['p50']:8.2f} {result['p95']:8.2f} {result['n']:5d} {result['empty']:6d}")


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = random.Random(13)
    logdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    server = start_redis(logdir)
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        names = RedisNames(PREFIX)
        env = {"HOSTED_VLLM_API_BASE": "http://127.0.0.1:9", "LITELLM_MASTER_KEY": MASTER_KEY,
               "REDIS_KEY_PREFIX": PREFIX, "DISABLE_ACCESS_LOG": "1", "SPEND_LOG_MAX_ENTRIES": str(args.entries)}
        app = create_app({"environ": env, "redis": client})
        http = app.test_client()
        print("command: " + " ".join([".venv/bin/python", "-m", "bench.redis_scale", *(argv or sys.argv[1:])]))
        print(f"redis-server on 127.0.0.1:{server.port} (its own, stopped at the end)")
        before = used_memory(client)
        log = SpendLog(client, names, max_entries=args.entries)  # as the app's: SPEND_LOG_MAX_ENTRIES
        seed, seconds = seed_spend_log(log, args, rng)
        log_bytes = used_memory(client) - before
        print(f"seeded {args.entries:,} entries over {args.log_keys:,} keys and {args.end_users:,} end users "
              f"in {seconds:.0f} s; used_memory +{log_bytes / 2**20:,.0f} MiB = "
              f"{log_bytes / args.entries:,.0f} bytes per logged request")
        for kind, size in memory_samples(client, log, seed, rng).items():
            print(f"  MEMORY USAGE {kind:34s} {size:14,.0f} bytes")
        rows = [(name, timed(http, paths)) for name, paths in spend_queries(seed, args.queries, rng).items()]
        print_table(rows, f"spend log at {args.entries:,} entries (target: filtered p50 <= 100 ms)")
        if args.keys:
            before = used_memory(client)
            seconds = seed_keys(app, args.keys)
            key_bytes = used_memory(client) - before
            print(f"\ngenerated {args.keys:,} keys in {seconds:.0f} s; used_memory +{key_bytes / 2**20:,.0f} MiB = "
                  f"{key_bytes / args.keys:,.0f} bytes per key (record, indexes, aliases, audit)")
            rows = [(name, timed(http, paths)) for name, paths in key_queries(args.keys, args.queries, rng).items()]
            print_table(rows, f"keys at {args.keys:,} (target: /key/list page p50 <= 50 ms)")
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(logdir)], check=False)


if __name__ == "__main__":
    main()
