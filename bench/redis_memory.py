"""Redis bytes per /vllm request, measured with MEMORY USAGE on a real Redis namespace.

    .venv/bin/python -m bench.redis_memory [--requests 2000] [--redis redis://127.0.0.1:6379/0]

One limited virtual key (rpm, tpm, parallel) sends chat requests through the app (Flask test
client, so accounting is written synchronously) to the fake vLLM, in three shapes: every request
from one end user; every request from a new end user (a tenant rotating ids, the worst case for
end-user stats); and hostile requests (new 256-character end user, 4 KB path, 128-character
request id). Prints bytes per request by kind of key (the spend log, end-user stats, limits).
Keys are written under a unique prefix, deleted at the end (SCAN on that prefix only).
"""
from __future__ import annotations

import argparse
import secrets
import tempfile
import uuid
from pathlib import Path

import redis

from app import create_app
from bench.procs import start_fake_vllm

MASTER = {"Authorization": "Bearer sk-bench-master-0123456789abcdef"}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}


def kind_of(name: str, prefix: str) -> str:
    rest = name[len(prefix):]
    return rest.split(":", 1)[0].split("{", 1)[0]


def usage_by_kind(client, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in client.scan_iter(match=prefix + "*", count=1000):
        kind = kind_of(name, prefix)
        sizes[kind] = sizes.get(kind, 0) + (client.memory_usage(name, samples=0) or 0)
    return sizes


def run_shape(url: str, vllm_url: str, upstream_key: str, shape: str, count: int) -> dict[str, float]:
    client = redis.Redis.from_url(url, decode_responses=True)
    prefix = f"bench-mem-{uuid.uuid4().hex[:8]}:"
    env = {"HOSTED_VLLM_API_BASE": vllm_url, "HOSTED_VLLM_API_KEY": upstream_key,
           "LITELLM_MASTER_KEY": MASTER["Authorization"][7:], "REDIS_KEY_PREFIX": prefix,
           "DISABLE_ACCESS_LOG": "1"}
    try:
        app = create_app({"environ": env, "redis": client})
        http = app.test_client()
        created = http.post("/key/generate", headers=MASTER,
                            json={"rpm_limit": 10**6, "tpm_limit": 10**9, "max_parallel_requests": 100}).get_json()
        auth = {"Authorization": f"Bearer {created['key']}"}
        before = usage_by_kind(client, prefix)
        for i in range(count):
            path, headers, user = "/vllm/v1/chat/completions", dict(auth), "alice"
            if shape == "new_end_user":
                user = f"user-{i}-{secrets.token_hex(4)}"
            elif shape == "hostile":
                user = secrets.token_hex(128)
                path = "/vllm/v1/chat/completions/" + "x" * 4000
                headers["X-Request-Id"] = secrets.token_hex(64)
            http.post(path, headers=headers, json={**CHAT, "user": user}).close()  # close: accounting runs
        after = usage_by_kind(client, prefix)
        kinds = sorted(set(before) | set(after))
        return {kind: (after.get(kind, 0) - before.get(kind, 0)) / count for kind in kinds}
    finally:
        for name in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    upstream_key = secrets.token_hex(8)
    vllm = start_fake_vllm(Path(tempfile.mkdtemp(prefix="bench-mem-")), upstream_key)
    try:
        for shape in ("one_end_user", "new_end_user", "hostile"):
            per_kind = run_shape(args.redis, vllm.url, upstream_key, shape, args.requests)
            detail = ", ".join(f"{kind} {size:.0f}" for kind, size in per_kind.items() if size)
            print(f"{shape:13s} {sum(per_kind.values()):7.0f} bytes/request  ({detail})", flush=True)
    finally:
        vllm.stop()


if __name__ == "__main__":
    main()
