"""One JSON line per request on stdout, with no secrets in it."""
import requests

from tests.conftest import MASTER, MASTER_KEY, UPSTREAM_KEY, sent_for, wait_until

FIELDS = {"time", "request_id", "method", "path", "status", "upstream_status", "duration_ms",
          "ttfb_ms", "bytes_in", "bytes_out", "stream", "caller", "error"}


def test_each_request_logs_one_json_line(gateway, vllm):
    requests.post(gateway.url + "/vllm/v1/chat/completions?key=sk-in-query-secret",
                  headers={**MASTER, "X-Request-Id": "log-1"},
                  json={"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]})
    requests.get(gateway.url + "/vllm/v1/models", headers={"Authorization": "Bearer sk-bad-key-000000000",
                                                           "X-Request-Id": "log-2"})
    gateway.stdout.wait_for('"request_id":"log-2"')
    lines = {line["request_id"]: line for line in gateway.access_lines()}
    ok, denied = lines["log-1"], lines["log-2"]
    assert set(ok) >= FIELDS
    assert (ok["method"], ok["path"], ok["status"], ok["upstream_status"]) == ("POST", "/vllm/v1/chat/completions", 200, 200)
    assert ok["caller"] == "master" and ok["stream"] is False and ok["error"] is None
    assert ok["bytes_in"] > 0 and ok["bytes_out"] > 0 and ok["duration_ms"] >= ok["ttfb_ms"] >= 0
    assert (denied["status"], denied["upstream_status"], denied["caller"]) == (401, None, None)
    assert "Invalid API key" in denied["error"]
    everything = gateway.stdout.text() + gateway.stderr.text()
    for secret in (MASTER_KEY, UPSTREAM_KEY, "sk-bad-key-000000000", "sk-in-query-secret"):
        assert secret not in everything


def test_stream_logged_when_it_ends(gateway, vllm):
    with requests.post(gateway.url + "/vllm/v1/chat/completions", headers={**MASTER, "X-Request-Id": "log-s"},
                       json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True},
                       stream=True) as resp:
        body = resp.content
    gateway.stdout.wait_for('"request_id":"log-s"')
    line = next(line for line in gateway.access_lines() if line["request_id"] == "log-s")
    assert line["stream"] is True and line["bytes_out"] == len(body) and line["error"] is None


def test_a_callers_request_id_is_made_unique_before_it_reaches_vllm(gateway, vllm):
    """vLLM makes X-Request-Id its engine request id: two tenants sending the same id must not
    collide there. Each gets its own id back; vLLM sees the id plus a per-request suffix, and
    the log line names both."""
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    replies = [requests.post(gateway.url + "/vllm/v1/chat/completions", json=chat,
                             headers={**MASTER, "X-Request-Id": "same-id-1"}) for _ in range(2)]
    assert [r.headers["X-Request-Id"] for r in replies] == ["same-id-1", "same-id-1"]
    seen = [x["request_id"] for x in vllm.requests() if x["request_id"].startswith("same-id-1")]
    assert len(seen) == 2 and len(set(seen)) == 2 and all(sent_for(s, "same-id-1") for s in seen)
    gateway.stdout.wait_for('"request_id":"same-id-1"')
    assert wait_until(lambda: len([x for x in gateway.access_lines() if x["request_id"] == "same-id-1"]) == 2)
    logged = {x["upstream_request_id"] for x in gateway.access_lines() if x["request_id"] == "same-id-1"}
    assert logged == set(seen)
    # An id the gateway made up is unique already and goes to vLLM as it is.
    own = requests.get(gateway.url + "/vllm/v1/models", headers=MASTER).headers["X-Request-Id"]
    assert own in [x["request_id"] for x in vllm.requests()]
