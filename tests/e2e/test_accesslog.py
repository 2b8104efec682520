"""One JSON line per request on stdout, with no secrets in it."""
import requests

from tests.conftest import MASTER, MASTER_KEY, UPSTREAM_KEY

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
