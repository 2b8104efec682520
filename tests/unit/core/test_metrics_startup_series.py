"""The refusal and upstream-error counters exist at 0 from start-up, for every label value the
code can produce; the list of those values (gateway/core/metrics.py) cannot drift from the code
that raises them: this reads the raising code and compares."""
import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.core.metrics import AUTH_FAILURE_REASONS, RATE_LIMIT_KINDS, UPSTREAM_ERROR_KINDS, Metrics

ROOT = Path(__file__).resolve().parents[3]
SOURCES = sorted([*ROOT.joinpath("gateway").rglob("*.py"), *ROOT.joinpath("blueprints").rglob("*.py"),
                  ROOT / "app.py"])


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of Prometheus text."""
    import re
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name = head.split("{", 1)[0]
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', head))
        out[(name, labels)] = float(value)
    return out


@pytest.fixture
def metrics(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return Metrics()


def test_auth_failure_and_rate_limit_series_are_zero_before_any_event(metrics):
    found = samples(metrics.render()[0].decode())
    for reason in AUTH_FAILURE_REASONS:
        assert found[("vgw_auth_failures_total", frozenset({("reason", reason)}))] == 0
    for kind in RATE_LIMIT_KINDS:
        assert found[("vgw_rate_limited_total", frozenset({("limit", kind)}))] == 0
    assert found[("vgw_budget_rejections_total", frozenset())] == 0


def test_upstream_error_series_are_zero_for_every_kind_and_replica(metrics):
    replicas = ["http://vllm-a:8000", "http://vllm-b:8000/prefix"]
    metrics.prepare(replicas=replicas)
    found = samples(metrics.render()[0].decode())
    for replica in replicas:
        for kind in UPSTREAM_ERROR_KINDS:
            assert found[("vgw_upstream_errors_total", frozenset({("kind", kind), ("replica", replica)}))] == 0


def test_a_precreated_series_counts_on_from_zero(metrics):
    """The child created at start is the one the first event increments (no second series)."""
    metrics.prepare(replicas=["http://vllm-a:8000"])

    class Refusal:
        status, kind, type = 429, "tpm", "rate_limit_error"
    metrics.refused(Refusal())
    metrics.upstream_error("connection_refused", "http://vllm-a:8000")
    text = metrics.render()[0].decode()
    found = samples(text)
    assert found[("vgw_rate_limited_total", frozenset({("limit", "tpm")}))] == 1
    assert found[("vgw_upstream_errors_total",
                  frozenset({("kind", "connection_refused"), ("replica", "http://vllm-a:8000")}))] == 1
    assert text.count('vgw_rate_limited_total{limit="tpm"}') == 1


# -- the label values the code raises ---------------------------------------------------------

def _is_gateway_error(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "GatewayError") or \
        (isinstance(func, ast.Attribute) and func.attr == "GatewayError")


def _failure_kinds() -> set:
    from gateway.relay.upstream import _FAILURE_KINDS
    return {kind for _, kind in _FAILURE_KINDS}


def _values_of(expr: ast.expr, scope: ast.AST, where: str) -> set:
    """The string values `expr` (a kind=...) can take, read from the code around it; fails the
    test rather than guess."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.Name):
        # kind=verdict with {"rpm": ..., "tpm": ...}[verdict] in the same function: the dict's keys
        for node in ast.walk(scope):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) \
                    and isinstance(node.slice, ast.Name) and node.slice.id == expr.id:
                return {key.value for key in node.value.keys}
        # kind = failure_kind(exc): the names upstream.failure_kind gives
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == expr.id for t in node.targets) \
                    and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "failure_kind":
                return _failure_kinds()
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "replace" \
            and all(isinstance(a, ast.Constant) for a in expr.args):
        old, new = (a.value for a in expr.args)
        return {value.replace(old, new) for value in _values_of(expr.func.value, scope, where)}
    pytest.fail(f"{where}: cannot tell which values {ast.unparse(expr)!r} takes; list them in "
                "gateway/core/metrics.py and teach this test to read them")


def parsed(paths) -> list:
    """(path, syntax tree) of each module, parsed in a fresh thread: on CPython 3.11.7 a thread
    whose recursion counter an earlier RecursionError left off (the bad-input tests send absurdly
    nested JSON) fails ast.parse with "AST constructor recursion depth mismatch" (fixed in 3.11.8);
    a new thread starts at depth 0."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: [(path, ast.parse(path.read_text(), str(path))) for path in paths]).result()


def raised_label_values() -> dict:
    """{"auth": {...}, "rate": {...}, "upstream": {...}} as the code raises them: kind= of every
    GatewayError with status 401 or kind keystore_unavailable (vgw_auth_failures_total), status 429
    (vgw_rate_limited_total), a 5xx with a kind (vgw_upstream_errors_total), and the first argument
    of every upstream_error(...) call."""
    found = {"auth": set(), "rate": set(), "upstream": set()}
    for path, tree in parsed(SOURCES):
        scopes = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for scope in scopes:
            for call in (n for n in ast.walk(scope) if isinstance(n, ast.Call)):
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                if isinstance(call.func, ast.Attribute) and call.func.attr == "upstream_error" and call.args:
                    found["upstream"] |= _values_of(call.args[0], scope, where)
                    continue
                if not _is_gateway_error(call) or not call.args or not isinstance(call.args[0], ast.Constant):
                    continue
                status = call.args[0].value
                kind = next((k.value for k in call.keywords if k.arg == "kind"), None)
                kinds = _values_of(kind, scope, where) if kind is not None else set()
                if status == 401 or "keystore_unavailable" in kinds:
                    assert kinds, f"{where}: a 401 without kind= would be counted under its type; give it a kind"
                    found["auth"] |= kinds
                elif status == 429:
                    assert kinds, f"{where}: a 429 without kind= would be counted as 'unknown'; give it a kind"
                    found["rate"] |= kinds
                elif 500 <= status <= 599 and kinds:
                    found["upstream"] |= kinds
    return found


def test_every_kind_the_code_raises_is_created_at_start_up():
    found = raised_label_values()
    assert found["auth"] - set(AUTH_FAILURE_REASONS) == set(), "add to AUTH_FAILURE_REASONS"
    assert found["rate"] - set(RATE_LIMIT_KINDS) == set(), "add to RATE_LIMIT_KINDS"
    assert found["upstream"] - set(UPSTREAM_ERROR_KINDS) == set(), "add to UPSTREAM_ERROR_KINDS"


def test_every_value_created_at_start_up_is_raised_somewhere():
    found = raised_label_values()
    assert set(AUTH_FAILURE_REASONS) - found["auth"] == set(), "no longer raised: drop from AUTH_FAILURE_REASONS"
    assert set(RATE_LIMIT_KINDS) - found["rate"] == set(), "no longer raised: drop from RATE_LIMIT_KINDS"
    assert set(UPSTREAM_ERROR_KINDS) - found["upstream"] == set(), "no longer raised: drop from UPSTREAM_ERROR_KINDS"


def test_the_reader_sees_the_known_raise_sites():
    """The AST reader itself: it finds what is known to be raised (else both tests above could
    pass on an empty reading)."""
    found = raised_label_values()
    assert {"invalid_key", "keystore_unavailable"} <= found["auth"]
    assert {"rpm", "tpm", "parallel", "budget_held"} <= found["rate"]
    assert {"connection_refused", "connect_timeout", "stream_broken"} <= found["upstream"]


# -- multiprocess mode (gunicorn): values live in files; each worker is a process --------------

_WORKER = """
import json, sys
from gateway.core.metrics import Metrics
m = Metrics()
m.prepare(replicas=["http://vllm-a:8000"])
action = sys.argv[1]
if action == "render":
    print(json.dumps(m.render()[0].decode()))
else:
    m.redis_up.set(int(action))
    m.replica_up("http://vllm-a:8000").set(int(action))
"""


def run_worker(directory, action: str) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", _WORKER, action], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if action == "render" else ""


def test_multiprocess_mode_shows_the_zero_series_of_a_worker_that_saw_no_event(tmp_path):
    found = samples(run_worker(tmp_path, "render"))
    for reason in AUTH_FAILURE_REASONS:
        assert found[("vgw_auth_failures_total", frozenset({("reason", reason)}))] == 0
    for kind in RATE_LIMIT_KINDS:
        assert found[("vgw_rate_limited_total", frozenset({("limit", kind)}))] == 0
    for kind in UPSTREAM_ERROR_KINDS:
        assert found[("vgw_upstream_errors_total",
                      frozenset({("kind", kind), ("replica", "http://vllm-a:8000")}))] == 0


def test_multiprocess_up_gauges_report_the_most_recent_value_whichever_worker_set_it(tmp_path):
    """Not a sum, max or per-pid series: the last worker to probe wins, a stale one never does."""
    def up() -> tuple:
        found = samples(run_worker(tmp_path, "render"))
        assert not any(name.endswith("_up") and dict(labels).get("pid") for name, labels in found)
        return (found[("vgw_redis_up", frozenset())],
                found[("vgw_replica_up", frozenset({("replica", "http://vllm-a:8000")}))])

    run_worker(tmp_path, "1")
    run_worker(tmp_path, "0")  # a later worker saw it down
    assert up() == (0, 0)
    run_worker(tmp_path, "1")  # and later again up
    assert up() == (1, 1)
