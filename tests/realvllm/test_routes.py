"""vLLM's own routes and errors through the gateway, compared with calling vLLM directly."""
import json
import re
import subprocess

import pytest

from tests.conftest import MASTER_KEY
from tests.realvllm.conftest import MODEL, rid

TRAILING_COMMA = '{"model": "%s", "messages": [{"role": "user", "content": "Hello"}],}' % MODEL


def curl(*args: str) -> tuple[int, bytes]:
    """Run curl as the README shows it; (status, body)."""
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def test_seed_curl_calls_as_documented(real_gateway, real_vllm):
    status, body = curl(real_gateway.url + "/vllm/metrics", "-H", f"Authorization: Bearer {MASTER_KEY}")
    assert status == 200 and b"vllm:num_requests_running" in body
    # The seed's chat call has a trailing comma: vLLM's own 400, byte for byte.
    via_gateway = curl(real_gateway.url + "/vllm/v1/chat/completions", "-H", f"Authorization: Bearer {MASTER_KEY}",
                       "-H", "Content-Type: application/json", "-d", TRAILING_COMMA)
    direct = curl(real_vllm.url + "/v1/chat/completions", "-H", f"Authorization: Bearer {real_vllm.auth['Authorization'][7:]}",
                  "-H", "Content-Type: application/json", "-d", TRAILING_COMMA)
    assert via_gateway == direct and direct[0] == 400
    assert json.loads(direct[1])["error"]["code"] == 400


def _pair(real_gateway, real_vllm, method, path, key, body=None):
    """The same call through the gateway (with `key`) and directly."""
    gw = real_vllm.http.request(method, real_gateway.url + "/vllm" + path, json=body, timeout=60,
                                headers={"Authorization": f"Bearer {key}"})
    direct = real_vllm.http.request(method, real_vllm.url + path, json=body, timeout=60, headers=real_vllm.auth)
    return gw, direct


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "Hello there, gateway"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [5, 6, 7, 8]}),
    ("GET", "/health", None),
    ("GET", "/version", None),
])
def test_deterministic_routes_are_byte_identical(real_gateway, real_vllm, calls, method, path, body):
    gw, direct = _pair(real_gateway, real_vllm, method, path, calls.new_key(), body)
    assert (gw.status_code, gw.content) == (direct.status_code, direct.content)
    assert gw.status_code == 200
    assert gw.headers.get("content-type") == direct.headers.get("content-type")


def test_models_and_metrics_through_the_gateway(real_gateway, real_vllm, calls):
    key = calls.new_key()
    gw, direct = _pair(real_gateway, real_vllm, "GET", "/v1/models", key)
    assert gw.status_code == direct.status_code == 200
    assert [m["id"] for m in gw.json()["data"]] == [m["id"] for m in direct.json()["data"]] == [MODEL]
    gw, _ = _pair(real_gateway, real_vllm, "GET", "/metrics", key)
    assert gw.status_code == 200 and "vllm:kv_cache_usage_perc" in gw.text


@pytest.mark.parametrize("body", [
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},        # 404
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},  # over the context
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},  # bad field
    {"model": MODEL, "messages": "not a list"},
])
def test_vllm_errors_relayed_unchanged(real_gateway, real_vllm, calls, body):
    gw, direct = _pair(real_gateway, real_vllm, "POST", "/v1/chat/completions", calls.new_key(), body)
    assert direct.status_code in (400, 404)
    assert (gw.status_code, gw.content) == (direct.status_code, direct.content)
    assert gw.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/collective_rpc", "/server_info", "/sleep", "/reset_prefix_cache",
                                  "/v1/load_lora_adapter", "/start_profile", "/no_such_route"])
def test_operator_and_unknown_routes_refused_to_a_virtual_key(real_gateway, real_vllm, calls, path):
    first_line = len(real_vllm.out.lines)
    resp = real_vllm.http.post(real_gateway.url + "/vllm" + path, json={},
                               headers={"Authorization": f"Bearer {calls.new_key()}"}, timeout=10)
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
    # vLLM's access log is in order: once a marker request sent after the refusal is logged,
    # a refused request that had reached vLLM would be logged before it.
    marker = rid()
    assert real_vllm.http.get(f"{real_vllm.url}/version?marker={marker}", timeout=10).status_code == 200
    real_vllm.out.wait_for(re.escape(marker), start=first_line)
    reached = [line for line in real_vllm.out.lines[first_line:] if line and f" {path} HTTP" in line]
    assert reached == []


@pytest.mark.parametrize("path,body", [
    ("/inference/v1/generate", {"model": MODEL, "token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 3}}),
    ("/generative_scoring", {"model": MODEL, "query": "a", "items": ["b"], "label_token_ids": [5, 6]}),
])
def test_current_inference_routes_reach_vllm(real_gateway, real_vllm, calls, path, body):
    """Admitted by the route policy for a key limited to the model, and accounted."""
    key = calls.new_key(models=[MODEL])
    request_id = rid()
    gw = real_vllm.http.post(real_gateway.url + "/vllm" + path, json=body, timeout=60,
                             headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id})
    assert gw.status_code == 200, gw.text
    usage = gw.json()["usage"]
    entry = calls.spend_entry(request_id)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
