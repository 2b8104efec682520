"""bench/routing.py --quick: the three strategies and the overload phase run end to end on the
benchmark's own servers, every request is answered, the report has its shape, nothing is left
running. No timing is asserted."""
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STRATEGIES = {"round_robin", "least_busy", "load"}


def test_quick_routing_bench_answers_every_request_and_reports(tmp_path):
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "bench.routing", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    markdown = out.with_suffix(".md").read_text()
    assert report["command"].startswith("python -m bench.routing --quick")
    assert "| strategy | TTFT p50 ms | TTFT p99 ms |" in markdown and "## Overload: load" in markdown

    assert set(report["summary"]) == STRATEGIES
    requests = report["traffic"]["requests"]
    assert requests > 0 and report["traffic"]["multi_turn_requests"] > 0 and report["traffic"]["oneshot_requests"] > 0
    for strategy, figures in report["summary"].items():
        assert figures["all_completed"], strategy
        assert figures["errors"] == 0 and figures["shed_503"] == 0, strategy
        assert figures["ttft_p50_ms"] > 0 and figures["ttft_p99_ms"] >= figures["ttft_p50_ms"]
        assert figures["completed_rps"] > 0 and figures["preemptions"] >= 0
        assert 0 <= figures["prefix_hit_rate"] <= 1
        assert len(figures["max_waiting"]) == 3 and len(figures["replica_requests"]) == 3
    for name in ("least_busy_over_load_ttft_p99", "round_robin_over_load_ttft_p99"):
        assert report["ratios"][name] > 0

    [rnd] = report["rounds"]
    for strategy, run in rnd.items():
        assert run["completed"] == run["offered"] == requests, strategy
        assert sum(r["requests"] for r in run["replicas"].values()) >= requests  # + nothing lost at the fakes
    # each pair of gateways routed by its own strategy
    reasons = {s: {k.split(":")[1] for k in run["gateway"] if k.startswith("route:")} for s, run in rnd.items()}
    assert reasons["round_robin"] == {"round_robin"}
    assert reasons["least_busy"] == {"fail_open"}
    assert reasons["load"] & {"affinity", "score", "affinity_overridden"}

    overload = report["overload"]["load"]
    assert overload["offered"] == overload["completed"] + overload["shed_503"] and overload["errors"] == 0
    assert overload["key_completed_share_min"] > 0 and len(overload["per_key"]) == report["args"]["keys"]
    assert len(overload["max_waiting"]) == 3

    # everything it started is stopped (redis-server, the three fakes, eight gunicorn masters)
    pids = dict(re.findall(r"(\w+)=(\d+)", proc.stdout.split("pids:", 1)[1].splitlines()[0]))
    assert len(pids) == 1 + 3 + 8, pids
    for name, pid in pids.items():
        assert not (Path("/proc") / pid).exists(), name
