"""monitoring/grafana-dashboard.json: importable (valid JSON, unique panel ids, the Prometheus data
source as a template variable) and built only on metric names and labels the gateway really serves."""
import json
import re

import pytest

from tests.conftest import MASTER, ROOT, TEST_PRICES, build_app, gateway_environ

DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What every Prometheus target carries, and the histogram bucket label
TARGET_LABELS = {"job", "instance", "le"}
PROMQL_WORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group",
    "count_values", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless",
    # functions used on counters, gauges and histograms
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "sort", "sort_desc", "vector", "scalar", "time", "label_replace",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time", "absent",
    "changes", "resets",
    # Grafana template functions
    "label_values",
}
EVERY_METRIC = {
    "vgw_requests_total", "vgw_request_duration_seconds_bucket", "vgw_time_to_first_byte_seconds_bucket",
    "vgw_streams_open", "vgw_upstream_errors_total", "vgw_auth_failures_total", "vgw_rate_limited_total",
    "vgw_budget_rejections_total", "vgw_tokens_total", "vgw_spend_total", "vgw_replica_up", "vgw_redis_up",
}


@pytest.fixture
def app(vllm, monkeypatch):
    """The `client` fixture's app, with prices so spend is counted."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return build_app({"environ": gateway_environ(vllm.url, MODEL_PRICES=TEST_PRICES)})


@pytest.fixture
def served(client) -> dict:
    """{metric name: label names} of the gateway's /metrics after some traffic of every sort."""
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
    assert client.post("/vllm/v1/chat/completions", headers=MASTER, json=chat).status_code == 200
    assert client.post("/vllm/v1/chat/completions", headers=MASTER,
                       json={**chat, "stream": True, "stream_options": {"include_usage": True}}).status_code == 200
    key = client.post("/key/generate", headers=MASTER, json={"key_alias": "dash", "rpm_limit": 1}).get_json()["key"]
    statuses = [client.get("/vllm/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                for _ in range(2)]
    assert statuses == [200, 429]
    assert client.get("/vllm/v1/models", headers={"Authorization": "Bearer sk-not-a-key-0000"}).status_code == 401
    text = client.get("/metrics", headers=MASTER).get_data(as_text=True)
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            found.setdefault(name, set()).update(re.findall(r'(\w+)="', line.split("}")[0] if "{" in line else ""))
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list:
    return dashboard()["panels"]


def exprs() -> list:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in panels() for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["query"]) for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return out


def metric_names(expr: str) -> set:
    """Identifiers of an expression that are neither PromQL words, label names nor values."""
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    rest = re.sub(r"\{[^}]*\}", "", rest)                              # label matchers
    rest = re.sub(r"\[[^\]]*\]", "", rest)                             # ranges ([$__rate_interval])
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", rest)  # label lists
    rest = re.sub(r",\s*[a-z_]+\s*\)", ")", rest) if rest.startswith("label_values") else rest  # its label
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rest)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"e\d*", n)}       # exponents of numbers


def label_names(expr: str) -> set:
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    if expr.startswith("label_values"):
        labels.add(re.search(r",\s*([a-zA-Z_]\w*)\s*\)\s*$", expr).group(1))
    return labels


def test_dashboard_is_importable_json_with_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["title"] == "vLLM gateway" and board["uid"] and board["schemaVersion"] >= 36
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE


def test_every_panel_has_a_title_a_unique_id_a_place_and_the_template_datasource():
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for panel in panels():
        assert panel["title"].strip() and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"].strip()


def test_panels_do_not_overlap():
    taken = set()
    for panel in panels():
        g = panel["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_expression_uses_only_metrics_and_labels_the_gateway_serves(served):
    known_labels = set().union(*served.values()) | TARGET_LABELS
    for where, expr in exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= set(served), f"{where}: {sorted(names - set(served))} not in /metrics"
        assert all(n.startswith("vgw_") for n in names), f"{where}: only the gateway's own metrics"
        assert label_names(expr) <= known_labels, f"{where}: labels {sorted(label_names(expr) - known_labels)}"


def test_the_dashboard_covers_every_metric_the_gateway_serves():
    used = set().union(*(metric_names(expr) for _, expr in exprs()))
    assert EVERY_METRIC <= used, sorted(EVERY_METRIC - used)


def test_the_expression_reader_rejects_what_it_should():
    """The checks above are only as good as the reader: an unknown metric or label is seen."""
    assert metric_names('sum by (route) (rate(up{job=~"$job"}[5m]))') == {"up"}
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(vgw_x_bucket[$__rate_interval])))') == \
        {"vgw_x_bucket"}
    assert metric_names("label_values(vgw_requests_total, job)") == {"vgw_requests_total"}
    assert label_names('sum by (kind, replica) (rate(vgw_upstream_errors_total{job=~"$job", foo!="a,b"}[1m]))') \
        == {"kind", "replica", "job", "foo"}
