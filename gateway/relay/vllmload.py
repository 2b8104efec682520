"""What a vLLM replica says about its own load, read from its Prometheus `/metrics`.

The figures the console's Replicas page shows and load-aware routing scores on
(gateway/relay/loadpoller.py): requests running and waiting, KV-cache use (0..1), preemptions so
far, and the prefix cache's hits and queries so far (tokens; their ratio shows whether prefix
affinity pays). vLLM labels its series
by `model_name` and, when it runs data-parallel, by `engine`: each figure is summed over every
series of its name (KV-cache use is averaged, being a share per engine). Older vLLM names the
KV-cache figure `vllm:gpu_cache_usage_perc`.

The poller (and reconciliation, gateway/relay/reconcile.py) also reads vLLM's token counters,
`vllm:prompt_tokens_total` and `vllm:generation_tokens_total`, summed likewise (`read_reading`);
`/replicas`' live read (`read_load`) shows the load figures only.

The text is parsed with prometheus_client's parser. The body is read up to MAX_METRICS_BYTES: a
replica (or something answering in its place) cannot make a worker hold an endless body.
"""
from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

MAX_METRICS_BYTES = 4 * 1024 * 1024

# figure -> the sample names it is read from, first found wins
_SUMMED = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
    "preemptions_total": ("vllm:num_preemptions_total",),
    "prefix_cache_hits_total": ("vllm:prefix_cache_hits_total",),
    "prefix_cache_queries_total": ("vllm:prefix_cache_queries_total",),
}
_AVERAGED = {"kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")}
FIGURES = (*_SUMMED, *_AVERAGED)
# Token counters since vLLM started (reconciliation), summed over `engine` and `model_name`.
_TOKENS = {
    "prompt_tokens_total": ("vllm:prompt_tokens_total",),
    "generation_tokens_total": ("vllm:generation_tokens_total",),
}


class LoadUnreadable(Exception):
    """The replica's /metrics could not be read or parsed; the message says why (no secrets)."""


def _samples(text: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("vllm:"):
                    samples.setdefault(sample.name, []).append(sample.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise LoadUnreadable(f"vLLM's /metrics is not Prometheus text ({type(exc).__name__})") from None
    return samples


def _summed(samples: dict, wanted: dict) -> dict:
    figures = {}
    for figure, names in wanted.items():
        found = next((samples[n] for n in names if n in samples), None)
        figures[figure] = sum(found) if found is not None else None
    return figures


def _load(samples: dict) -> dict:
    load = _summed(samples, _SUMMED)
    for figure, names in _AVERAGED.items():
        found = next((samples[n] for n in names if n in samples), None)
        load[figure] = sum(found) / len(found) if found else None
    return load


def parse_load(text: str) -> dict:
    """The load figures in a Prometheus exposition text; None for a figure it does not carry."""
    return _load(_samples(text))


def parse_reading(text: str) -> dict:
    """The load figures and the token counters, from one parse (the poller reads both)."""
    samples = _samples(text)
    return {**_load(samples), **_summed(samples, _TOKENS)}


def read_load(upstream, timeout: float = 1.0, parse=parse_load) -> dict:
    """GET the replica's /metrics (with the upstream key, through the worker's session) and parse
    it; the body must arrive within 3 × `timeout` (a trickling answer is given up)."""
    headers = {"Authorization": upstream.auth_header} if upstream.auth_header else {}
    deadline = time.monotonic() + 3 * timeout
    try:
        with upstream.session.get(upstream.base + "/metrics", headers=headers, timeout=timeout,
                                  allow_redirects=False, stream=True) as resp:
            if resp.status_code != 200:
                raise LoadUnreadable(f"HTTP {resp.status_code} on /metrics")
            body = bytearray()
            # read1: whatever has arrived (up to 64 KiB), so a trickle meets the deadline check
            for piece in iter(lambda: resp.raw.read1(65536, decode_content=True), b""):
                body += piece
                if len(body) > MAX_METRICS_BYTES:
                    raise LoadUnreadable(f"/metrics is larger than {MAX_METRICS_BYTES // 1048576} MiB")
                if time.monotonic() > deadline:
                    raise LoadUnreadable(f"/metrics took longer than {3 * timeout:g} s")
    except requests.RequestException as exc:
        raise LoadUnreadable(f"/metrics could not be read ({type(exc).__name__})") from None
    return parse(body.decode("utf-8", "replace"))


def read_reading(upstream, timeout: float = 1.0) -> dict:
    """read_load, with the token counters too (what the poller publishes and reconciles)."""
    return read_load(upstream, timeout, parse=parse_reading)
