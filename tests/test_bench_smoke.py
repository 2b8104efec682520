"""The benchmark suite runs end to end (`python -m bench.run --quick`); no timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"nonstream_c32", "latency_c1", "streams_500", "streams_1000"}


def test_quick_bench_writes_results(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    assert set(results["scenarios"]) == SCENARIOS
    for target in ("direct", "gateway_master", "gateway_virtual", "null", "minimal_proxy"):
        assert results["scenarios"]["nonstream_c32"]["summary"]["targets"][target]["rps"] > 0
    ratios = results["scenarios"]["nonstream_c32"]["summary"]["ratios"]
    assert ratios["gateway_over_minimal_proxy_rps"] > 0 and ratios["virtual_over_minimal_proxy_rps"] > 0
    for target in ("direct", "gateway_master", "minimal_proxy"):
        assert results["scenarios"]["latency_c1"]["summary"]["targets"][target]["rps"] > 0
        assert results["scenarios"]["streams_500"]["summary"]["targets"][target]["completed_min"] > 0
    assert results["scenarios"]["streams_1000"]["summary"]["targets"]["gateway_master"]["completed_min"] > 0
    assert results["scenarios"]["streams_1000"]["summary"]["gateway_rss_max_mb"] > 0
