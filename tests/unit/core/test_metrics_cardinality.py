"""Label values a caller chooses are bounded: no caller can create Prometheus series at will."""
import secrets

from gateway.core.accesslog import RequestRecord
from gateway.core.metrics import MAX_KEY_ALIAS_LABELS, MAX_MODEL_LABELS, LabelBudget, Metrics


def series(metrics: Metrics) -> int:
    text = metrics.render()[0].decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def observe(metrics: Metrics, method: str, status) -> None:
    record = RequestRecord(method, "/vllm/x", "chat_completions")
    record.status = status
    metrics.observe_request(record, 0.001)


def test_random_methods_and_statuses_share_one_series(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    observe(metrics, "POST", 200)
    observe(metrics, "NOTAMETHOD", 401)
    observe(metrics, "POST", 1234)
    baseline = series(metrics)
    for _ in range(500):
        observe(metrics, secrets.token_hex(6).upper(), 401)
        observe(metrics, "POST", 1000 + secrets.randbelow(9000))
    assert series(metrics) == baseline  # all of them landed in the "other" series seen above
    text = metrics.render()[0].decode()
    assert 'method="other"' in text and 'status="other"' in text


def test_model_and_alias_labels_have_a_budget(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    for i in range(MAX_MODEL_LABELS + 50):
        metrics.usage("alias", f"model-{i}", 1, 1, 0.0)
    text = metrics.render()[0].decode()
    assert f'model="model-{MAX_MODEL_LABELS - 1}"' in text and f'model="model-{MAX_MODEL_LABELS}"' not in text
    assert 'model="other"' in text
    for i in range(MAX_KEY_ALIAS_LABELS + 5):
        metrics.usage(f"k{i}", "m", 1, 0, 0.0)
    assert 'key_alias="other"' in metrics.render()[0].decode()


def test_a_request_that_used_nothing_creates_no_usage_series(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    before = series(metrics)
    for i in range(50):
        metrics.usage("alias", f"nope-{i}", 0, 0, 0.0)
    assert series(metrics) == before


def test_label_budget_keeps_values_it_has_seen():
    budget = LabelBudget(2)
    assert [budget(v) for v in ("a", "b", "c", "a", "b")] == ["a", "b", "other", "a", "b"]
