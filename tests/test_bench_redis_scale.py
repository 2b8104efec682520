"""bench/redis_scale.py --quick: seeds its own redis-server, answers every query, stops the server."""
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_scale_bench_runs_in_quick_mode():
    done = subprocess.run([sys.executable, "-m", "bench.redis_scale", "--quick", "--queries", "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "seeded 20,000 entries" in out and re.search(r"[\d,]+ bytes per logged request", out)
    assert re.search(r"[\d,]+ bytes per key", out)
    rows = dict(re.findall(r"^(/\S.*?)\s+[\d.]+\s+[\d.]+\s+\d+\s+(\d+)$", out, re.M))
    assert len(rows) == 12, out
    # Every filtered query found its target (the combined one may find nothing, by chance).
    assert all(empty == "0" for name, empty in rows.items() if name != "/spend/logs?key=&end_user="), out
    server = re.search(r"redis-server on 127\.0\.0\.1:(\d+)", out).group(1)
    assert subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{server}"], capture_output=True).returncode == 1
