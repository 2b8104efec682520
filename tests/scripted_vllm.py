"""A vLLM stand-in whose /metrics say what the test sets (tests/hostile_upstream.py underneath),
for tests of load-aware routing: it answers /health, /v1/models and any other request with a
small chat completion, and records what it received."""
from __future__ import annotations

import json

from tests.hostile_upstream import HostileUpstream, ok_response, response

COMPLETION = json.dumps({
    "id": "chatcmpl-scripted", "object": "chat.completion", "model": "fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()


def metrics_text(waiting=0, running=0, kv=0.0, preemptions=0, engines=1) -> str:
    """vLLM's exposition of the figures routing reads, split over `engines` (data parallel)."""
    lines = []
    for name, kind, value, share in (("vllm:num_requests_waiting", "gauge", waiting, True),
                                     ("vllm:num_requests_running", "gauge", running, True),
                                     ("vllm:kv_cache_usage_perc", "gauge", kv, False),
                                     ("vllm:num_preemptions_total", "counter", preemptions, True)):
        lines.append(f"# TYPE {name.removesuffix('_total')} {kind}")
        for engine in range(engines):
            part = value / engines if share else value
            lines.append(f'{name}{{engine="{engine}",model_name="fake-model"}} {float(part)}')
    return "\n".join(lines) + "\n"


class ScriptedReplica:
    def __init__(self):
        self.figures = {"waiting": 0, "running": 0, "kv": 0.0}
        self.metrics_status = 200
        self.server = HostileUpstream(self._script).start()
        self.url = self.server.url

    def set(self, metrics_status: int = 200, **figures) -> None:
        self.figures = {"waiting": 0, "running": 0, "kv": 0.0, **figures}
        self.metrics_status = metrics_status

    def _script(self, conn, req):
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            if self.metrics_status != 200:
                conn.send(response(self.metrics_status, "Error", body=b"no metrics"))
                return True
            conn.send(ok_response(metrics_text(**self.figures).encode(), content_type="text/plain; version=0.0.4"))
        elif path == "/health":
            conn.send(ok_response(b""))
        elif path == "/v1/models":
            conn.send(ok_response(MODELS))
        else:
            conn.send(ok_response(COMPLETION))
        return True

    def mark(self) -> int:
        """A point in what was received; `inference(since=mark)` counts from there."""
        return len(self.server.request_objects)

    def inference(self, since: int = 0) -> list:
        """The requests received (after `since`) other than /metrics, /health and /v1/models."""
        return [r for r in self.server.request_objects[since:]
                if r.path.split("?", 1)[0] not in ("/metrics", "/health", "/v1/models")]

    def metrics_reads(self) -> int:
        return sum(1 for r in self.server.request_objects if r.path == "/metrics")

    def stop(self) -> None:
        self.server.stop()
