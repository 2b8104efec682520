"""Token reconciliation against the real vLLM, started with `--enable-force-include-usage` (usage
in every stream, so nothing is estimated): after requests of every kind through a gateway of two
workers, the closed windows' gateway totals match vLLM's own counter deltas within 1%.

Windows are short (2 s) and requests may straddle an edge (vLLM counts tokens as it processes
them, the gateway as each request ends), so the test adds up every window from the one after
its baseline to one that closed after everything was flushed: that is where the two must agree.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import MASTER_KEY, REAL_REDIS_URL, GatewayServer, gateway_environ, wait_until
from tests.realvllm.conftest import MODEL, PRICES, VLLM_KEY

WINDOW = 2.0
MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture(scope="module")
def reconciling_gateway(real_vllm_forced_usage, shared_redis):
    """Two workers in front of one replica (no load-aware routing): reconciliation's own poller."""
    env = gateway_environ(real_vllm_forced_usage.url, HOSTED_VLLM_API_KEY=VLLM_KEY, REDIS_URL=REAL_REDIS_URL,
                          REDIS_KEY_PREFIX=shared_redis[1] + "recon:", MODEL_PRICES=PRICES,
                          RECONCILE=1, RECONCILE_WINDOW=WINDOW, RECONCILE_POLL_INTERVAL=0.25, RECONCILE_MIN_TOKENS=1,
                          # vLLM's /metrics answers slowly while it generates on a busy CPU: a read may take
                          # its time without the gap between readings voiding a window
                          ROUTING_POLL_TIMEOUT=2)
    server = GatewayServer(env, workers=2, args=("--no-control-socket",))
    yield server
    server.stop()


class Windows:
    """Every closed window /replicas shows, collected by its end (Redis' clock)."""

    def __init__(self, url):
        self.url = url
        self.seen = {}
        self.http = requests.Session()

    def poll(self) -> dict | None:
        body = self.http.get(self.url + "/replicas", headers=MASTER, timeout=10).json()
        window = body["replicas"][0]["reconciliation"]
        if window is not None:
            self.seen[window["end"]] = window
        return window

    def after(self, end: float) -> list[dict]:
        return [w for e, w in sorted(self.seen.items()) if e > end]


def traffic(url: str, index: int) -> None:
    chat = {"model": MODEL, "ignore_eos": True, "max_tokens": 12 + index % 7,
            "messages": [{"role": "system", "content": "You are a gateway test. Answer at length."},
                         {"role": "user", "content": f"Question number {index}: tell me about gateways."}]}
    kinds = [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),  # usage forced in by vLLM
        ("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": MODEL, "prompt": f"Once upon a time {index}", "max_tokens": 9,
                             "ignore_eos": True}),
        ("/v1/completions", {"model": MODEL, "prompt": f"A gateway {index} and", "max_tokens": 14,
                             "ignore_eos": True, "stream": True}),
    ]
    path, body = kinds[index % len(kinds)]
    resp = requests.post(url + "/vllm" + path, json=body, headers=MASTER, timeout=60)
    assert resp.status_code == 200, resp.text
    resp.close()


def test_closed_windows_match_vllm_within_one_percent(reconciling_gateway):
    windows = Windows(reconciling_gateway.url)
    # The first window starts at the polling worker's first reading; wait for one to close, the baseline.
    assert wait_until(lambda: windows.poll() is not None, timeout=6 * WINDOW)
    baseline = max(windows.seen)
    with ThreadPoolExecutor(4) as pool:  # both workers serve, their tallies meet in Redis
        list(pool.map(lambda i: traffic(reconciling_gateway.url, i), range(40)))
    done = len(windows.after(baseline))
    # Three more windows: the next two may hold requests that straddled an edge or were flushed
    # late (a poll interval); the third started after every tally reached Redis.
    assert wait_until(lambda: windows.poll() and len(windows.after(baseline)) >= done + 3, timeout=10 * WINDOW)
    closed = windows.after(baseline)
    assert all(w["void"] is None for w in closed), closed
    gateway_prompt = sum(w["gateway"]["prompt_tokens"] for w in closed)
    vllm_prompt = sum(w["vllm"]["prompt_tokens"] for w in closed)
    gateway_generation = sum(w["gateway"]["generation_tokens"] for w in closed)
    vllm_generation = sum(w["vllm"]["generation_tokens"] for w in closed)
    assert sum(w["gateway"]["requests"] for w in closed) == 40
    assert sum(w["gateway"]["estimated_requests"] for w in closed) == 0
    assert vllm_prompt > 0 and vllm_generation > 0
    assert gateway_prompt == pytest.approx(vllm_prompt, rel=0.01), closed
    assert gateway_generation == pytest.approx(vllm_generation, rel=0.01), closed
    # The last window closed after everything was flushed: it holds nothing, and drifts by 0.
    assert closed[-1]["gateway"]["requests"] == 0 and closed[-1]["drift"] == {"prompt": 0.0, "generation": 0.0}
    metrics = requests.get(reconciling_gateway.url + "/metrics", headers=MASTER, timeout=10).text
    assert 'vgw_replica_tokens_drift_ratio{kind="prompt"' in metrics
