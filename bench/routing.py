"""Routing strategies on the same traffic: round robin, least in flight, vLLM's load (ROUTING_STRATEGY).

    .venv/bin/python -m bench.routing              # 2 interleaved rounds + overload, about 5 minutes
    .venv/bin/python -m bench.routing --quick      # smoke run: a few seconds of traffic per strategy

Starts, all on 127.0.0.1 free ports, and stops at the end:

- its own redis-server (never the shared one);
- three fake vLLMs with the load model (`python -m fakevllm --max-running ... --kv-blocks ...`),
  the third at `--speed 0.5` (half as fast);
- per strategy two gateway instances (`gunicorn -c gunicorn.conf.py wsgi:app`, WEB_CONCURRENCY=2,
  their own GATEWAY_INSTANCE_ID, the same REDIS_URL, one REDIS_KEY_PREFIX per strategy,
  ROUTING_STRATEGY=round_robin | least_busy | load), plus a pair for the overload phase;
- one load generator process per measurement (`--drive`, gevent on raw sockets), which sends a
  seeded script of streaming chat requests at Poisson arrival times (open loop; a conversation's
  next turn leaves after the previous answer and a think time), alternating between the two
  instances, and samples every replica's /metrics every 100 ms.

Traffic: multi-turn conversations (chats of four applications: each begins with its application's
long system prompt, then turns whose messages grow, each earlier answer sent back as received;
`x-session-id` per conversation) and one-shot requests (distinct prompts), over N virtual keys;
streaming with `stream_options.include_usage`; output length set with `x-fake-chunks`. The same
script (same seed) for every strategy; the fakes' prefix caches are emptied and the fakes idle
before each measurement, so every strategy starts cold. Rounds run the strategies in rotated
order; figures are medians over rounds.

Then an overload phase (offered load above the capacity of all replicas, one key sending half of
it) against the load-aware strategy: the admission queue, its 503s, each replica's queue, and each
key's share of what completed.

Results: bench/results/routing.{json,md} (quick: routing-quick.{json,md}) unless --out is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from fakevllm.engine import generated_tokens

STRATEGIES = ("round_robin", "least_busy", "load")
CHAT = "/vllm/v1/chat/completions"
BLOCK = 16
# The fakes: vLLM-like step timing (decode 15 ms/step, +5% per extra running request, prefill
# 0.1 ms per uncached prompt token), a batch of 8 and a KV cache of 384 blocks of 16 tokens: about
# seven prompts of this traffic fill it, so a busy replica is KV-bound and preempts now and then.
FAKE_LOAD = {"max_running": 8, "kv_blocks": 384, "block_size": BLOCK, "prefill_ms_per_token": 0.1,
             "decode_ms_per_token": 15.0, "batch_growth": 0.05}
SPEEDS = (1.0, 1.0, 0.5)
# Inherited values would point the gateways elsewhere or change what is compared.
DROP_ENV = ("HOSTED_VLLM_API_BASE", "VLLM_API_BASE", "HOSTED_VLLM_API_KEY", "VLLM_API_KEY", "LITELLM_MASTER_KEY",
            "REDIS_URL", "DATABASE_URL", "REDIS_KEY_PREFIX", "REDIS_SENTINELS", "PORT", "WEB_CONCURRENCY",
            "PROMETHEUS_MULTIPROC_DIR", "GATEWAY_INSTANCE_ID", "METRICS_TOKEN", "METRICS_PUBLIC")
OVERLOAD_ENV = {"ROUTING_QUEUE_TIMEOUT": "5"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 round, a few seconds, tiny counts")
    p.add_argument("--seconds", type=float, default=None, help="arrival window per measurement (25; quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, medians reported (2; quick 1)")
    p.add_argument("--rate", type=float, default=None, help="offered requests/s: one-shots at (1 - share) x rate, conversations at share x rate / 4.5 turns (11; quick 6)")
    p.add_argument("--multi-turn-share", type=float, default=0.6, help="share of requests that are conversation turns")
    p.add_argument("--output-tokens", default=None, metavar="MIN-MAX",
                   help="output length of each request, uniform (default %d-%d)" % SIZES["out"])
    p.add_argument("--long-share", type=float, default=0.0,
                   help="share of requests with a long answer (%d-%d tokens)" % SIZES["long_out"])
    p.add_argument("--keys", type=int, default=None, help="virtual keys the traffic is spread over (6; quick 3)")
    p.add_argument("--overload-seconds", type=float, default=None, help="arrival window of the overload phase (15; quick 3; 0: none)")
    p.add_argument("--overload-rate", type=float, default=None, help="offered requests/s in the overload phase (28; quick 20)")
    p.add_argument("--overload-strategies", default="load", help="comma-separated strategies run in the overload phase")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, from " + ", ".join(STRATEGIES))
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                   help="also measure the load strategy with these gateway settings, under NAME (repeatable)")
    p.add_argument("--drain", type=float, default=None, help="longest wait for the last answers after the window (60; quick 20)")
    p.add_argument("--seed", type=int, default=20261130)
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VAL",
                   help="extra environment for every gateway, repeatable")
    p.add_argument("--fake", action="append", default=[], metavar="OPTION=VALUE",
                   help="override a load option of every fake, e.g. kv_blocks=384 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (markdown next to it with .md)")
    p.add_argument("--drive", type=Path, default=None, help=argparse.SUPPRESS)  # the load generator's own mode
    args = p.parse_args(argv)
    if args.drive:
        return args
    q = args.quick
    args.seconds = args.seconds or (4.0 if q else 25.0)
    args.rounds = args.rounds or (1 if q else 2)
    args.rate = args.rate or (6.0 if q else 11.0)
    args.keys = args.keys or (3 if q else 6)
    if args.overload_seconds is None:
        args.overload_seconds = 3.0 if q else 15.0
    args.overload_rate = args.overload_rate or (20.0 if q else 28.0)
    args.drain = args.drain or (20.0 if q else 60.0)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.overload_strategies = [s.strip() for s in args.overload_strategies.split(",") if s.strip()]
    for s in args.strategies + args.overload_strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}")
    args.variants = {}
    for item in args.variant:
        name, _, settings = item.partition(":")
        pairs = [kv.partition("=") for kv in settings.split(",") if kv]
        if not re.fullmatch(r"[a-z0-9_]+", name) or name in STRATEGIES or not pairs or any(not k or not e for k, e, _ in pairs):
            p.error(f"--variant wants NAME:KEY=VAL[,KEY=VAL] with a new lower-case NAME, got {item!r}")
        args.variants[name] = {k: v for k, _, v in pairs}
    if args.out is None:
        args.out = procs.ROOT / "bench" / "results" / ("routing-quick.json" if q else "routing.json")
    if min(args.seconds, args.rate, args.rounds, args.keys) <= 0 or not 0 <= args.multi_turn_share <= 1:
        p.error("--seconds, --rate, --rounds and --keys must be positive, --multi-turn-share within 0..1")
    for item in args.gateway_env:
        if "=" not in item:
            p.error(f"--gateway-env wants KEY=VAL, got {item!r}")
    try:
        low, high = (int(x) for x in (args.output_tokens or "%d-%d" % SIZES["out"]).split("-"))
    except ValueError:
        p.error("--output-tokens wants MIN-MAX, e.g. 16-48")
    if not 1 <= low <= high:
        p.error("--output-tokens wants 1 <= MIN <= MAX")
    args.output_tokens = [low, high]
    args.fake_load = dict(FAKE_LOAD)
    for item in args.fake:
        name, _, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if name not in FAKE_LOAD or name == "block_size" or not value:
            p.error(f"--fake wants one of {', '.join(FAKE_LOAD)}=VALUE, got {item!r}")
        args.fake_load[name] = float(value) if "." in value else int(value)
    return args


# -- the traffic script -------------------------------------------------------------------------

SIZES = {"system": (500, 900), "apps": 4, "turns": (3, 6), "user": (15, 50), "out": (16, 64), "long_out": (256, 512), "think_mean": 1.0,
         "think_max": 4.0, "oneshot": (200, 900)}


def make_script(seed: int, seconds: float, rate: float, mt_share: float, keys: int,
                heavy_share: float | None = None, out: tuple = SIZES["out"], long_share: float = 0.0) -> dict:
    """The seeded traffic: conversations (start time, key, system prompt, turns) and one-shot
    requests (time, key, prompt), each request with its output length. `heavy_share`: key 0 sends
    that share of everything (the rest spread evenly), else every key alike."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30000)]

    def words(bounds):
        return rng.choices(vocab, k=rng.randint(*bounds))

    def out_len():
        if long_share and rng.random() < long_share:
            return rng.randint(*SIZES["long_out"])
        return rng.randint(*out)

    def key():
        if heavy_share is not None and keys > 1:
            return 0 if rng.random() < heavy_share else rng.randrange(1, keys)
        return rng.randrange(keys)

    # Conversations are chats of a few applications: each starts with its application's system
    # prompt (a prefix shared across conversations), then its own turns.
    apps = [words(SIZES["system"]) for _ in range(SIZES["apps"])]
    mean_turns = sum(SIZES["turns"]) / 2
    conv_rate = rate * mt_share / mean_turns
    conversations, t = [], rng.expovariate(conv_rate) if conv_rate else math.inf
    while t < seconds:
        turns = [{"user": words(SIZES["user"]), "out": out_len(),
                  "think": min(rng.expovariate(1 / SIZES["think_mean"]), SIZES["think_max"])}
                 for _ in range(rng.randint(*SIZES["turns"]))]
        conversations.append({"id": len(conversations), "start": t, "key": key(), "system": rng.choice(apps),
                              "turns": turns})
        t += rng.expovariate(conv_rate)
    one_rate = rate * (1 - mt_share)
    oneshots, t = [], rng.expovariate(one_rate) if one_rate else math.inf
    while t < seconds:
        oneshots.append({"id": len(oneshots), "at": t, "key": key(), "prompt": words(SIZES["oneshot"]),
                         "out": out_len()})
        t += rng.expovariate(one_rate)
    return {"conversations": conversations, "oneshots": oneshots}


def conversation_messages(conv: dict, upto: int) -> list:
    """The messages of turn `upto` (0-based): system, then each earlier turn's user message and
    its answer as the client received it (the fake streams `tok0 tok1 ...`, as many as asked),
    then this turn's question."""
    messages = [{"role": "system", "content": " ".join(conv["system"])}]
    for i, turn in enumerate(conv["turns"][:upto + 1]):
        messages.append({"role": "user", "content": " ".join(turn["user"])})
        if i < upto:
            messages.append({"role": "assistant", "content": " ".join(generated_tokens(turn["out"]))})
    return messages


def script_stats(script: dict) -> dict:
    """Requests and prompt tokens (the fake counts words), and the multi-turn prefix-cache ceiling:
    what one replica serving every conversation could serve from an unbounded prefix cache: a
    turn's full blocks up to the end of the previous turn's answer, and a first turn's system
    prompt once an earlier conversation of the same application began with it."""
    mt_requests = mt_tokens = cacheable = 0
    seen_apps = set()
    for conv in sorted(script["conversations"], key=lambda c: c["start"]):
        previous = 0
        for k, turn in enumerate(conv["turns"]):
            prompt = sum(len(m["content"].split()) for m in conversation_messages(conv, k))
            mt_requests += 1
            mt_tokens += prompt
            if k:
                cacheable += min(previous // BLOCK * BLOCK, prompt - 1)
            elif tuple(conv["system"]) in seen_apps:
                cacheable += len(conv["system"]) // BLOCK * BLOCK
            previous = prompt + turn["out"]
        seen_apps.add(tuple(conv["system"]))
    one_tokens = sum(len(o["prompt"]) for o in script["oneshots"])
    return {"conversations": len(script["conversations"]), "multi_turn_requests": mt_requests,
            "oneshot_requests": len(script["oneshots"]), "requests": mt_requests + len(script["oneshots"]),
            "multi_turn_prompt_tokens": mt_tokens, "oneshot_prompt_tokens": one_tokens,
            "multi_turn_hit_ceiling": round(cacheable / mt_tokens, 4) if mt_tokens else None}


# -- the load generator (its own process: `python -m bench.routing --drive SPEC`) --------------

def drive(spec: dict) -> dict:
    """Send the script to the gateway instances, sample the replicas' /metrics; the raw records."""
    import gevent
    from gevent import socket as gsocket

    from bench import loadgen

    loadgen.raise_nofile_limit()
    script = make_script(**spec["script"])
    targets = [tuple(t) for t in spec["targets"]]
    keys = spec["keys"]
    records, samples = [], []
    t0 = time.perf_counter()
    deadline = t0 + spec["deadline"]

    def clock():
        return time.perf_counter() - t0

    def send(rec: dict, messages: list, out: int, session: str | None):
        body = json.dumps({"model": "fake-model", "messages": messages, "stream": True, "max_tokens": out,
                           "stream_options": {"include_usage": True}}).encode()
        headers = [("Authorization", f"Bearer {keys[rec['key']]}"), ("x-fake-chunks", str(out))]
        if session:
            headers.append(("x-session-id", session))
        host, port = targets[rec["inst"]]
        request = loadgen.build_request(host, port, CHAT, body, headers)
        rec["launch"] = clock()
        records.append(rec)
        sock = None
        try:
            sock = loadgen.connect((host, port), spec["timeout"])
            sock.sendall(request)
            buf, end = b"", -1
            while end < 0:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the response head")
                buf += data
                end = buf.find(b"\r\n\r\n")
            status, length, chunked, _ = loadgen.parse_head(buf[:end])
            rec["status"] = status
            decoder = loadgen.ChunkedDecoder() if chunked else None
            data, received, tail = buf[end + 4:], 0, b""
            while True:
                payload = decoder.feed(data) if decoder else data
                if payload:
                    received += len(payload)
                    if rec["ttft"] is None and b"data:" in payload:
                        rec["ttft"] = clock() - rec["launch"]
                    tail = (tail + payload)[-64:]
                if (decoder is not None and decoder.done) or (length is not None and received >= length):
                    break
                data = sock.recv(65536)
                if not data:
                    if decoder is None and length is None:
                        break
                    raise ConnectionError("closed inside the body")
            rec["end"] = clock() - rec["launch"]
            rec["done"] = status == 200 and b"[DONE]" in tail
            if not rec["done"]:
                rec["error"] = f"HTTP {status}" if status != 200 else "stream ended without [DONE]"
        except (OSError, ValueError, loadgen.ProtocolError) as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if sock is not None:
                sock.close()

    def new_record(kind, key, inst, sched, prompt, **extra):
        return {"kind": kind, "key": key, "inst": inst, "sched": round(sched, 4), "prompt": prompt, "launch": None,
                "status": None, "ttft": None, "end": None, "done": False, "error": None, **extra}

    def sleep_until(t):
        gevent.sleep(max(0.0, t - clock()))

    def conversation(conv):
        sleep_until(conv["start"])
        for k, turn in enumerate(conv["turns"]):
            if time.perf_counter() >= deadline:
                return
            messages = conversation_messages(conv, k)
            prompt = sum(len(m["content"].split()) for m in messages)
            rec = new_record("multi_turn", conv["key"], (conv["id"] + k) % len(targets), clock(), prompt,
                             conv=conv["id"], turn=k)
            send(rec, messages, turn["out"], f"conv-{spec['script']['seed']}-{conv['id']}")
            gevent.sleep(turn["think"])

    def oneshot(one):
        sleep_until(one["at"])
        rec = new_record("oneshot", one["key"], one["id"] % len(targets), one["at"], len(one["prompt"]), id=one["id"])
        send(rec, [{"role": "user", "content": " ".join(one["prompt"])}], one["out"], None)

    def read_metrics(port: int) -> dict | None:
        sock = None
        try:
            sock = gsocket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return parse_fake_metrics(b"".join(chunks).decode("latin-1"))
        except OSError:
            return None
        finally:
            if sock is not None:
                sock.close()

    stop_sampling = []

    def sampler():
        while not stop_sampling:
            at = clock()
            jobs = [gevent.spawn(read_metrics, port) for port in spec["fakes"]]
            gevent.joinall(jobs, timeout=2)
            samples.append([round(at, 3)] + [
                [j.value["waiting"], j.value["running"], round(j.value["kv"], 3)] if j.value else None for j in jobs])
            gevent.sleep(max(0.0, spec["sample_interval"] - (clock() - at)))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    sampling = gevent.spawn(sampler)
    work = [gevent.spawn(conversation, c) for c in script["conversations"]]
    work += [gevent.spawn(oneshot, o) for o in script["oneshots"]]
    gevent.joinall(work, timeout=max(0.0, deadline - time.perf_counter()))
    unfinished = [g for g in work if not g.dead]
    gevent.killall(unfinished, block=True, timeout=5)
    stop_sampling.append(True)
    sampling.join(timeout=3)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for rec in records:
        if not rec["done"] and rec["error"] is None:
            rec["error"] = "unfinished at the deadline"
    wall = clock()
    return {"records": records, "samples": samples, "unfinished_tasks": len(unfinished), "wall_s": round(wall, 3),
            "loadgen_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3)}


# -- metrics text ------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prom(text: str) -> list:
    """[(name, {label: value}, float)] of a Prometheus exposition text."""
    out = []
    for name, labels, value in _SAMPLE.findall(text):
        try:
            out.append((name, dict(_LABEL.findall(labels or "")), float(value)))
        except ValueError:
            pass
    return out


def parse_fake_metrics(text: str) -> dict:
    """One replica's load figures, summed over its engines (KV-cache use averaged)."""
    body = text.split("\r\n\r\n", 1)[-1] if text.startswith("HTTP/") else text
    sums, kv = {}, []
    for name, _labels, value in parse_prom(body):
        if name == "vllm:kv_cache_usage_perc":
            kv.append(value)
        else:
            sums[name] = sums.get(name, 0.0) + value
    return {"waiting": int(sums.get("vllm:num_requests_waiting", 0)),
            "running": int(sums.get("vllm:num_requests_running", 0)),
            "kv": sum(kv) / len(kv) if kv else 0.0,
            "preemptions": sums.get("vllm:num_preemptions_total", 0.0),
            "prefix_queries": sums.get("vllm:prefix_cache_queries_total", 0.0),
            "prefix_hits": sums.get("vllm:prefix_cache_hits_total", 0.0),
            "successes": sums.get("vllm:request_success_total", 0.0)}


# -- processes ---------------------------------------------------------------------------------

def _child_setup() -> None:
    """In each started server before exec: the open-file limit up, and SIGTERM when this process
    dies, however it dies (a killed benchmark leaves no server behind)."""
    procs.raise_nofile_limit()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server(procs.Server):
    """procs.Server, started with _child_setup."""

    def __init__(self, name: str, argv: list, env: dict, logdir: Path, stdout_to_log: bool):
        self.name, self.argv = name, argv
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=procs.ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log if stdout_to_log else subprocess.DEVNULL, stderr=self._log,
                                     preexec_fn=_child_setup)
        self.port = None
        self._workers = []


class Bench:
    def __init__(self, args, logdir: Path):
        self.args = args
        self.logdir = logdir
        self.servers: list[procs.Server] = []
        self.upstream_key = "fake-upstream-" + secrets.token_hex(8)
        self.master_key = "sk-bench-" + secrets.token_urlsafe(24)
        self.run_id = secrets.token_hex(4)
        self.fakes: list[procs.Server] = []
        self.gateways: dict[str, list[procs.Server]] = {}
        self.keys: dict[str, list[str]] = {}

    def start_redis(self) -> None:
        port = procs.free_port()
        self.redis = Server("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                            "--appendonly", "no", "--dir", str(self.logdir)], {}, self.logdir, True)
        self.redis.port = port
        self.servers.append(self.redis)
        procs.wait_until(lambda: _redis_ping(port), "PING", self.redis, timeout=15)

    def start_fakes(self) -> None:
        for i, speed in enumerate(SPEEDS):
            argv = [sys.executable, "-m", "fakevllm", "--host", "127.0.0.1", "--port", "0",
                    "--api-key", self.upstream_key]
            for name, value in {**self.args.fake_load, "speed": speed}.items():
                argv += ["--" + name.replace("_", "-"), str(value)]
            server = Server(f"fake{i + 1}" + ("_slow" if speed < 1 else ""), argv, dict(os.environ),
                                  self.logdir, stdout_to_log=True)
            self.servers.append(server)
            self.fakes.append(server)
        for server in self.fakes:
            def port_line(server=server):
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", server.log_path.read_text(errors="replace"))
                return m and int(m.group(1))
            server.port = procs.wait_until(port_line, "the 'listening on' line", server)

    def gateway_env(self, strategy: str, instance: str, prefix: str, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV and not k.startswith("ROUTING_")}
        env.update(HOSTED_VLLM_API_BASE=",".join(f.url for f in self.fakes), HOSTED_VLLM_API_KEY=self.upstream_key,
                   LITELLM_MASTER_KEY=self.master_key, REDIS_URL=f"redis://127.0.0.1:{self.redis.port}/0",
                   REDIS_KEY_PREFIX=prefix, WEB_CONCURRENCY="2", GATEWAY_INSTANCE_ID=instance,
                   ROUTING_STRATEGY=strategy, **extra)
        for item in self.args.gateway_env:
            name, _, value = item.partition("=")
            env[name] = value
        return env

    def start_gateways(self, pairs: dict) -> None:
        """pairs: name -> (strategy, extra env); two instances each, started side by side."""
        pending = []
        for name, (strategy, extra) in pairs.items():
            prefix = f"bench-routing-{self.run_id}-{name}:"
            self.gateways[name] = []
            for i in range(2):
                port = procs.free_port()
                instance = f"bench-{name}-{i + 1}"
                server = Server(f"gw_{name}_{i + 1}", [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                                             "wsgi:app", "--bind", f"127.0.0.1:{port}"],
                                      self.gateway_env(strategy, instance, prefix, extra), self.logdir, False)
                server.port = port
                self.servers.append(server)
                self.gateways[name].append(server)
                pending.append(server)
        for server in pending:
            procs.wait_until(lambda s=server: procs.http_request(s.port, "GET", "/health/liveliness", timeout=5)[0] == 200,
                             "GET /health/liveliness -> 200", server, timeout=90)
        for name in pairs:
            self.keys[name] = [self.generate_key(self.gateways[name][0], name, k) for k in range(self.args.keys)]
            for server in self.gateways[name]:  # one request through each: a misconfiguration fails here
                body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "preflight"}]})
                status, answer = procs.http_request(server.port, "POST", CHAT, body.encode(),
                                                    {"Authorization": f"Bearer {self.keys[name][0]}",
                                                     "Content-Type": "application/json", "x-fake-chunks": "2"}, 30)
                if status != 200:
                    raise RuntimeError(f"preflight through {server.name}: HTTP {status}: {answer[:300]!r}")

    def generate_key(self, server: procs.Server, name: str, k: int) -> str:
        status, body = procs.http_request(server.port, "POST", "/key/generate",
                                          json.dumps({"key_alias": f"bench-{name}-{k}"}).encode(),
                                          {"Authorization": f"Bearer {self.master_key}", "Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"/key/generate answered {status}: {body[:300]!r}")
        return json.loads(body)["key"]

    def fake_metrics(self) -> list[dict]:
        out = []
        for fake in self.fakes:
            status, body = procs.http_request(fake.port, "GET", "/metrics", timeout=5)
            if status != 200:
                raise RuntimeError(f"{fake.name} /metrics answered {status}")
            out.append(parse_fake_metrics(body.decode()))
        return out

    def gateway_metrics(self, name: str) -> dict:
        """Route decisions and admission figures, summed over the pair's instances."""
        totals: dict = {}
        for server in self.gateways[name]:
            status, body = procs.http_request(server.port, "GET", "/metrics", headers={
                "Authorization": f"Bearer {self.master_key}"}, timeout=10)
            if status != 200:
                continue
            for metric, labels, value in parse_prom(body.decode()):
                if metric == "vgw_route_decisions_total":
                    key = f"route:{labels.get('reason')}:{self.replica_label(labels.get('replica'))}"
                elif metric == "vgw_admission_shed_total":
                    key = f"shed:{labels.get('reason')}"
                elif metric in ("vgw_admission_wait_seconds_count", "vgw_admission_wait_seconds_sum"):
                    key = metric
                else:
                    continue
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def replica_label(self, url) -> str:
        for fake in self.fakes:
            if fake.url == url:
                return fake.name
        return str(url)

    def reset_fakes(self) -> None:
        """Empty every prefix cache and wait until nothing runs or waits, then one poll more."""
        deadline = time.monotonic() + 120
        while True:
            figures = self.fake_metrics()
            if all(f["waiting"] == 0 and f["running"] == 0 for f in figures):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fakes did not go idle: {figures}")
            time.sleep(0.2)
        for fake in self.fakes:
            procs.http_request(fake.port, "POST", "/reset_prefix_cache", b"", timeout=5)
        time.sleep(0.6)  # the load pollers read idle replicas (ROUTING_POLL_INTERVAL 0.25 s)

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()

    def stop(self) -> None:
        """SIGTERM to every server at once, then wait for each (gunicorn lets streams finish)."""
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in reversed(self.servers):
            try:
                server.stop()
            except BaseException as exc:  # keep stopping the others
                print(f"stopping {server.name}: {exc!r}", file=sys.stderr)


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


# -- one measurement ---------------------------------------------------------------------------

def measure(bench: Bench, name: str, script_params: dict, phase: str) -> dict:
    args = bench.args
    bench.check_alive()
    bench.reset_fakes()
    before, gw_before = bench.fake_metrics(), bench.gateway_metrics(name)
    busy0, _ = procs.machine_busy_seconds()
    spec = {"script": script_params, "targets": [["127.0.0.1", s.port] for s in bench.gateways[name]],
            "keys": bench.keys[name], "fakes": [f.port for f in bench.fakes], "timeout": 90.0, "sample_interval": 0.1,
            "deadline": script_params["seconds"] + args.drain}
    spec_path = bench.logdir / f"spec-{phase}-{name}.json"
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.routing", "--drive", str(spec_path)], cwd=procs.ROOT,
                          capture_output=True, timeout=spec["deadline"] + 60, preexec_fn=_child_setup)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr.decode()[-3000:]}")
    raw = json.loads((bench.logdir / f"spec-{phase}-{name}.json.out").read_text())
    busy1, _ = procs.machine_busy_seconds()
    after, gw_after = bench.fake_metrics(), bench.gateway_metrics(name)
    result = summarize(raw, before, after, [f.name for f in bench.fakes], script_params)
    result["gateway"] = {k: round(gw_after.get(k, 0.0) - gw_before.get(k, 0.0), 3)
                         for k in sorted(set(gw_after) | set(gw_before))
                         if gw_after.get(k, 0.0) - gw_before.get(k, 0.0)}
    result["busy_cores"] = round((busy1 - busy0) / wall, 2) if wall > 0 else None
    result["loadgen_cpu_s"] = raw["loadgen_cpu_s"]
    result["raw"] = compact(raw)
    return result


RECORD_FIELDS = ("kind", "key", "inst", "conv", "turn", "prompt", "sched", "launch", "ttft", "end", "status", "done",
                 "error")


def compact(raw: dict) -> dict:
    """The per-request records as rows (times in seconds, 3 decimals) and each replica's largest
    waiting count per second: what the report is computed from, small enough to keep."""
    def cell(value):
        return round(value, 3) if isinstance(value, float) else value
    rows = [[cell(rec.get(f)) for f in RECORD_FIELDS] for rec in raw["records"]]
    per_second: dict = {}
    for t, *replicas in raw["samples"]:
        slot = per_second.setdefault(int(t), [None] * len(replicas))
        for i, figures in enumerate(replicas):
            if figures is not None:
                slot[i] = max(slot[i] or 0, figures[0])
    return {"fields": RECORD_FIELDS, "records": rows,
            "waiting_max_per_second": [[t] + v for t, v in sorted(per_second.items())]}


def pct(values, q):
    values = sorted(values)
    if not values:
        return None
    rank = max(0, min(len(values) - 1, int(round(q / 100.0 * len(values) + 0.5)) - 1))
    return values[rank]


def ms(value):
    return None if value is None else round(value * 1000.0, 1)


def summarize(raw: dict, before: list, after: list, replica_names: list, script_params: dict) -> dict:
    recs = raw["records"]
    done = [r for r in recs if r["done"]]
    ttft = [r["ttft"] for r in done]
    by_kind = {kind: [r["ttft"] for r in done if r["kind"] == kind] for kind in ("multi_turn", "oneshot")}
    shed = [r for r in recs if r["status"] == 503]
    errors = [r for r in recs if not r["done"] and r["status"] != 503]
    first = min((r["launch"] for r in recs if r["launch"] is not None), default=0.0)
    last = max((r["launch"] + r["end"] for r in done), default=first)
    makespan = last - first
    stats = script_stats(make_script(**script_params))
    delta = [{k: a[k] - b[k] for k in ("preemptions", "prefix_queries", "prefix_hits", "successes")}
             for b, a in zip(before, after)]
    queries = sum(d["prefix_queries"] for d in delta)
    hits = sum(d["prefix_hits"] for d in delta)
    # The one-shot prompts are distinct: their first lookups cannot hit. Leaving them out of the
    # lookups gives the multi-turn rate (a request preempted and resumed looks its prompt up again).
    one_tokens = sum(r["prompt"] for r in recs if r["kind"] == "oneshot" and r["status"] == 200)
    mt_queries = queries - one_tokens
    waiting_max, waiting_end, waiting_5s = [], [], []
    window_end = script_params["seconds"]
    for i in range(len(replica_names)):
        series = [(s[0], s[1 + i][0]) for s in raw["samples"] if s[1 + i] is not None]
        waiting_max.append(max((w for _, w in series), default=None))
        at_end = [w for t, w in series if t <= window_end]
        waiting_end.append(at_end[-1] if at_end else None)
        slices: dict = {}
        for t, w in series:
            slices[int(t // 5)] = max(slices.get(int(t // 5), 0), w)
        waiting_5s.append([slices.get(k, 0) for k in range(max(slices, default=-1) + 1)])
    per_key = {}
    for r in recs:
        k = per_key.setdefault(str(r["key"]), {"offered": 0, "completed": 0, "shed_503": 0, "errors": 0})
        k["offered"] += 1
        k["completed"] += r["done"]
        k["shed_503"] += r["status"] == 503
        k["errors"] += (not r["done"] and r["status"] != 503)
    shares = [k["completed"] / k["offered"] for k in per_key.values() if k["offered"]]
    return {
        "offered": len(recs), "script_requests": stats["requests"], "completed": len(done),
        "all_completed": len(done) == len(recs) == stats["requests"],
        "errors": len(errors), "shed_503": len(shed),
        "error_samples": sorted({r["error"] for r in errors})[:5],
        "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p90_ms": ms(pct(ttft, 90)), "ttft_p99_ms": ms(pct(ttft, 99)),
        "ttft_max_ms": ms(max(ttft, default=None)),
        "multi_turn_ttft_p50_ms": ms(pct(by_kind["multi_turn"], 50)),
        "multi_turn_ttft_p99_ms": ms(pct(by_kind["multi_turn"], 99)),
        "oneshot_ttft_p50_ms": ms(pct(by_kind["oneshot"], 50)), "oneshot_ttft_p99_ms": ms(pct(by_kind["oneshot"], 99)),
        "makespan_s": round(makespan, 2), "completed_rps": round(len(done) / makespan, 2) if makespan > 0 else None,
        "preemptions": int(sum(d["preemptions"] for d in delta)),
        "prefix_hit_rate": round(hits / queries, 4) if queries else None,
        "multi_turn_prefix_hit_rate": round(hits / mt_queries, 4) if mt_queries > 0 else None,
        "multi_turn_hit_ceiling": stats["multi_turn_hit_ceiling"],
        "replicas": {name: {"requests": int(d["successes"]), "preemptions": int(d["preemptions"]),
                            "prefix_hit_rate": round(d["prefix_hits"] / d["prefix_queries"], 4) if d["prefix_queries"] else None,
                            "max_waiting": wm, "waiting_at_window_end": we, "max_waiting_per_5s": w5}
                     for name, d, wm, we, w5 in zip(replica_names, delta, waiting_max, waiting_end, waiting_5s)},
        "max_waiting": waiting_max,
        "per_key": per_key,
        "key_completed_share_min": round(min(shares), 4) if shares else None,
        "key_completed_share_max": round(max(shares), 4) if shares else None,
        "unfinished_tasks": raw["unfinished_tasks"],
    }


# -- the report --------------------------------------------------------------------------------

FIGURES = ("ttft_p50_ms", "ttft_p99_ms", "multi_turn_ttft_p99_ms", "oneshot_ttft_p99_ms", "completed_rps",
           "makespan_s", "errors", "shed_503", "preemptions", "prefix_hit_rate", "multi_turn_prefix_hit_rate",
           "busy_cores")


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def combine(runs: dict) -> dict:
    """strategy -> medians over its rounds, plus the per-replica maxima (the largest over rounds)."""
    out = {}
    for strategy, rounds in runs.items():
        fig = {f: median([r[f] for r in rounds]) for f in FIGURES}
        fig["rounds"] = len(rounds)
        fig["all_completed"] = all(r["all_completed"] for r in rounds)
        fig["max_waiting"] = [max((r["max_waiting"][i] or 0) for r in rounds) for i in range(len(rounds[0]["max_waiting"]))]
        fig["replica_requests"] = [median([r["replicas"][n]["requests"] for r in rounds]) for n in rounds[0]["replicas"]]
        out[strategy] = fig
    return out


def ratios(runs: dict) -> dict:
    """Medians of the per-round ratios (same round, same traffic): each baseline over the load
    strategy (and over each variant of it)."""
    out = {}
    for mine in [name for name in runs if name not in ("least_busy", "round_robin")]:
        for other in ("least_busy", "round_robin"):
            if other not in runs:
                continue
            for fig in ("ttft_p99_ms", "ttft_p50_ms"):
                values = [o[fig] / m[fig] for o, m in zip(runs[other], runs[mine]) if o[fig] and m[fig]]
                out[f"{other}_over_{mine}_{fig.replace('_ms', '')}"] = median(values)
    return out


def fmt(value, digits=0):
    if value is None:
        return "—"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def markdown(report: dict) -> str:
    a = report["args"]
    names = report["replica_names"]
    lines = [f"# Routing strategies on the same traffic ({report['date']})", "",
             f"`{report['command']}`", "",
             f"{report['cpus']} CPUs; wall time {report['wall_s']:.0f} s. Three fake vLLMs (`{report['fake_argv']}`), "
             f"the third at `--speed 0.5`; per strategy 2 gateway instances × 2 gevent workers, clients alternating "
             f"between them. Traffic: {a['rate']} req/s offered for {a['seconds']} s, "
             f"{a['multi_turn_share']:.0%} of it conversation turns (`x-session-id`), the rest one-shot prompts, "
             f"over {a['keys']} virtual keys; streaming with `include_usage`. "
             f"{report['traffic']['requests']} requests per measurement ({report['traffic']['conversations']} "
             f"conversations, {report['traffic']['multi_turn_requests']} turns, {report['traffic']['oneshot_requests']} "
             f"one-shots); medians over {a['rounds']} round(s), strategies in rotated order."
             + "".join(f" Variant `{n}`: the load strategy with {', '.join(f'{k}={v}' for k, v in env.items())}."
                       for n, env in a.get("variants", {}).items()), "",
             "| strategy | TTFT p50 ms | TTFT p99 ms | multi-turn p99 | one-shot p99 | completed req/s | makespan s "
             "| errors | 503 | preemptions | prefix hit (multi-turn) | prefix hit (all) | max waiting "
             + " / ".join(names) + " | requests " + " / ".join(names) + " | busy cores |",
             "|---" * 15 + "|"]
    for strategy, f in report["summary"].items():
        lines.append(
            f"| {strategy} | {fmt(f['ttft_p50_ms'])} | {fmt(f['ttft_p99_ms'])} | {fmt(f['multi_turn_ttft_p99_ms'])} "
            f"| {fmt(f['oneshot_ttft_p99_ms'])} | {fmt(f['completed_rps'], 2)} | {fmt(f['makespan_s'], 1)} "
            f"| {fmt(f['errors'])} | {fmt(f['shed_503'])} | {fmt(f['preemptions'])} "
            f"| {fmt(f['multi_turn_prefix_hit_rate'], 3)} | {fmt(f['prefix_hit_rate'], 3)} "
            f"| {' / '.join(fmt(w) for w in f['max_waiting'])} | {' / '.join(fmt(n) for n in f['replica_requests'])} "
            f"| {fmt(f['busy_cores'], 2)} |")
    lines += ["", f"Multi-turn prefix-hit ceiling of this script: {report['traffic']['multi_turn_hit_ceiling']} "
              "(the share of conversation prompt tokens one replica with an unbounded prefix cache could serve "
              "from it: each turn up to the end of the previous answer, a first turn its application's system "
              "prompt once seen).", ""]
    if report["ratios"]:
        lines += ["| ratio (median of per-round ratios) | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v, 2)} |" for k, v in report["ratios"].items()]
        lines.append("")
    lines += ["Per round:", "", "| round | strategy | TTFT p50 | TTFT p99 | req/s | preemptions | hit (multi-turn) "
              "| max waiting | errors | busy cores |", "|---" * 10 + "|"]
    for i, rnd in enumerate(report["rounds"]):
        for strategy, r in rnd.items():
            lines.append(f"| {i + 1} | {strategy} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} "
                         f"| {fmt(r['completed_rps'], 2)} | {fmt(r['preemptions'])} "
                         f"| {fmt(r['multi_turn_prefix_hit_rate'], 3)} | {' / '.join(fmt(w) for w in r['max_waiting'])} "
                         f"| {fmt(r['errors'])} | {fmt(r['busy_cores'], 2)} |")
    lines.append("")
    for strategy, o in report.get("overload", {}).items():
        lines += [f"## Overload: {strategy}, {a['overload_rate']} req/s for {a['overload_seconds']} s, "
                  f"key 0 sending half (gateways with {', '.join(f'{k}={v}' for k, v in OVERLOAD_ENV.items())})", "",
                  f"Offered {o['offered']}, completed {o['completed']} ({fmt(o['completed_rps'], 2)} req/s over "
                  f"{fmt(o['makespan_s'], 1)} s), 503 {o['shed_503']}, other errors {o['errors']}; TTFT p50 "
                  f"{fmt(o['ttft_p50_ms'])} ms, p99 {fmt(o['ttft_p99_ms'])} ms; preemptions {o['preemptions']}.", "",
                  "Gateway admission: shed (503) "
                  + (", ".join(f"{k[5:]} {v:.0f}" for k, v in o["gateway"].items() if k.startswith("shed:")) or "none")
                  + ", "
                  f"queued {fmt(o['gateway'].get('vgw_admission_wait_seconds_count'))} requests, "
                  f"mean wait {fmt((o['gateway'].get('vgw_admission_wait_seconds_sum', 0) / o['gateway']['vgw_admission_wait_seconds_count']) if o['gateway'].get('vgw_admission_wait_seconds_count') else None, 2)} s.", "",
                  "| replica | requests | max waiting | waiting at window end | preemptions | max waiting per 5 s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['requests']} | {fmt(r['max_waiting'])} | {fmt(r['waiting_at_window_end'])} "
                  f"| {r['preemptions']} | {' '.join(str(w) for w in r['max_waiting_per_5s'])} |"
                  for n, r in o["replicas"].items()]
        lines += ["", "| key | offered | completed | 503 | errors | completed / offered |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['offered']} | {v['completed']} | {v['shed_503']} | {v['errors']} "
                  f"| {v['completed'] / v['offered']:.2f} |" for k, v in sorted(o["per_key"].items(), key=lambda i: int(i[0]))]
        lines += ["", f"Per-key completed share: min {fmt(o['key_completed_share_min'], 2)}, "
                  f"max {fmt(o['key_completed_share_max'], 2)}.", ""]
    if report["goals"]:
        lines += ["## Goals", ""] + [f"- {g}" for g in report["goals"]] + [""]
    return "\n".join(lines)


def goals(report: dict) -> list:
    out = []
    s, r = report["summary"], report["ratios"]
    if "least_busy_over_load_ttft_p99" in r:
        v = r["least_busy_over_load_ttft_p99"]
        out.append(f"TTFT p99 least_busy / load = {fmt(v, 2)} (goal ≥ 2): {'met' if v and v >= 2 else 'NOT met'}")
    if "load" in s:
        v = s["load"]["multi_turn_prefix_hit_rate"]
        out.append(f"prefix hit rate on multi-turn traffic, load = {fmt(v, 3)} (goal ≥ 0.80; ceiling of this "
                   f"script {report['traffic']['multi_turn_hit_ceiling']}): {'met' if v and v >= 0.8 else 'NOT met'}")
    for strategy, o in report.get("overload", {}).items():
        bounded = all(w is not None and w <= 2 * OVERLOAD_MAX_WAITING for w in o["max_waiting"])
        out.append(f"overload ({strategy}): max waiting per replica {o['max_waiting']} "
                   f"({'bounded' if bounded else 'NOT bounded'} by 2 × ROUTING_MAX_WAITING = {2 * OVERLOAD_MAX_WAITING}); "
                   f"every key served: min completed/offered {fmt(o['key_completed_share_min'], 2)} "
                   f"({'met' if o['key_completed_share_min'] else 'NOT met'})")
    return out


OVERLOAD_MAX_WAITING = 8  # ROUTING_MAX_WAITING's default


# -- main --------------------------------------------------------------------------------------

def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.drive:
        result = drive(json.loads(args.drive.read_text()))
        Path(str(args.drive) + ".out").write_text(json.dumps(result))
        return 0
    signal.signal(signal.SIGTERM, _terminate)  # stop the servers on the way out, as on Ctrl-C
    started = time.monotonic()
    command = " ".join(["python -m bench.routing", *(sys.argv[1:] if argv is None else argv)])
    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    bench = Bench(args, logdir)
    script = dict(seed=args.seed, seconds=args.seconds, rate=args.rate, mt_share=args.multi_turn_share, keys=args.keys,
                  out=args.output_tokens, long_share=args.long_share)
    overload_script = dict(script, seed=args.seed + 1, seconds=args.overload_seconds, rate=args.overload_rate,
                           heavy_share=0.5)
    traffic = script_stats(make_script(**script))
    print(f"traffic per measurement: {traffic}", flush=True)
    measured = args.strategies + list(args.variants)
    runs: dict = {s: [] for s in measured}
    rounds: list = []
    overload: dict = {}
    ok = False
    try:
        bench.start_redis()
        bench.start_fakes()
        print(f"redis-server on 127.0.0.1:{bench.redis.port}; fakes on "
              + ", ".join(f"{f.name} 127.0.0.1:{f.port}" for f in bench.fakes), flush=True)
        pairs = {s: (s, {}) for s in args.strategies}
        pairs.update({name: ("load", env) for name, env in args.variants.items()})
        if args.overload_seconds > 0:
            pairs.update({f"overload_{s}": (s, OVERLOAD_ENV) for s in args.overload_strategies})
        bench.start_gateways(pairs)
        print(f"gateways up after {time.monotonic() - started:.0f} s; pids: "
              + " ".join(f"{server.name}={server.proc.pid}" for server in bench.servers), flush=True)
        for r in range(args.rounds):
            order = measured[r % len(measured):] + measured[:r % len(measured)]
            rounds.append({})
            for strategy in order:
                result = measure(bench, strategy, script, f"r{r + 1}")
                runs[strategy].append(result)
                rounds[-1][strategy] = {k: v for k, v in result.items() if k != "raw"}
                print(f"round {r + 1} {strategy:12s} TTFT p50 {fmt(result['ttft_p50_ms'])} ms, p99 "
                      f"{fmt(result['ttft_p99_ms'])} ms, {fmt(result['completed_rps'], 2)} req/s, completed "
                      f"{result['completed']}/{result['offered']}, preemptions {result['preemptions']}, hit (mt) "
                      f"{fmt(result['multi_turn_prefix_hit_rate'], 3)}, max waiting {result['max_waiting']}, "
                      f"busy {result['busy_cores']} ({time.monotonic() - started:.0f} s)", flush=True)
        for strategy in (args.overload_strategies if args.overload_seconds > 0 else []):
            result = measure(bench, f"overload_{strategy}", overload_script, "overload")
            overload[strategy] = result
            print(f"overload {strategy}: offered {result['offered']}, completed {result['completed']}, 503 "
                  f"{result['shed_503']}, errors {result['errors']}, max waiting {result['max_waiting']}, key share "
                  f"min {result['key_completed_share_min']} ({time.monotonic() - started:.0f} s)", flush=True)
        ok = True
    finally:
        bench.stop()
        if ok:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"logs kept in {logdir}", file=sys.stderr)
    report = {
        "date": datetime.date.today().isoformat(), "command": command, "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "wall_s": round(time.monotonic() - started, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("drive", "fake")},
        "fake_argv": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.fake_load.items()),
        "replica_names": [f.name for f in bench.fakes], "traffic": traffic,
        "summary": combine(runs), "ratios": ratios(runs),
        "rounds": rounds,
        "overload": {s: {k: v for k, v in o.items() if k != "raw"} for s, o in overload.items()},
    }
    report["goals"] = goals(report)
    text = markdown(report)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = {"runs": {s: [r["raw"] for r in rs] for s, rs in runs.items()},
           "overload": {s: o["raw"] for s, o in overload.items()}}
    # The report readable, the raw rows one line per measurement.
    args.out.write_text(json.dumps(report, indent=1)[:-2] + ',\n "raw": {\n'
                        + ",\n".join(f'  {json.dumps(k)}: {json.dumps(v, separators=(",", ":"))}' for k, v in raw.items())
                        + "\n }\n}\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
